"""Runs of alike entries in a ZeRO-3 model-states pickle, read in bulk.

At stage 3 DeepSpeed saves the module's state_dict with an empty 1-D tensor per param, and
param_shapes with a torch.Size per param: at 297k names, 37 + 9 of the 47 MB of rank 0's pickle
are entries that differ only in a name, a storage key or shape and their memo indices. Read
opcode by opcode they cost ~2 us each (persistent_load, a hooks OrderedDict, a rebuild, torch.Size
and a dict key check in Python; a C memo holding six intermediate objects per entry until the
load ends: ~130 MB). `prepare_with_runs` proves such runs with one regex each (every entry the
same bytes as the run's first but for its two columns and its PUT indices: `_Kind`), and puts
in place of each a short stub for the C unpickler (`RunUnpickler`, the rules of
FastMetaUnpickler):

* the columns as lists (the module's names with their own PUTs: later parts refer to them) and
  the objects the run's GETs name, passed to a RunUnpickler method that checks them as
  persistent_load, _rebuild_tensor_v2 or torch.Size would and makes the values in bulk, returned
  as a `PairsRun` and set under a key '' into the dict being built, whose `__setitem__` inserts
  the run's pairs instead (unpickle.PairsRun), in order (a run must be followed by the SETITEMS
  that takes its frame: nothing else may be handed the pair); an OrderedDict keeps them as
  lists until it is used as a dict (unpickle.DeferredPairs: the layouts read the lists);
* every other PUT of the run, replayed with a poison object that raises on any use: a later GET
  of an intermediate object of the run (no real pickle makes one) gets no wrong object.

A module run's GETs are BINGETs (index < 256) and its PUTs of index >= 256: no PUT of the run
changes what one of its GETs reads. A param_shapes run's GETs (names, torch.Size) are read after
its PUTs' poison: a GET of an index the run PUT fails. What lies before, between and after the
runs is proven as fastpickle proves a whole pickle, and must end a token exactly where a run
begins. After the load the poison and each PairsRun must be referred to by nothing but the
reader (reference counts: exact) or the load is void and the file is read the usual way. So the
objects are the ones the other paths build, or there are none.
"""

from __future__ import annotations

import functools
import pickle
import re
import sys
from itertools import chain, repeat
from operator import itemgetter

from zinspect.core.fastpickle import SHORT_UNICODE, below, memo_index_bits, prepare_for_c
from zinspect.core.torchpickle import (
    MAX_NUMEL,
    FastMetaUnpickler,
    StorageRef,
    TensorRef,
    _rebuild_tensor_v2,
    _size,
    _StorageClass,
)
from zinspect.core.unpickle import PairsRun, PickledOrderedDict

#: a run of fewer entries is left to the usual path (the regexes' setup is not free)
MIN_ENTRIES = 1024
#: after this many shorter runs no more are looked for (each costs a search and a read)
MAX_SHORT_RUNS = 8
#: a run's first entry is looked for in this many bytes after the previous run (DeepSpeed saves
#: the module first, ~3 KB in; param_shapes ~100 bytes after it)
SEARCH_BYTES = 1 << 20
#: a run is read this many bytes at a time; an entry is at most _LONGEST bytes
_WINDOW, _LONGEST = 1 << 20, 1024
POISON_MARKER = ("\x00zinspect", "\x00poison")
_PUT = 5  # bytes of a LONG_BINPUT
_GET = rb"(?:h.|j....)"
_INTS = rb"(?:K.|M..|J....)"


def _global(marker: tuple[str, str]) -> bytes:
    return b"c" + "\n".join(marker).encode() + b"\n"


def _put(bits: int, high: bool) -> bytes:
    """LONG_BINPUT of an index < 2**bits (the scan's bound on memo indices); >= 256 if `high`."""
    return b"r" + (rb"(?!.\x00\x00\x00)" if high else b"") + below(bits)


class _Kind:
    """A kind of run. Its entries are COLUMN1, HEAD, COLUMN2, TAIL; the run's first entry
    (`first`) gives the literal bytes of HEAD and of TAIL between its PUTs (at `PUT_OFFSETS`
    of TAIL's `TAIL_LEN` bytes) to the others: `entries` reads the run's two columns and
    tails, and the rest of the pickle (findall's last row); `stub` stands for them."""

    MARKER: tuple[str, str]
    COLUMN1: bytes
    HEAD: bytes
    COLUMN2: bytes
    TAIL: tuple[bytes, ...]  # the segments between the PUTs (regexes)
    TAIL_LEN: int
    PUT_OFFSETS: tuple[int, ...]
    HIGH_PUTS: bool

    @classmethod
    @functools.lru_cache(maxsize=8)
    def first(cls, bits: int) -> re.Pattern:
        return re.compile(cls._entry(bits, b"(" + cls.HEAD + b")", cls.TAIL), re.DOTALL)

    @classmethod
    def _entry(cls, bits: int, head: bytes, tail: tuple[bytes, ...]) -> bytes:
        put = _put(bits, cls.HIGH_PUTS)  # (COLUMN1's PUT, if any, too: `{put}`)
        return b"(" + cls.COLUMN1.replace(b"{put}", put) + b")" + head + b"(" + cls.COLUMN2 + \
            b")(" + put + b"".join(s + put for s in tail) + b")"

    @classmethod
    @functools.lru_cache(maxsize=8)
    def _entries(cls, bits: int, head: bytes, literal: tuple[bytes, ...]) -> re.Pattern:
        # an entry (after a batch's SETITEMS + MARK, or not), or all that follows the run (in
        # O(1): `.*` of DOTALL jumps to the end): at every position one of them matches, so
        # the entries tile the run
        return re.compile(rb"(u\()?" + cls._entry(bits, re.escape(head), literal) + b"|(.).*",
                          re.DOTALL)

    def __init__(self, first: re.Match, bits: int) -> None:
        self.head, tail = first.group(2), first.group(4)
        ends = [at + _PUT for at in self.PUT_OFFSETS]
        literal = tuple(re.escape(tail[a:b]) for a, b in zip(ends, self.PUT_OFFSETS[1:], strict=False))
        self.entries, self.tail = self._entries(bits, self.head, literal), tail

    def read(self, raw: bytes, start: int, stop: int | None = None) -> tuple:
        """(entries, where the run ends, its columns' and its tails' PUTs' pieces) of the run
        from `start` (up to `stop`, if given), read `_WINDOW` bytes at a time (findall's rows
        are ~300 bytes an entry: 90 MB at once for a 297k-entry run). A run not followed by a
        SETITEMS is cut back to its last batch's (see prepare_with_runs)."""
        limit = len(raw) if stop is None else stop
        at, n, columns, batch = start, 0, ([], [], []), None
        while True:
            window = min(limit, at + _WINDOW)
            found = self.entries.findall(raw, at, window)
            after = found.pop()[-1] if found and found[-1][-1] else b""  # the rest's 1st byte
            k, flat = len(found), list(chain.from_iterable(found))
            del found
            bounds, first, second, tails = (b"".join(flat[i::5]) for i in range(4))
            j = next((j for j in range(k - 1, 0 if n == 0 else -1, -1) if flat[5 * j]), None)
            if j is not None:  # the last batch boundary (its `u` after entry j - 1): where
                batch = n + j, at, flat, j  # it lies is summed only if the run is cut back
            del flat
            columns[0].append(first)
            columns[1].append(second)
            columns[2].append(self._puts(tails, k))
            n, at = n + k, at + len(bounds) + len(first) + len(second) + len(tails) + \
                k * len(self.head)
            if window == limit or after and (window - at > _LONGEST or not k):
                break  # (else the window's end cut an entry, or ended with one: read on)
        if not after and stop is None:  # the pickle ends inside the run: no STOP after it
            return 0, start + 1, columns
        if after not in (b"u", b"") and batch is not None and batch[0] >= MIN_ENTRIES:
            _, window_start, flat, j = batch
            return self.read(raw, start, window_start + sum(map(len, flat[:5 * j])) +
                             j * len(self.head))
        return n, at, columns

    def _puts(self, tails: bytes, n: int) -> bytes:
        """The LONG_BINPUTs of `n` tails of TAIL_LEN bytes, whose PUTs lie at PUT_OFFSETS."""
        puts = []
        for at in self.PUT_OFFSETS:
            column = bytearray(_PUT * n)
            for i in range(_PUT):
                column[i::_PUT] = tails[at + i::self.TAIL_LEN]
            puts.append(column)
        return b"".join(puts)


class _ModuleEntries(_Kind):
    """name -> empty 1-D tensor, as torch pickles it once its globals are in the memo:
    BINUNICODE name, PUT | GET rebuild, MARK, MARK, GET "storage", GET storage class |
    BINUNICODE key | PUT, GET location, numel, TUPLE, PUT, BINPERSID, offset, size (0,), PUT,
    stride (1,), PUT, requires_grad, GET OrderedDict, EMPTY_TUPLE, REDUCE, PUT, TUPLE, PUT,
    REDUCE, PUT."""

    MARKER = ("\x00zinspect", "\x00module")
    COLUMN1, HEAD, COLUMN2 = SHORT_UNICODE + b"{put}", rb"h.\(\(h.h.", SHORT_UNICODE
    TAIL = (rb"h.K.t", rb"QK.K\x00\x85", rb"K\x01\x85", rb"[\x88\x89]h.\)R", b"t", b"R")
    TAIL_LEN, PUT_OFFSETS, HIGH_PUTS = 56, (0, 10, 21, 29, 39, 45, 51), True

    def stub(self, columns: tuple[list, list, list]) -> list[bytes]:
        """Push '' and `RunUnpickler._module(names, keys, gets, constants)`, then replay the
        other PUTs with the poison (after the names' own: the poison wins a shared index)."""
        names, keys, puts = columns
        h, t = self.head, self.tail
        gets = h[0:2] + h[4:6] + h[6:8] + t[5:7] + t[35:37]
        constants = t[7:9] + t[16:18] + t[34:35]  # numel, offset, requires_grad
        return [b"X\x00\x00\x00\x00" + _global(self.MARKER) + b"((", *names, b"l(", *keys,
                b"l(" + gets + b"t(" + constants + b"ttR" + _global(POISON_MARKER), *puts, b"0"]


class _ShapeEntries(_Kind):
    """name -> torch.Size: GET name | GET torch.Size | the dims' ints and a TUPLE | PUT,
    TUPLE1, PUT, REDUCE, PUT."""

    MARKER = ("\x00zinspect", "\x00shapes")
    COLUMN1, HEAD = _GET, _GET
    # (as many ints as the TUPLE takes: each entry's dims are one tuple)
    COLUMN2 = _INTS + rb"\x85|" + _INTS + rb"{2}\x86|" + _INTS + rb"{3}\x87|\)|\(" + _INTS + \
        rb"{4,64}t"
    TAIL, TAIL_LEN, PUT_OFFSETS, HIGH_PUTS = (rb"\x85", b"R"), 17, (0, 6, 12), False

    def stub(self, columns: tuple[list, list, list]) -> list[bytes]:
        """Replay the PUTs with the poison, then push '' and `RunUnpickler._shapes(names,
        shapes, (Size,))` (GETs of an index the run PUT get the poison: refused)."""
        names, shapes, puts = columns
        return [b"X\x00\x00\x00\x00" + _global(POISON_MARKER), *puts, b"0" +
                _global(self.MARKER) + b"((", *names, b"l(", *shapes, b"l(" + self.head + b"ttR"]


_KINDS = (_ModuleEntries, _ShapeEntries)


def may_hold_run(head: bytes, total: int) -> bool:
    """Whether `head`, the start of a pickle of `total` bytes, holds a module run's first
    entry (worth reading the pickle whole for `prepare_with_runs`)."""
    return _ModuleEntries.first(memo_index_bits(total)).search(head) is not None


def prepare_with_runs(raw: bytes) -> list | None:
    """`raw` as pieces for RunUnpickler (fastpickle.PiecesReader), each run of MIN_ENTRIES
    alike entries or more replaced by its stub; None when it holds none or any proof fails
    (the usual path reads it then)."""
    bits, at, end, pieces, short = memo_index_bits(len(raw)), 0, 0, [], 0
    while short < MAX_SHORT_RUNS:  # the next run, whichever kind it is
        window = end, min(len(raw), end + SEARCH_BYTES)
        firsts = [(m.start(), kind, m) for kind in _KINDS
                  if (m := kind.first(bits).search(raw, *window)) is not None]
        if not firsts:
            break
        start, kind, first = min(firsts, key=itemgetter(0))
        run = kind(first, bits)
        n, end, columns = run.read(raw, start)
        # the pairs must go where the entries' would: into the dict whose SETITEMS takes the
        # frame they are in (a frame of a LIST, say, would hand '' and the PairsRun to
        # something else, an OrderedDict(pairs) too), so a SETITEMS must follow
        if n < MIN_ENTRIES or raw[end:end + 1] != b"u":  # else: read the usual way
            short += 1
            continue
        before = _prove(raw[at:start] + b".", len(raw), until=start - at)
        if before is None:  # it begins inside a token: not an entry
            short, end = short + 1, start + 1
            continue
        pieces += before + run.stub(columns)
        at = end
    rest = _prove(raw[at:], len(raw)) if pieces else None
    return None if rest is None else pieces + rest


def _prove(data: bytes, total: int, until: int | None = None) -> list | None:
    """fastpickle's proof of `data` (a part of a pickle of `total` bytes) up to its STOP; with
    `until`, that STOP must be the one appended at `until` (`data` then ends a token exactly
    there; the pieces are returned without it)."""
    pieces = prepare_for_c(data, total)
    if pieces is None or until is None:
        return pieces
    if sum(len(p) if isinstance(p, memoryview) else 1 for p in pieces) != until + 1:
        return None  # an earlier STOP, or the appended one read as part of a token
    pieces[-1] = pieces[-1][:-1]
    return pieces


def _refuse(*_args, **_kwargs):
    raise pickle.UnpicklingError("the pickle refers to an object of a bulk-read run")


class _Poison:
    """What a run's intermediate objects are in the memo: any use of it raises."""

    __slots__ = ()
    __getattr__ = __setattr__ = __call__ = __bool__ = __len__ = __iter__ = __hash__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __index__ = __int__ = _refuse
    __float__ = __getitem__ = __contains__ = __setstate__ = __reduce_ex__ = _refuse


class RunUnpickler(FastMetaUnpickler):
    """FastMetaUnpickler for the pieces of `prepare_with_runs`."""

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._poison, self._runs = _Poison(), []
        self._markers = {POISON_MARKER: self._poison, _ModuleEntries.MARKER: self._module,
                         _ShapeEntries.MARKER: self._shapes}

    def find_class(self, module: str, name: str):
        hit = self._markers.get((module, name))
        return super().find_class(module, name) if hit is None else hit

    def load(self):
        expected = sys.getrefcount(self._poison)
        obj = super().load()
        # (the memo was cleared: the poison and the runs must be referred to from here only)
        runs = self._runs
        if sys.getrefcount(self._poison) != expected or any(
                not runs[i].inserted or sys.getrefcount(runs[i]) != 2 for i in range(len(runs))):
            raise pickle.UnpicklingError("a bulk-read run was used other than as entries")
        return obj

    def _pairs(self, names: list, values: list) -> PairsRun:
        run = PairsRun(names, values)
        self._runs.append(run)
        return run

    def _module(self, names: list, keys: list, gets: tuple, constants: tuple) -> PairsRun:
        """The module run's (name, TensorRef) pairs, as persistent_load and _rebuild_tensor_v2
        make them from the GET'd objects, each key and the entries' constants."""
        rebuild, tag, cls, location, hooks = gets
        numel, offset, requires_grad = constants
        if rebuild is not _rebuild_tensor_v2 or type(tag) is not str or tag != "storage" or \
                type(cls) is not _StorageClass or type(location) is not str or \
                len(location) > 64 or hooks is not PickledOrderedDict or numel > MAX_NUMEL or \
                len(names) != len(keys) or max(map(len, keys)) > 64:
            raise pickle.UnpicklingError("a run of entries that is not what it seems")
        made = map(tuple.__new__, repeat(StorageRef),
                   zip(keys, repeat(cls.dtype), repeat(numel), repeat(location)))
        storages = self.storages
        if storages.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            refs = list(made)
            storages.update(zip(keys, refs, strict=True))
            dtypes = repeat(cls.dtype)
        else:  # a key seen before: its first StorageRef, as persistent_load's setdefault
            refs = list(map(storages.setdefault, keys, made))
            dtypes = [r.dtype for r in refs]
        shared = _rebuild_tensor_v2.__kwdefaults__  # the (0,) and (1,) it gives every one
        return self._pairs(names, list(map(
            TensorRef, refs, repeat(offset), repeat(shared["_empty"]), repeat(shared["_unit"]),
            dtypes, repeat(requires_grad))))

    def _shapes(self, names: list, shapes: list, gets: tuple) -> PairsRun:
        """The param_shapes run's (name, shape) pairs: torch.Size of a tuple is that tuple."""
        if gets[0] is not _size or set(map(type, names)) != {str} or len(names) != len(shapes):
            raise pickle.UnpicklingError("a run of entries that is not what it seems")
        return self._pairs(names, shapes)
