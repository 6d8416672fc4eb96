"""One verification path for everything that reads tensor bytes: the merge, the tensor API and
the deep check (`validate --deep`).

- **CRC32 of zip records** (`RecordCheck`): the bytes of a record are fed in order, from
  whichever thread read them, and compared with the CRC of the zip directory once the last
  byte is in. zlib.crc32 releases the GIL on large buffers, so the reader threads of
  `zinspect.core.stream` run it beside the writes.
- **NaN/Inf counts** (`count_nonfinite`): by exponent bits, stdlib only.
- **Pins** (`Verification.pins`): every source file's (inode, size, mtime_ns) when the merge
  opens it, compared again at the end: a file rewritten or replaced while it was read fails.

`Verification` plans, for a merge's tensors in output order, which bytes feed which record:
the planned pieces, plus the small gaps between them (ZeRO-3 padding, a partition's tail) read
for the CRC only, so that every record the merge touches is checked whole. A record read out of
order or with large gaps (params left out by the selection) is read once more, in order, for
its CRC when it is small (RECHECK_BYTES); a bigger one is named as unverified.
"""

from __future__ import annotations

import bisect
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from zinspect.core.readfiles import open_regular
from zinspect.core.zipcheck import LOCAL_HEADER, NoZipDirectory, central_directory, local_data_offset
from zinspect.errors import NotMergeable

#: a record whose unplanned bytes are at most 1/GAP_SHARE of it, or GAP_BYTES, is read whole
#: (the gaps only for the CRC): ZeRO-3 padding and partition tails, not left-out params
GAP_SHARE, GAP_BYTES = 8, 1 << 20
#: a record read out of order (ZeRO-2 round robin) or with larger gaps (params left out) is
#: still checked when it is at most this big: by one in-order read of it for the CRC alone
#: (the merge's own reads of it then come from the page cache); bigger ones are named
RECHECK_BYTES = 16 << 20

# ------------------------------------------------------------------ NaN / Inf by exponent bits


def _table(pred: Callable[[int], bool]) -> bytes:
    return bytes(1 if pred(b) else 0 for b in range(256))


#: dtype -> (itemsize, [(byte index, "exponent bits all ones" table)],
#:           [(byte index, "mantissa bits all zero" table)]), little-endian layouts
_FLOAT_BITS = {
    "float32": (4, [(3, _table(lambda b: b & 0x7F == 0x7F)), (2, _table(lambda b: b & 0x80))],
                [(2, _table(lambda b: b & 0x7F == 0)), (1, _table(lambda b: b == 0)),
                 (0, _table(lambda b: b == 0))]),
    "bfloat16": (2, [(1, _table(lambda b: b & 0x7F == 0x7F)), (0, _table(lambda b: b & 0x80))],
                 [(0, _table(lambda b: b & 0x7F == 0))]),
    "float16": (2, [(1, _table(lambda b: b & 0x7C == 0x7C))],
                [(1, _table(lambda b: b & 0x03 == 0)), (0, _table(lambda b: b == 0))]),
    "float64": (8, [(7, _table(lambda b: b & 0x7F == 0x7F)), (6, _table(lambda b: b & 0xF0 == 0xF0))],
                [(6, _table(lambda b: b & 0x0F == 0))] +
                [(i, _table(lambda b: b == 0)) for i in range(6)]),
}
FLOAT_DTYPES = frozenset(_FLOAT_BITS)


def count_nonfinite(data, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of little-endian `dtype` values in `data` (whole elements).
    Dtypes that cannot hold NaN/Inf (ints, bool) give (0, 0).

    Strided slices of bytes run at memory speed (a memoryview's do not: it is copied once);
    the first exponent test alone rules out almost every real weight, so the usual cost is
    one copy, one strided slice and one translate."""
    spec = _FLOAT_BITS.get(dtype)
    if spec is None:
        return 0, 0
    size, exp, mant = spec
    raw = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B").tobytes()
    end = len(raw) - len(raw) % size
    idx, table = exp[0]
    first = raw[idx:end:size].translate(table)
    if first.find(1) < 0:
        return 0, 0
    mask = int.from_bytes(first, "little")
    for idx, table in exp[1:]:
        mask &= int.from_bytes(raw[idx:end:size].translate(table), "little")
    special = mask.bit_count()
    if not special:
        return 0, 0
    for idx, table in mant:
        mask &= int.from_bytes(raw[idx:end:size].translate(table), "little")
    inf = mask.bit_count()
    return special - inf, inf


# ------------------------------------------------------------------ CRC of one record


class Aborted(Exception):
    """A reader waiting for its turn on a record gave up: the stream is being torn down."""


@dataclass(eq=False)
class RecordCheck:
    """The CRC32 of one zip record, fed in order. `feed` may be called from several threads:
    each waits until the bytes before its own are in (the stream submits reads in order, so
    the one it waits for is already running)."""

    file: str  # shown name (the rank file's name)
    record: str  # the record's name in the zip
    start: int  # where its data starts in the file
    size: int
    want: int
    params: list[str] = field(default_factory=list)  # tensors with bytes in it, in order
    crc: int = 0
    cursor: int = 0  # bytes fed so far
    cond: threading.Condition | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    def feed(self, offset: int, data, abort: threading.Event | None = None) -> None:
        cond = self.cond
        if cond is not None:
            with cond:
                while self.start + self.cursor != offset:
                    if abort is not None and abort.is_set():
                        raise Aborted
                    cond.wait(0.5)
        self.crc = zlib.crc32(data, self.crc)
        if cond is not None:
            with cond:
                self.cursor += len(data)
                cond.notify_all()
        else:
            self.cursor += len(data)

    @property
    def done(self) -> bool:
        return self.cursor >= self.size

    @property
    def failed(self) -> bool:
        return self.done and self.crc != self.want

    def problem(self) -> str:
        """The one message for a record whose bytes are not the ones saved."""
        return (f"{self.file}: record {self.record} fails its CRC32 check ({self.crc:08x}, "
                f"the zip directory says {self.want:08x}): its bytes changed after the save")


CRC_HINT = "the file is corrupt (disk or copy error); copy it again from the training run"


# ------------------------------------------------------------------ a merge's verification


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes the stream reads: `sink` ones go to the output, the others only to `check`."""

    path: str
    offset: int
    nbytes: int
    check: RecordCheck | None
    sink: bool = True
    piece: int = 0  # index of the tensor's piece it reads (or rides with, for a gap)


@dataclass(frozen=True)
class Pin:
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Pin:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


def record_table(path: str, pins: dict, make) -> tuple[list[int], list] | None:
    """A zip file's records as checks sorted by data start: (starts, checks), each check
    `make(name, start, size, crc)`; the file is pinned in `pins` (see `Pin`). None when the file
    cannot be opened or has no readable zip directory (a legacy or damaged file: the stream
    reports it, located, and validation refused it before)."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        pins[path] = Pin.of(st)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            entries = central_directory(f, st.st_size)
        checks = []
        for name, header, _, size, crc in entries:
            start = local_data_offset(header, os.pread(fd, LOCAL_HEADER, header))
            if start is not None:
                checks.append(make(name, start, size, crc))
    except (OSError, NoZipDirectory):
        return None
    finally:
        os.close(fd)
    checks.sort(key=lambda c: c.start)
    return [c.start for c in checks], checks


class Verification:
    """What a merge checks while it streams `tensors` (in output order): the segments of each
    tensor, the record checks they feed, the pins of the source files, and the NaN/Inf counts
    per tensor (filled by the reader threads)."""

    def __init__(self, tensors, salvage: bool = False,
                 shown: Callable[[str], str] = os.path.basename) -> None:
        self.salvage = salvage  # a failed record does not stop the stream (see merge)
        self.abort = threading.Event()
        self.cond = threading.Condition()
        self.pins: dict[str, Pin] = {}
        self.nonfinite: dict[str, tuple[int, int]] = {}  # tensor -> (NaN, Inf)
        #: replicated tensor-parallel params whose tp ranks' copies differ: name -> {tp: max |a-b|}
        self.drift: dict[str, dict[int, float]] = {}
        self.checks: list[RecordCheck] = []
        self.unverified: list[RecordCheck] = []
        self._lock = threading.Lock()
        tensors = [m for t in tensors for m in t.streamed()]  # replicas are read too
        records = self._records({p.path for t in tensors for p in t.pieces}, shown)
        self.segments: dict[int, list[Segment]] = {}
        self._plan(tensors, records)

    def _records(self, paths, shown) -> dict[str, tuple[list[int], list[RecordCheck]]]:
        """path -> (sorted data starts, their RecordChecks), with the file pinned."""
        out = {}
        for path in sorted(paths):
            got = record_table(path, self.pins, lambda name, start, size, crc, path=path:
                               RecordCheck(shown(path), name, start, size, crc, cond=self.cond))
            if got is not None:
                out[path] = got
        return out

    def _plan(self, tensors, records) -> None:
        def record_of(path: str, offset: int, nbytes: int) -> RecordCheck | None:
            starts, checks = records.get(path, ((), ()))
            i = bisect.bisect_right(starts, offset) - 1
            if i >= 0 and offset + nbytes <= checks[i].end:
                return checks[i]
            return None

        # pass 1: the unplanned bytes of each record, in stream order
        cursor: dict[int, int] = {}
        gaps: dict[int, int] = {}
        broken: set[int] = set()
        last: dict[int, tuple[int, int]] = {}  # record -> (tensor index, piece index)
        located = []
        for ti, t in enumerate(tensors):
            row = []
            for pi, p in enumerate(t.pieces):
                # aliases may be skipped by a stream (torch output): they never feed a record
                c = None if t.tied_to else record_of(p.path, p.offset, p.nbytes)
                row.append(c)
                if c is None:
                    continue
                at = cursor.get(id(c), c.start)
                if p.offset + p.nbytes <= at and id(c) in cursor:
                    row[-1] = None  # read again (a tied alias): checked the first time
                    continue
                if p.offset < at:
                    broken.add(id(c))
                gaps[id(c)] = gaps.get(id(c), 0) + max(0, p.offset - at)
                cursor[id(c)] = p.offset + p.nbytes
                last[id(c)] = (ti, pi)
                if not c.params or c.params[-1] != t.name:
                    c.params.append(t.name)
            located.append(row)
        whole, reread = set(), set()
        for _, checks in records.values():
            for c in checks:
                if id(c) not in cursor:
                    continue  # not read at all (Adam moments...)
                gap = gaps[id(c)] + c.end - cursor[id(c)]
                if id(c) not in broken and gap <= max(c.size // GAP_SHARE, GAP_BYTES):
                    whole.add(id(c))
                elif c.size <= RECHECK_BYTES:
                    reread.add(id(c))
                else:
                    self.unverified.append(c)
                    continue
                self.checks.append(c)
        # pass 2: the segments, with the gaps read for the CRC only
        cursor.clear()
        for ti, (t, row) in enumerate(zip(tensors, located, strict=True)):
            segs = []
            for pi, (p, c) in enumerate(zip(t.pieces, row, strict=True)):
                if c is not None and id(c) in reread and id(c) not in cursor:
                    cursor[id(c)] = c.end  # the whole record, in order, before its first piece
                    segs.append(Segment(p.path, c.start, c.size, c, sink=False, piece=pi))
                if c is None or id(c) not in whole:
                    segs.append(Segment(p.path, p.offset, p.nbytes, None, piece=pi))
                    continue
                at = cursor.get(id(c), c.start)
                if p.offset > at:
                    segs.append(Segment(p.path, at, p.offset - at, c, sink=False, piece=pi))
                segs.append(Segment(p.path, p.offset, p.nbytes, c, piece=pi))
                cursor[id(c)] = p.offset + p.nbytes
                if last[id(c)] == (ti, pi) and cursor[id(c)] < c.end:
                    segs.append(Segment(p.path, cursor[id(c)], c.end - cursor[id(c)], c,
                                        sink=False, piece=pi))
            self.segments[id(t)] = segs

    def segments_of(self, t) -> list[Segment]:
        segs = self.segments.get(id(t))
        return segs if segs is not None else plain_segments(t)

    def add_drift(self, name: str, tp: int, diff: float) -> None:
        """A replica (tp rank `tp`) of `name` differs from the copy written, by up to `diff`."""
        with self._lock:
            ranks = self.drift.setdefault(name, {})
            ranks[tp] = max(ranks.get(tp, 0.0), diff)

    def add_nonfinite(self, name: str, nan: int, inf: int) -> None:
        with self._lock:
            n, i = self.nonfinite.get(name, (0, 0))
            self.nonfinite[name] = (n + nan, i + inf)

    def failures(self) -> list[RecordCheck]:
        return [c for c in self.checks if c.failed]

    def refuse(self, c: RecordCheck) -> NotMergeable:
        return refusal(c, CRC_HINT + "; `--salvage` writes the rest without its params")

    def check_unchanged(self) -> None:
        check_unchanged(self.pins, "merge")


def refusal(c, hint: str) -> NotMergeable:
    """The error for a record `c` that failed its check (a RecordCheck or reshard_verify's
    AnyOrderCheck): what failed and the params it holds."""
    names = ", ".join(c.params[:5]) + (f" and {len(c.params) - 5} more" if len(c.params) > 5 else "")
    return NotMergeable(f"{c.problem()}; it holds {names}; nothing was written", hint)


def check_unchanged(pins: dict[str, Pin], job: str) -> None:
    """Refuse when a source file's (inode, size, mtime) differ from its pin (or it is gone):
    it changed while the `job` ("merge", "reshard") read it."""
    changed = [path for path, pin in pins.items() if _pin_now(path) != pin]
    if changed:
        shown = ", ".join(os.path.basename(p) for p in changed[:5])
        raise NotMergeable(f"{shown}: changed while the {job} read it (inode, size or "
                           "modification time differ from when it was opened); nothing "
                           "was written", f"wait until nothing writes to the checkpoint and {job} "
                           "again")


def _pin_now(path: str) -> Pin | None:
    try:
        return Pin.of(os.stat(path))
    except OSError:
        return None


def plain_segments(t) -> list[Segment]:
    """A tensor's pieces as segments checked against nothing."""
    return [Segment(p.path, p.offset, p.nbytes, None, piece=i) for i, p in enumerate(t.pieces)]


def plan_without(plan, failures: list[RecordCheck]):
    """The plan minus the params of records that failed their CRC (and their tied aliases)."""
    why = {name: c.problem() for c in failures for name in c.params}
    for t in plan.tensors:
        if t.tied_to in why and t.name not in why:
            why[t.name] = f"tied to {t.tied_to}: " + why[t.tied_to]
    from zinspect.core.plan import MergePlan

    return MergePlan([t for t in plan.tensors if t.name not in why], plan.excluded,
                     {**plan.dropped, **why})
