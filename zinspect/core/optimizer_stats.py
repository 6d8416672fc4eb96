"""Per trainable param: the size of its fp32 master, its Adam moments and Adam's update (another
optimizer: the size of each per-param state it keeps, e.g. SGD's momentum_buffer), streamed with
bounded memory and cancellable (the app's optimizer view, `optimizer_stats`).

The update size |m| / (sqrt(v) + eps) is Adam's step per element before the learning rate and
bias correction: a param whose update is out of line with the others' is where a diverging
run blew up. The bytes are located by the core (`Checkpoint.state_fragments`) and read by the
merge's stream engine; the sums are stats.TensorStats'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.optimizer import ADAM_KEYS, OptimizerState
from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.states import held_states
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled

WINDOW = 1 << 18  # elements of each of master / exp_avg / exp_avg_sq held at once
#: params streamed per pass: their byte ranges (and their running sums) are all that is held,
#: so 300k params x 8 ranks never become millions of pieces at once
BATCH_PARAMS = 2048
BATCH_BYTES = 512 << 20


@dataclass(slots=True)
class ParamOptimStats:
    """A trainable param's numbers (the moments' None: not read). Kept per param for the
    whole table, so a few floats, not the running sums."""

    name: str
    numel: int
    group: int | None
    master_l2: float
    master_max_abs: float
    exp_avg_l2: float | None = None
    sqrt_exp_avg_sq_l2: float | None = None  # sqrt(sum v)
    update_mean: float | None = None  # of |m| / (sqrt(v) + eps), over its finite values
    update_max: float | None = None
    nonfinite: int = 0  # NaN / Inf among the master, m and v values (or the states' values)
    #: not Adam: L2 of each per-param state the optimizer keeps (momentum_buffer, sum, ...)
    states: dict[str, float] | None = None


@dataclass
class OptimizerStats:
    params: list[ParamOptimStats] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # param -> why its values are not read
    masters_only: dict[str, str] = field(default_factory=dict)  # param -> why no moments
    #: the per-param states read beside the masters (Adam's moments, or another optimizer's own)
    state_names: list[str] = field(default_factory=list)


def optimizer_stats(ckpt: Checkpoint, opt: OptimizerState,
                    progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> OptimizerStats:
    """Per trainable param (model order): L2 and max |x| of its fp32 master, L2 of exp_avg
    and sqrt(exp_avg_sq), and mean / max of |m| / (sqrt(v) + eps) with its group's eps.

    Each param's elements are located by `Checkpoint.state_fragments` (any layout the core
    describes; a replicated tensor-parallel param counted once) and streamed by the merge's
    engine in windows of WINDOW elements, master then m then v of one window, so the update
    is computed element by element with bounded memory; params go by batches of BATCH_PARAMS.
    These are order-free sums, so the fragments need not be laid out as the full tensor. A
    param whose master is not all in the files is left out, one whose moments are not gets its
    master's numbers; both with the reason. An optimizer that is not Adam gets, beside its
    masters, the L2 of each per-param state the files hold (`Checkpoint.states`), no update.
    Raises MergeCancelled when `should_stop()` turns true."""
    from zinspect.core import gc_paused
    from zinspect.core.stream import ProgressMeter

    out = OptimizerStats(state_names=list(ADAM_KEYS) if opt.adam else held_states(ckpt))
    paths: dict[str, str] = {}  # rank file name -> its path, made once
    names = [n for n, p in ckpt.params.items() if not p.frozen and p.tied_to is None]
    per_element = 4 * (1 + len(out.state_names))
    meter = ProgressMeter(sum(ckpt.params[n].numel for n in names) * per_element, progress)
    left = iter(names)
    # Millions of fragments, pieces and windows, none in a cycle, beside the checkpoint's own
    # millions of objects: every collection walks them all (measured: a third of the CPU time
    # on a 297k-name checkpoint, streaming included). Reference counting frees them.
    try:
        with gc_paused():
            while batch := _next_batch(ckpt, opt, left, out, paths):
                out.params += _stream(ckpt, opt, out.state_names, batch, meter, should_stop)
    except MergeCancelled as e:
        raise MergeCancelled("optimizer statistics cancelled", "nothing was changed") from e
    if progress is not None:
        progress(meter.total, meter.total, "")  # params left out or without moments: done
    return out


def _next_batch(ckpt: Checkpoint, opt: OptimizerState, names: Iterator[str],
                out: OptimizerStats, paths: dict[str, str]) -> list[tuple[str, list[OutputTensor]]]:
    """The next params to stream, with their state tensors (up to BATCH_PARAMS params or
    BATCH_BYTES bytes); a param that cannot be read goes to `out` with the reason."""
    batch, size = [], 0
    for name in names:
        try:
            parts, why = _state_tensors(ckpt, name, out.state_names, paths)
        except _LeftOut as e:
            out.left_out[name] = str(e)
            continue
        if why:
            out.masters_only[name] = why
        batch.append((name, parts))
        size += sum(t.nbytes for t in parts)
        if len(batch) >= BATCH_PARAMS or size >= BATCH_BYTES:
            break
    return batch


def _stream(ckpt: Checkpoint, opt: OptimizerState, keys: list[str], batch: list, meter,
            should_stop) -> list[ParamOptimStats]:
    """The numbers of a batch of (param, its state tensors: master then `keys`), in one pass of
    the stream."""
    import numpy as np

    from zinspect.core.stats import Scratch, TensorSplitter, TensorStats
    from zinspect.core.stream import copy_tensors

    sums, windows, owners = [], [], []  # owners[i]: (param index, part, parts) of windows[i]
    for name, parts in batch:
        n = parts[0].numel
        update = opt.adam and len(parts) == 3
        sums.append([TensorStats(name, "float32", (n,)) for _ in range(len(parts) + update)])
        for start in range(0, n, WINDOW):
            for i, t in enumerate(parts):
                windows.append(_window(t, start, min(n, start + WINDOW)))
                owners.append((len(sums) - 1, i, len(parts)))
    scratch = Scratch()
    got = [0]  # elements of the current window so far

    def on_data(i: int, data: memoryview) -> None:
        """Each part's elements go straight into its float64 scratch slot (0 master, 1 m, 2 v,
        or the states in order): one pass over the bytes; the window is folded once its last
        part is complete."""
        index, part, nparts = owners[i]
        n = windows[i].numel
        values = np.frombuffer(data, "<f4")
        scratch.get(part, n)[got[0]:got[0] + len(values)] = values
        got[0] += len(values)
        if got[0] < n:
            return
        got[0] = 0
        if part == nparts - 1:
            group = ckpt.params[batch[index][0]].group
            _fold(sums[index], [scratch.get(k, n) for k in range(nparts)], opt.eps(group), scratch,
                  opt.adam)

    if windows:
        copy_tensors(windows, TensorSplitter(windows, on_data), meter, should_stop)
    return [_numbers(ckpt, name, parts[0].numel, s, opt.adam, keys)
            for (name, parts), s in zip(batch, sums, strict=True)]


def _numbers(ckpt: Checkpoint, name: str, numel: int, sums: list, adam: bool,
             keys: list[str]) -> ParamOptimStats:
    read = sums[:3] if adam else sums  # Adam's update is computed from them
    r = ParamOptimStats(name, numel, ckpt.params[name].group, sums[0].l2, sums[0].max_abs,
                        nonfinite=sum(s.nan + s.inf for s in read))
    if adam and len(sums) == 4:
        m, root, update = sums[1:]
        r.exp_avg_l2, r.sqrt_exp_avg_sq_l2 = m.l2, root.l2
        r.update_mean, r.update_max = update.mean, update.max
    elif not adam and len(sums) > 1:
        r.states = {key: s.l2 for key, s in zip(keys, sums[1:], strict=True)}
    return r


class _LeftOut(Exception):
    """A param whose values cannot be read (the message says why)."""


def _state_tensors(ckpt: Checkpoint, name: str, keys: list[str],
                   paths: dict[str, str]) -> tuple[list[OutputTensor], str]:
    """([master] or [master, *states `keys`] of a param as flat fp32 tensors whose elements
    correspond one to one, why the states are not there). Raises _LeftOut when the master does
    not cover the param."""
    p = ckpt.params[name]
    masters = _one_replica(p, ckpt.state_fragments(name, "fp32"))
    want = _numel(p)
    got = sum(f.numel for f in masters)
    if not masters or got != want:
        raise _LeftOut(f"its fp32 master covers {got:,} of {want:,} elements")
    master = _tensor(ckpt, name, "fp32", masters, paths)
    moments = []
    for state in keys:
        frags = _one_replica(p, ckpt.state_fragments(name, state))
        if [(f.shard, f.start, f.numel) for f in frags] != \
                [(f.shard, f.start, f.numel) for f in masters]:
            return [master], (f"its {state} is not located (not described for this layout)"
                              if not frags else
                              f"its {state} is missing on some rank")
        try:
            moments.append(_tensor(ckpt, name, state, frags, paths))
        except _LeftOut as e:
            return [master], str(e)
    return [master, *moments], ""


def _numel(p) -> int:
    """Elements a param's fragments hold: its own, or its tensor-parallel shards' (a
    replicated param once)."""
    if not p.shards or all(s.replicated for s in p.shards.values()):
        return p.numel
    return sum(math.prod(s.shape) for s in p.shards.values() if not s.replicated)


def _one_replica(p, frags: list) -> list:
    """Nonempty fragments in order; of a replicated tensor-parallel param, one tp rank's."""
    frags = [f for f in frags if f.numel]
    if p.shards and all(s.replicated for s in p.shards.values()):
        first = min((f.shard for f in frags if f.shard is not None), default=None)
        frags = [f for f in frags if f.shard == first]
    return sorted(frags, key=lambda f: (f.shard or 0, f.start))


def _tensor(ckpt: Checkpoint, name: str, state: str, frags: list,
            paths: dict[str, str]) -> OutputTensor:
    dtypes = {f.dtype for f in frags}
    if len(dtypes) != 1 or not dtypes <= {"float32", "bfloat16", "float16"}:
        raise _LeftOut(f"its {state} is {'/'.join(sorted(dtypes))}, not one float dtype")
    bad = next((f for f in frags if not f.intact or f.offset is None), None)
    if bad is not None:
        raise _LeftOut(f"its {state} is not all in {shown(bad.file)} (missing or truncated)")
    n = sum(f.numel for f in frags)
    return OutputTensor(name, (n,), "float32", dtypes.pop(),
                        [Piece(_path(ckpt, f.file, paths), f.offset, f.nbytes) for f in frags])


def _path(ckpt: Checkpoint, file: str, paths: dict[str, str]) -> str:
    path = paths.get(file)
    if path is None:
        path = paths[file] = str(ckpt.path / file)
    return path


def _window(t: OutputTensor, start: int, stop: int) -> OutputTensor:
    """Elements [start, stop) of `t` (its pieces hold its elements in order)."""
    size = DTYPE_SIZES[t.src_dtype]
    lo, hi, pos, pieces = start * size, stop * size, 0, []
    for p in t.pieces:
        a, b = max(lo, pos), min(hi, pos + p.nbytes)
        if a < b:
            pieces.append(Piece(p.path, p.offset + a - pos, b - a))
        pos += p.nbytes
        if pos >= hi:
            break
    return OutputTensor(t.name, (stop - start,), t.dtype, t.src_dtype, pieces)


def _fold(sums: list, values: list, eps: float, scratch, adam: bool) -> None:
    """Add one window (float64 master values, and m and v for Adam) to a param's sums:
    master, m, sqrt(v), update; another optimizer's: master and each state."""
    import numpy as np

    if not adam or len(values) < 3:
        for total, part in zip(sums, values, strict=False):
            total.add(part, scratch)
        return
    sums[0].add(values[0], scratch)
    m, v = values[1], values[2]
    sums[1].add(m, scratch)
    with np.errstate(invalid="ignore"):  # a negative v (a corrupt file) is NaN, counted
        s = np.sqrt(v, out=scratch.get(3, len(v)))
    sums[2].add(s, scratch)
    u = np.abs(m, out=scratch.get(4, len(m)))
    with np.errstate(invalid="ignore", divide="ignore"):
        u /= np.add(s, eps, out=scratch.get(5, len(s)))
    sums[3].add(u, scratch)
