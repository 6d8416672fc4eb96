"""Per trainable param: the size of its fp32 master, its Adam moments and Adam's update,
streamed with bounded memory and cancellable (the app's optimizer view, `optimizer_stats`).

The update size |m| / (sqrt(v) + eps) is Adam's step per element before the learning rate and
bias correction: a param whose update is out of line with the others' is where a diverging
run blew up. The bytes are located by the core (`Checkpoint.state_fragments`) and read by the
merge's stream engine; the sums are stats.TensorStats'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.optimizer import ADAM_KEYS, OptimizerState
from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled

WINDOW = 1 << 18  # elements of each of master / exp_avg / exp_avg_sq held at once


@dataclass
class ParamOptimStats:
    """A trainable param's fp32 master, Adam moments and update size (None: not saved)."""

    name: str
    numel: int
    group: int | None
    master: object  # stats.TensorStats of the master values
    exp_avg: object | None = None  # of m
    sqrt_exp_avg_sq: object | None = None  # of sqrt(v)
    update: object | None = None  # of |m| / (sqrt(v) + eps)

    @property
    def nonfinite(self) -> int:
        parts = [s for s in (self.master, self.exp_avg, self.sqrt_exp_avg_sq) if s is not None]
        return sum(s.nan + s.inf for s in parts)


@dataclass
class OptimizerStats:
    params: list[ParamOptimStats] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # param -> why its values are not read
    masters_only: dict[str, str] = field(default_factory=dict)  # param -> why no moments


def optimizer_stats(ckpt: Checkpoint, opt: OptimizerState,
                    progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> OptimizerStats:
    """Per trainable param (model order): L2 and max |x| of its fp32 master, exp_avg and
    sqrt(exp_avg_sq), and mean / max of |m| / (sqrt(v) + eps) with its group's eps.

    Each param's elements are located by `Checkpoint.state_fragments` (any layout the core
    describes; a replicated tensor-parallel param counted once) and streamed by the merge's
    engine in windows of WINDOW elements, master then m then v of one window, so the update
    is computed element by element with bounded memory. These are order-free sums, so the
    fragments need not be laid out as the full tensor. A param whose master is not all in the
    files is left out, one whose moments are not gets its master's numbers; both with the
    reason. Raises MergeCancelled when `should_stop()` turns true."""
    from zinspect.core.stats import Scratch, TensorSplitter, TensorStats
    from zinspect.core.stream import ProgressMeter, copy_tensors

    out = OptimizerStats()
    windows, owners = [], []  # owners[i]: (result index, part, parts) of windows[i]
    for name, p in ckpt.params.items():
        if p.frozen or p.tied_to is not None:
            continue
        try:
            parts, why = _state_tensors(ckpt, name, opt.adam)
        except _LeftOut as e:
            out.left_out[name] = str(e)
            continue
        if why:
            out.masters_only[name] = why
        n = parts[0].numel
        r = ParamOptimStats(name, n, p.group, *(TensorStats(name, "float32", (n,)) for _ in
                                                  range(len(parts) + (len(parts) == 3))))
        for start in range(0, n, WINDOW):
            for i, t in enumerate(parts):
                windows.append(_window(t, start, min(n, start + WINDOW)))
                owners.append((len(out.params), i, len(parts)))
        out.params.append(r)

    import numpy as np

    scratch = Scratch()
    got = [0]  # elements of the current window so far

    def on_data(i: int, data: memoryview) -> None:
        """Each part's elements go straight into its float64 scratch slot (0 master, 1 m, 2 v):
        one pass over the bytes; the window is folded once its v is complete."""
        r_index, part, nparts = owners[i]
        n = windows[i].numel
        values = np.frombuffer(data, "<f4")
        scratch.get(part, n)[got[0]:got[0] + len(values)] = values
        got[0] += len(values)
        if got[0] < n:
            return
        got[0] = 0
        if part == nparts - 1:
            r = out.params[r_index]
            _fold(r, [scratch.get(k, n) for k in range(nparts)], opt.eps(r.group), scratch)

    meter = ProgressMeter(sum(w.nbytes for w in windows), progress)
    try:
        copy_tensors(windows, TensorSplitter(windows, on_data), meter, should_stop)
    except MergeCancelled as e:
        raise MergeCancelled("optimizer statistics cancelled", "nothing was changed") from e
    return out


class _LeftOut(Exception):
    """A param whose values cannot be read (the message says why)."""


def _state_tensors(ckpt: Checkpoint, name: str, adam: bool) -> tuple[list[OutputTensor], str]:
    """([master] or [master, exp_avg, exp_avg_sq] of a param as flat fp32 tensors whose
    elements correspond one to one, why the moments are not there). Raises _LeftOut when the
    master does not cover the param."""
    p = ckpt.params[name]
    masters = _one_replica(p, ckpt.state_fragments(name, "fp32"))
    want = _numel(p)
    got = sum(f.numel for f in masters)
    if not masters or got != want:
        raise _LeftOut(f"its fp32 master covers {got:,} of {want:,} elements")
    master = _tensor(ckpt, name, "fp32", masters)
    if not adam:
        return [master], ""
    moments = []
    for state in ADAM_KEYS:
        frags = _one_replica(p, ckpt.state_fragments(name, state))
        if [(f.shard, f.start, f.numel) for f in frags] != \
                [(f.shard, f.start, f.numel) for f in masters]:
            return [master], (f"its {state} is not located (not described for this layout)"
                              if not frags else
                              f"its {state} is missing on some rank")
        try:
            moments.append(_tensor(ckpt, name, state, frags))
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


def _tensor(ckpt: Checkpoint, name: str, state: str, frags: list) -> OutputTensor:
    dtypes = {f.dtype for f in frags}
    if len(dtypes) != 1 or not dtypes <= {"float32", "bfloat16", "float16"}:
        raise _LeftOut(f"its {state} is {'/'.join(sorted(dtypes))}, not one float dtype")
    bad = next((f for f in frags if not f.intact or f.offset is None), None)
    if bad is not None:
        raise _LeftOut(f"its {state} is not all in {shown(bad.file)} (missing or truncated)")
    n = sum(f.numel for f in frags)
    return OutputTensor(name, (n,), "float32", dtypes.pop(),
                        [Piece(str(ckpt.path / f.file), f.offset, f.nbytes) for f in frags])


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


def _fold(r: ParamOptimStats, values: list, eps: float, scratch) -> None:
    """Add one window (float64 master values, and m and v for Adam) to a param's sums."""
    import numpy as np

    r.master.add(values[0], scratch)
    if len(values) < 3:
        return
    m, v = values[1], values[2]
    r.exp_avg.add(m, scratch)
    with np.errstate(invalid="ignore"):  # a negative v (a corrupt file) is NaN, counted
        s = np.sqrt(v, out=scratch.get(3, len(v)))
    r.sqrt_exp_avg_sq.add(s, scratch)
    u = np.abs(m, out=scratch.get(4, len(m)))
    with np.errstate(invalid="ignore", divide="ignore"):
        u /= np.add(s, eps, out=scratch.get(5, len(s)))
    r.update.add(u, scratch)
