"""Per trainable param: the size of its fp32 master, its Adam moments and Adam's update,
streamed with bounded memory and cancellable (the app's optimizer view, `optimizer_stats`).

The update size |m| / (sqrt(v) + eps) is Adam's step per element before the learning rate and
bias correction: a param whose update is out of line with the others' is where a diverging
run blew up. The bytes are the merge's (plan_merge masters, sources.moment_tensors moments),
read by its stream engine; the sums are stats.TensorStats'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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

    def to_json(self) -> dict:
        def part(s):
            return None if s is None else {"l2": s.l2, "max_abs": _nan_none(s.max_abs),
                                           "mean": _nan_none(s.mean), "nan": s.nan, "inf": s.inf}
        return {"name": self.name, "numel": self.numel, "group": self.group,
                "master": part(self.master), "exp_avg": part(self.exp_avg),
                "sqrt_exp_avg_sq": part(self.sqrt_exp_avg_sq), "update": part(self.update)}


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def optimizer_stats(ckpt: Checkpoint, opt: OptimizerState,
                    progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> list[ParamOptimStats]:
    """Per trainable param (model order): L2 and max |x| of its fp32 master, exp_avg and
    sqrt(exp_avg_sq), and mean / max of |m| / (sqrt(v) + eps) with its group's eps.

    The bytes come from the merge's stream engine as windows of WINDOW elements, master then
    m then v of one window, so the update is computed element by element with bounded memory.
    Raises NotMergeable / UnreadableFile (located) when the values cannot be read, and
    MergeCancelled when `should_stop()` turns true."""
    from zinspect.core.plan import plan_merge
    from zinspect.core.sources import moment_tensors
    from zinspect.core.stats import Scratch, TensorSplitter, TensorStats
    from zinspect.core.stream import ProgressMeter, copy_tensors

    trainable = {n for n, p in ckpt.params.items() if not p.frozen and p.tied_to is None}
    masters = [t for t in plan_merge(ckpt).tensors if t.name in trainable and t.tied_to is None]
    moments: dict[str, dict[str, OutputTensor]] = {}
    if opt.adam:
        for t in moment_tensors(ckpt):
            name, key = t.name.rsplit(":", 1)
            moments.setdefault(name, {})[key] = t
    results, windows, owners = [], [], []  # owners[i]: (result index, part) of windows[i]
    for t in masters:
        p = ckpt.params[t.name]
        m = moments.get(t.name, {})
        adam = all(k in m for k in ADAM_KEYS)
        r = ParamOptimStats(t.name, t.numel, p.group, TensorStats(t.name, "float32", t.shape))
        if adam:
            r.exp_avg, r.sqrt_exp_avg_sq, r.update = (
                TensorStats(t.name, "float32", t.shape) for _ in range(3))
        for start in range(0, t.numel, WINDOW):
            stop = min(t.numel, start + WINDOW)
            parts = [t, m["exp_avg"], m["exp_avg_sq"]] if adam else [t]
            for i, part in enumerate(parts):
                windows.append(_window(part, start, stop))
                owners.append((len(results), i, len(parts)))
        results.append(r)

    scratch = Scratch()
    held = [bytearray(), bytearray(), bytearray()]  # one window's master, m and v bytes
    got = [0]  # bytes of the current window so far

    def on_data(i: int, data: memoryview) -> None:
        r_index, part, nparts = owners[i]
        held[part] += data
        got[0] += len(data)
        if got[0] < windows[i].nbytes:
            return
        got[0] = 0
        if part == nparts - 1:
            r = results[r_index]
            _fold(r, held[:nparts], opt.eps(r.group), scratch)
            for buf in held:
                buf.clear()

    meter = ProgressMeter(sum(w.nbytes for w in windows), progress)
    try:
        copy_tensors(windows, TensorSplitter(windows, on_data), meter, should_stop)
    except MergeCancelled as e:
        raise MergeCancelled("optimizer statistics cancelled", "nothing was changed") from e
    return results


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


def _fold(r: ParamOptimStats, held: list[bytearray], eps: float, scratch) -> None:
    """Add one window (master bytes, and m and v bytes for Adam) to a param's statistics."""
    import numpy as np

    from zinspect.core.stats import as_float64

    x = as_float64(held[0], "float32", scratch, 0)
    r.master.add(x, scratch)
    if len(held) < 3:
        return
    m = as_float64(held[1], "float32", scratch, 1)
    v = as_float64(held[2], "float32", scratch, 2)
    r.exp_avg.add(m, scratch)
    with np.errstate(invalid="ignore"):  # a negative v (a corrupt file) is NaN, counted
        s = np.sqrt(v, out=scratch.get(3, len(v)))
    r.sqrt_exp_avg_sq.add(s, scratch)
    u = np.abs(m, out=scratch.get(4, len(m)))
    with np.errstate(invalid="ignore", divide="ignore"):
        u /= np.add(s, eps, out=scratch.get(5, len(s)))
    r.update.add(u, scratch)
