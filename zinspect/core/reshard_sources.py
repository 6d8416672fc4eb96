"""The source side of a reshard: the checkpoint's files read once each, where each param's
states lie (in one data-parallel slice of the files, or in all of them), and the pickles'
tensors re-pointed at the new files (`copy`).

Each new tensor is a list of source byte ranges (`Piece`s of the fragments zinspect located)
and zero padding (`zinspect.core.torchsave.add_zeros`).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import os
from collections import OrderedDict
from collections.abc import Collection

from zinspect.core.fmt import shown
from zinspect.core.fragments import TensorAt
from zinspect.core.model import MOMENTS, Checkpoint, Fragment
from zinspect.core.plan import Piece
from zinspect.core.torchsave import NewTensor, OutFile, Size, add_piece
from zinspect.core.torchzip import DTYPE_SIZES, TensorRef, TorchFile, read_torch_file
from zinspect.core.zipcheck import LOCAL_HEADER, NoZipDirectory, central_directory, local_data_offset
from zinspect.errors import NotMergeable

STEP = "step"
#: parsed source files kept (the template optimizer files of the slices, the model states)
PARSED = 16


def refuse(ckpt: Checkpoint, what: str, hint: str = "") -> NotMergeable:
    return NotMergeable(f"{shown(str(ckpt.path))}: cannot reshard: {what}",
                        hint or "reshard a ZeRO checkpoint saved by DeepSpeed")


class Sources:
    """The source files' pickles (read once each) and where each param's states lie."""

    _dropped = 0  # parsed files dropped from `_tfs`

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.notes: list[str] = []
        self._tfs: dict[str, TorchFile] = {}
        self._paths: dict[str, str] = {}  # file name -> its path (asked once per piece)
        # the optimizer files by global rank: (stage * dp + dp rank) * tp + tp rank
        dp, tp = ckpt.topology.dp, ckpt.topology.tp
        self.optim = {((f.coords.pp or 0) * dp + f.rank) * tp + (f.coords.tp or 0 if tp > 1 else 0): f
                      for f in ckpt.files_of("optim")}
        self.model = {f.rank: f for f in ckpt.files_of("model")}
        self.old = ckpt.world_size or len(self.optim)
        if sorted(self.optim) != list(range(self.old)):
            raise refuse(ckpt, f"the optimizer files are not ranks 0..{self.old - 1}")

    def tf(self, name: str) -> TorchFile:
        """The parsed file (the PARSED most recently used ones are kept): a ZeRO-3
        reshard reads each of 512 ranks' model states once, and their pickles together hold
        params x ranks entries."""
        tf = self._tfs.pop(name, None)
        if tf is None:
            tf = read_torch_file(self.ckpt.path / name)
            while len(self._tfs) >= PARSED:
                del self._tfs[next(iter(self._tfs))]
                self._dropped += 1
                if self._dropped % PARSED == 0:
                    # a parsed pickle holds reference cycles, and the reader pauses the
                    # collector (what it builds goes to the oldest generation): without a full
                    # collection now and then, 512 ranks' dropped pickles stay (+600 MB)
                    gc.collect()
        self._tfs[name] = tf
        return tf

    def path(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = str(self.ckpt.path / name)
        return path

    def osd(self, rank: int) -> dict:
        return self.tf(self.optim[rank].name).obj["optimizer_state_dict"]

    def fragments(self, name: str, state: str, files: Collection[str] | None = None) -> list[Fragment]:
        """The param's fragments of `state` ("frozen": its 16-bit values), sorted, each with
        its bytes located (Checkpoint.state_fragments); with `files`, only those held by them
        (one tp rank's shard, one pipeline stage's copy of a tied param)."""
        ckpt = self.ckpt
        p = ckpt.params[name]
        if state == "frozen":
            frags = [f for f in p.fragments if f.source in ("frozen", "module")]
        elif files is None:
            frags = ckpt.state_fragments(name, state)
        else:
            frags = _slice_fragments(ckpt, name, state, files)
        if files is not None:
            frags = [f for f in frags if f.file in files]
        frags = sorted((f for f in frags if f.numel), key=lambda f: f.start)
        if not frags and p.numel:
            raise refuse(ckpt, f"{shown(name, 80)}: the files hold no {state} for it",
                         "only Adam/AdamW optimizer states (exp_avg, exp_avg_sq) are resharded")
        if any(f.offset is None or not f.intact for f in frags):
            raise refuse(ckpt, f"{shown(name, 80)}: its {state} bytes are not all in the files")
        return frags

    def add_range(self, ops: list, frags: list[Fragment], lo: int, hi: int, name: str,
                  starts: list[int] | None = None, state: str = "fp32") -> None:
        """Append the bytes of elements [lo, hi) of a param's `state`, from its master `frags`
        (sorted; with their `starts`, found by bisection: a ZeRO-3 param has one fragment per
        old rank). A moment lies at the master's element offsets in that state's tensor of the
        same file and group: located here, with no fragment objects made for it."""
        got = 0
        first = max(0, bisect.bisect_right(starts, lo) - 1) if starts else 0
        for f in itertools.islice(frags, first, None):
            if f.start >= hi:
                break
            a, b = max(lo, f.start), min(hi, f.start + f.numel)
            if a < b:
                if state in MOMENTS:
                    at = self.moment(f, state, name)
                    size, offset = at.itemsize, at.base + f.group_offset * at.itemsize
                else:
                    size, offset = DTYPE_SIZES[f.dtype], f.offset
                add_piece(ops, Piece(self.path(f.file), offset + (a - f.start) * size,
                                     (b - a) * size))
                got += b - a
        if got != hi - lo:
            raise refuse(self.ckpt, f"{shown(name, 80)}: elements {lo}..{hi} are not all held "
                         "by the rank files", "run `zinspect validate` for details")

    def moment(self, f: Fragment, state: str, name: str) -> TensorAt:
        """The `state` tensor holding the moment of master fragment `f`, its bytes all there."""
        at = self.ckpt.moments.get((f.file, f.group, state)) if f.group is not None else None
        if at is None:
            raise refuse(self.ckpt, f"{shown(name, 80)}: {shown(f.file)} holds no {state} for it",
                         "only Adam/AdamW optimizer states (exp_avg, exp_avg_sq) are resharded")
        if at.base is None or f.group_offset + f.numel > at.whole:
            raise refuse(self.ckpt, f"{shown(name, 80)}: its {state} bytes are not all in "
                         f"{shown(f.file)}")
        return at

    def copy(self, out: OutFile, file: str, obj):
        """`obj` of source `file` with every tensor copied into `out` (whole storages, shared
        ones once: a tie stays a tie)."""
        tf = self.tf(file)
        stores: dict = {}

        def walk(x):
            if isinstance(x, TensorRef):
                st = stores.get(x.storage.key)
                if st is None:
                    rec = tf.records.get(x.storage.key)
                    off = tf.data_offset(x.storage.key)
                    if rec is None or off is None or rec.present < x.storage.nbytes:
                        raise refuse(self.ckpt, f"{shown(file)}: record {x.storage.key} is "
                                     "missing or truncated")
                    ops: list = []
                    add_piece(ops, Piece(self.path(file), off, x.storage.nbytes))
                    st = stores[x.storage.key] = out.storage(x.dtype, x.storage.numel, ops)
                return NewTensor(st, Size(x.shape), x.offset, tuple(x.stride))
            if isinstance(x, dict):  # the unpickler's dicts may be its own subclasses
                items = [(k, walk(v)) for k, v in x.items()]
                return OrderedDict(items) if isinstance(x, OrderedDict) else dict(items)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, tuple) and type(x) is tuple:
                return tuple(walk(v) for v in x)
            return x

        return walk(obj)

    def whole(self, name: str) -> OutFile:
        """Source file `name` copied byte for byte (a layer or expert file of a pipeline or MoE
        run, which no data-parallel size changes), cut at its zip records' data so that the
        stream CRC-checks every record as it copies it."""
        path = self.path(name)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                cuts = {0, size}
                for _, header, _, nbytes, _ in central_directory(f, size):
                    start = local_data_offset(header, os.pread(f.fileno(), LOCAL_HEADER, header))
                    if start is None or start + nbytes > size:
                        raise NoZipDirectory(f"record at {header} is not whole")
                    cuts |= {start, start + nbytes}
        except (OSError, NoZipDirectory) as e:
            raise refuse(self.ckpt, f"{shown(name)}: cannot be copied: {e}",
                         "run `zinspect validate` for details") from e
        out = OutFile(name, copied=True)
        cuts = sorted(cuts)
        for a, b in itertools.pairwise(cuts):
            out.storage("uint8", b - a, [Piece(path, a, b - a)])
        return out

    def step(self, out: OutFile, state: dict, file: str | None = None):
        """A copy of the `step` of a param state (a 0-d tensor in torch >= 1.12, else a number)
        read from `file` (default: rank 0's optimizer file)."""
        step = state.get(STEP)
        return self.copy(out, file or self.optim[0].name, step) if isinstance(step, TensorRef) else step

    def check_states(self, states: dict) -> None:
        if got := non_adam(states):
            raise refuse(self.ckpt, f"group {got[0]}'s optimizer state holds {', '.join(got[1])}",
                         "only Adam/AdamW states (exp_avg, exp_avg_sq, step) are resharded")

    def sizes(self, shapes: dict) -> OrderedDict:
        return OrderedDict((k, Size(v)) for k, v in shapes.items())


def non_adam(states: dict) -> tuple[object, list[str]] | None:
    """(group, its state keys sorted) of the first group whose optimizer state holds more than
    Adam/AdamW's (step, exp_avg, exp_avg_sq); None when none does."""
    for g, st in states.items():
        extra = sorted(str(k) for k in (st or {}) if k not in (STEP, *MOMENTS))
        if extra:
            return g, extra
    return None


def _slice_fragments(ckpt: Checkpoint, name: str, state: str, files: Collection[str]) -> list[Fragment]:
    """`Checkpoint.state_fragments` over a param's fragments AND its per-stage copies (a tied
    pipeline param has its own master and moments in every stage that uses it)."""
    p = ckpt.params[name]
    if p.tied_to:
        p = ckpt.params[p.tied_to]
    if p.frozen:
        return []
    seen, masters = set(), []
    for f in itertools.chain(p.fragments, *p.copies.values()):
        if f.source == "master" and f.file in files and (f.file, f.group, f.group_offset) not in seen:
            seen.add((f.file, f.group, f.group_offset))
            masters.append(f)
    return at_masters(ckpt, masters, state)


def at_masters(ckpt: Checkpoint, masters: list[Fragment], state: str) -> list[Fragment]:
    """The fragments of `state` at the same places as the fp32 `masters`: the same element
    offsets in that state's tensor of the same file and group (`Checkpoint.state_fragments`'
    rule); a file without it leaves that range out."""
    if state == "fp32":
        return masters
    out = []
    for f in masters:
        at = ckpt.moments.get((f.file, f.group, state)) if f.group is not None else None
        if at is not None:
            out.append(at.fragment(f.group, f.group_offset, f.start, f.numel, f.padding, state,
                                   f.shard))
    return out


def get(obj, *keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def zero_config(ckpt: Checkpoint) -> dict:
    zo = get(ckpt.ds_config, "zero_optimization")
    return zo if isinstance(zo, dict) else {}
