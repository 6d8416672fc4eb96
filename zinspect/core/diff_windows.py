"""`zinspect diff`'s reading: the matched params cut into windows of at most WINDOW bytes a side
(`windows`), and each side's windows read as one stream in its own thread (`Side`), so that the
next windows are read while this one is compared and memory stays bounded whatever the model
size.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

from zinspect.core.diff_values import Facts, window_facts
from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.stats import Scratch
from zinspect.core.stream import ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled

WINDOW = 8 << 20  # bytes per side compared at a time

#: finished windows each side may hold ahead of the comparison (memory: about
#: (QUEUED + 2) * WINDOW per side, the window being filled and the one being compared included)
QUEUED = 1


class Side:
    """One side's windows as one stream: `copy_tensors` over all of them in a thread, each
    finished window handed to the comparison through a small queue, so the next windows are
    read while this one is compared (a diff costs about one read of A and B). A's thread also
    counts NaN/Inf and the squares ||a||^2 needs in each window it hands over (numpy runs
    without the GIL, beside the comparison, on the second core); B's are A's where the bytes
    are the same (the usual case), so B's thread only reads. The QUEUED + 2 window buffers are
    reused (`release`): a fresh 8 MiB buffer a window cost more in page faults than the copy."""

    def __init__(self, windows: list[list[OutputTensor]], stop: threading.Event,
                 should_stop: ShouldStop | None, facts: bool) -> None:
        self.windows = windows
        self.sizes = [sum(t.nbytes for t in w) for w in windows]
        self.stop, self.should_stop, self.facts = stop, should_stop, facts
        self.queue: queue.Queue = queue.Queue(QUEUED)
        self.free: queue.Queue = queue.Queue()  # buffers the comparison is done with
        self._made = 0
        self.scratch = Scratch()  # this thread's own
        self._buf, self._pos, self._i = None, 0, 0

    def run(self) -> None:
        try:
            copy_tensors([t for w in self.windows for t in w], self._sink,
                         ProgressMeter(0, None), self._stopping)
        except BaseException as e:  # handed to the comparison, which raises it
            self._put(e)

    def _stopping(self) -> bool:
        return self.stop.is_set() or (self.should_stop is not None and self.should_stop())

    def _sink(self, data: memoryview) -> None:
        while len(data):
            if self._buf is None:
                self._buf, self._pos = self._take()[:self.sizes[self._i]], 0
            n = min(len(data), len(self._buf) - self._pos)
            self._buf[self._pos:self._pos + n] = data[:n]
            self._pos += n
            data = data[n:]
            if self._pos == len(self._buf):
                facts = None
                if self.facts:
                    facts, pos = [], 0
                    for t in self.windows[self._i]:
                        facts.append(window_facts(self._buf[pos:pos + t.nbytes], t.dtype, self.scratch))
                        pos += t.nbytes
                self._put((self._buf, facts))
                self._buf, self._i = None, self._i + 1

    def _take(self) -> memoryview:
        if self._made < QUEUED + 2:  # filled, queued, compared
            self._made += 1
            return memoryview(bytearray(max(self.sizes)))
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                pass
        raise MergeCancelled("the diff was cancelled")

    def release(self, buf: memoryview) -> None:
        """The comparison is done with `buf` (a window `get` returned): it may be filled again."""
        self.free.put(memoryview(buf.obj))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                pass
        raise MergeCancelled("the diff was cancelled")

    def get(self) -> tuple[memoryview, list[Facts] | None]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def windows(pairs):
    """Batches of (ParamDiff, A window, B window, first element) of at most WINDOW bytes a side."""
    batch, size = [], 0
    for p, ta, tb in pairs:
        item = max(DTYPE_SIZES[ta.dtype], DTYPE_SIZES[tb.dtype])
        step = max(1, WINDOW // item)
        for start in range(0, ta.numel, step):
            stop = min(ta.numel, start + step)
            if batch and size + (stop - start) * item > WINDOW:
                yield batch
                batch, size = [], 0
            batch.append((p, _window(ta, start, stop), _window(tb, start, stop), start))
            size += (stop - start) * item
    if batch:
        yield batch


def _window(t: OutputTensor, start: int, stop: int) -> OutputTensor:
    """Elements [start, stop) of `t`, as a flat tensor with the pieces that hold them."""
    item = DTYPE_SIZES[t.src_dtype]
    lo, hi = start * item, stop * item
    pieces, pos = [], 0
    for piece in t.pieces:
        a, b = max(lo, pos), min(hi, pos + piece.nbytes)
        if a < b:
            pieces.append(Piece(piece.path, piece.offset + a - pos, b - a))
        pos += piece.nbytes
    return replace(t, shape=(stop - start,), pieces=pieces, tied_to=None)
