"""Execute a merge plan: read exactly the planned bytes and hand them, in output order, to a sink.

Reader threads `preadv` batches of pieces into a fixed ring of reused buffers (memory is bounded by
`depth * chunk` (3x with a dtype conversion or a weave), whatever the model size), check them,
interleave tensor-parallel rows and convert the dtype, while the calling thread writes the
previous batches. preadv, crc32, numpy's casts and write release the GIL, so they overlap.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zinspect.core.drift import difference
from zinspect.core.dtypes import NARROW, narrow
from zinspect.core.plan import OutputTensor, Weave
from zinspect.core.readfiles import SourceFiles
from zinspect.core.verify import FLOAT_DTYPES, Segment, Verification, count_nonfinite, plain_segments
from zinspect.core.weave import weave
from zinspect.errors import MergeCancelled, UnreadableFile

CHUNK = 2 << 20  # source bytes per batch (2 MiB beat 1 and 4 MiB here: less to zero-fill, as fast)
DEPTH = 8  # batches in flight
READERS = 4  # threads; about one per rank file was fastest on these machines

Progress = Callable[[int, int, str], None]
ShouldStop = Callable[[], bool]


@dataclass
class _Batch:
    segments: list[tuple[Segment, str | None]]  # (bytes, tensor whose NaN/Inf they count)
    conversion: tuple[str, str]  # (source dtype, output dtype)
    nbytes: int
    last_name: str
    weave: Weave | None = None  # interleave what was read into rows (a dim-1 tp split)
    counted: str | None = None  # a woven batch's NaN/Inf are counted on its rows, for this
    #: a replica's batch: the written copy's bytes at the same places, compared, never written
    compare: list[Segment] | None = None
    replica: int | None = None


class _Batcher:
    """Cuts the segments of tensors, in output order, into batches of at most `chunk`
    output-bound bytes; bytes read only for a CRC (gaps between pieces) ride along with the
    batch of the piece after them. A weave block is one batch; a replica's bytes are batches
    of their own, with the written copy's bytes to compare them with."""

    def __init__(self, chunk: int, verification: Verification | None) -> None:
        self.chunk, self.verification = chunk, verification
        self.segs: list[tuple[Segment, str | None]] = []
        self.size, self.conv, self.name = 0, None, ""

    def flush(self) -> Iterator[_Batch]:
        if self.segs:
            yield _Batch(self.segs, self.conv, self.size, self.name)
            self.segs, self.size = [], 0

    def batches(self, tensors: Iterable[OutputTensor]) -> Iterator[_Batch]:
        for t in tensors:
            # without a verification no drift is recorded: the copies a merge compares
            # (`mirrors`) are not read (stats, diff, optimizer: a tied embedding twice over)
            for m in t.streamed() if self.verification is not None else (t,):
                segs = self.verification.segments_of(m) if self.verification is not None \
                    else plain_segments(m)
                if m.replica is not None:
                    yield from self.flush()
                    yield from self._replica(m, t, segs)
                else:
                    yield from self._tensor(m, segs)
        yield from self.flush()

    def _tensor(self, t: OutputTensor, segs: list[Segment]) -> Iterator[_Batch]:
        tconv = (t.src_dtype, t.dtype)
        # a narrowing batch holds one tensor, so that overflows to inf are counted per tensor
        alone = t.dtype in NARROW and t.src_dtype != t.dtype and self.name != t.name
        # tied aliases re-read their owner's bytes: NaN/Inf are counted under the owner
        counted = t.name if self.verification is not None and t.tied_to is None and \
            t.src_dtype in FLOAT_DTYPES else None
        weaves = dict(t.weaves)
        i = 0
        while i < len(segs):
            w = weaves.get(segs[i].piece)
            if w is not None:
                first = segs[i].piece
                j = i
                while j < len(segs) and segs[j].piece < first + w.npieces:
                    j += 1
                yield from self.flush()
                block = segs[i:j]
                yield _Batch([(s, None) for s in block], tconv, sum(s.nbytes for s in block
                                                                    if s.sink),
                             t.name, w, counted)
                self.conv, self.name, alone = tconv, t.name, False
                i = j
                continue
            yield from self._add(segs[i], counted, tconv, t.name, alone)
            alone = alone and not segs[i].sink
            i += 1
        self.name = t.name

    def _add(self, p: Segment, counted: str | None, tconv, name: str,
             alone: bool) -> Iterator[_Batch]:
        if not p.sink:
            self.segs.append((p, None))
            self.conv = self.conv or tconv
            return
        off, left, chunk = p.offset, p.nbytes, self.chunk
        while left:
            if self.segs and (self.conv != tconv or alone or self.size + min(left, chunk) > chunk):
                yield from self.flush()
            self.conv, self.name, alone = tconv, name, False
            n = min(left, chunk - self.size)
            self.segs.append((Segment(p.path, off, n, p.check, piece=p.piece), counted))
            self.size += n
            off += n
            left -= n

    def _replica(self, m: OutputTensor, owner: OutputTensor,
                 segs: list[Segment]) -> Iterator[_Batch]:
        pos = 0  # byte of the tensor the replica's next byte is
        batch: list[tuple[Segment, str | None]] = []
        size, chunk = 0, self.chunk

        def cut() -> _Batch:
            return _Batch(batch, (m.src_dtype, m.src_dtype), size, owner.name,
                          compare=_byte_range(owner, pos - size, size), replica=m.replica)

        for p in segs:
            if not p.sink:
                batch.append((p, None))
                continue
            off, left = p.offset, p.nbytes
            while left:
                if size == chunk:
                    yield cut()
                    batch, size = [], 0
                n = min(left, chunk - size)
                batch.append((Segment(p.path, off, n, p.check, piece=p.piece), None))
                size, pos, off, left = size + n, pos + n, off + n, left - n
        if batch:
            yield cut()


def _byte_range(t: OutputTensor, start: int, n: int) -> list[Segment]:
    """Segments of bytes [start, start + n) of a tensor of plain pieces."""
    out, pos = [], 0
    for p in t.pieces:
        lo, hi = max(start, pos), min(start + n, pos + p.nbytes)
        if lo < hi:
            out.append(Segment(p.path, p.offset + lo - pos, hi - lo, None))
        pos += p.nbytes
    return out


_local = threading.local()  # per reader thread: scratch for bytes read only for a CRC, weaves


def _scratch(attr: str, size: int) -> bytearray:
    buf = getattr(_local, attr, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_local, attr, buf)
    return buf


class _Slot:
    """One buffer of the ring: what is read, and (allocated when first needed) where it is
    woven or converted to."""

    def __init__(self, chunk: int) -> None:
        self.buf = bytearray(chunk)
        self._alt = bytearray()

    def alt(self, size: int) -> bytearray:
        if len(self._alt) < size:
            self._alt = bytearray(size)
        return self._alt


def _read_batch(files: SourceFiles, batch: _Batch, slot: _Slot,
                verification: Verification | None = None) -> tuple[memoryview, int]:
    """Read the batch (output-bound bytes back to back), feeding the CRC of each record and
    counting NaN/Inf as the bytes arrive, then weave it and convert it to the output dtype:
    all here, in the reader threads, where preadv, zlib.crc32 and numpy run without the GIL.
    Returns (the output bytes, finite values that overflowed to inf when narrowing)."""
    if batch.nbytes > len(slot.buf):  # a weave block planned for a larger chunk
        slot.buf = bytearray(batch.nbytes)
    view = memoryview(slot.buf)
    pos = 0
    try:
        for seg, counted in batch.segments:
            if not seg.sink:
                _read_for_check(files, seg, len(slot.buf), verification)
                continue
            _pread_all(files.fd(seg.path), view[pos:pos + seg.nbytes], seg.path, seg.offset)
            data = view[pos:pos + seg.nbytes]
            if seg.check is not None:
                seg.check.feed(seg.offset, data, verification.abort)
                _verdict(seg, verification)
            if counted is not None:
                _count(verification, counted, data, batch.conversion[0])
            pos += seg.nbytes
        data = view[:pos]
        if batch.compare is not None:
            _compare(files, batch, data, verification)
            return data[:0], 0
        src, dst = batch.conversion
        if batch.weave is not None:
            out = _scratch("woven", pos) if src != dst else slot.alt(pos)
            data = memoryview(out)[:weave(data, batch.weave, out)]
            if batch.counted is not None:
                _count(verification, batch.counted, data, src)
        if src == dst:
            return data, 0
        return _convert(batch.conversion, data, slot.alt(2 * len(data)))
    except BaseException:
        if verification is not None:  # readers waiting for these bytes must not wait forever
            verification.abort.set()
        raise


def _count(verification: Verification, name: str, data: memoryview, dtype: str) -> None:
    nan, inf = count_nonfinite(data, dtype)
    if nan or inf:
        verification.add_nonfinite(name, nan, inf)


def _compare(files: SourceFiles, batch: _Batch, data: memoryview,
             verification: Verification | None) -> None:
    """A replica's bytes against the written copy's (read again: the page cache has them)."""
    ref = memoryview(_scratch("reference", len(data)))
    pos = 0
    for seg in batch.compare:
        _pread_all(files.fd(seg.path), ref[pos:pos + seg.nbytes], seg.path, seg.offset)
        pos += seg.nbytes
    diff = difference(data, ref[:pos], batch.conversion[0])
    if diff is not None and verification is not None:
        verification.add_drift(batch.last_name, batch.replica, diff)


def _pread_all(fd: int, view: memoryview, path: str, offset: int) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            raise UnreadableFile(f"{path}: ended at byte {offset + pos:,} while reading "
                                 f"{len(view):,} bytes", "the file is truncated; copy it again")
        pos += n


def _read_for_check(files: SourceFiles, seg: Segment, step: int,
                    verification: Verification) -> None:
    view = memoryview(_scratch("discard", step))
    done = 0
    while done < seg.nbytes:
        n = min(step, seg.nbytes - done)
        _pread_all(files.fd(seg.path), view[:n], seg.path, seg.offset + done)
        seg.check.feed(seg.offset + done, view[:n], verification.abort)
        done += n
    _verdict(seg, verification)


def _verdict(seg: Segment, verification: Verification) -> None:
    """A record whose last byte just came in and fails its CRC stops the merge at once, but
    under --salvage the stream goes on (the merge restarts without its params)."""
    if seg.check.failed and not verification.salvage:
        raise verification.refuse(seg.check)


def _convert(conversion: tuple[str, str], data: memoryview,
             scratch: bytearray) -> tuple[memoryview, int]:
    """(converted bytes, finite values that overflowed to inf). 16-bit floats to fp32 without
    torch: bf16 is the high half of an fp32; fp16 via struct. To 16 bits: `dtypes.narrow`."""
    src, dst = conversion
    if dst in NARROW:
        return narrow(src, dst, data, scratch)
    n = len(data) // 2
    if (src, dst) == ("bfloat16", "float32"):
        out = memoryview(scratch)[: 4 * n]
        out[0::4] = out[1::4] = bytes(n)
        out[2::4] = data[0::2]
        out[3::4] = data[1::2]
        return out, 0
    if (src, dst) == ("float16", "float32"):
        step = 1 << 16  # elements per struct call: bounds the temporary tuple of floats
        for i in range(0, n, step):
            k = min(step, n - i)
            struct.pack_into(f"<{k}f", scratch, 4 * i,
                             *struct.unpack_from(f"<{k}e", data, 2 * i))
        return memoryview(scratch)[: 4 * n], 0
    raise ValueError(f"no conversion from {src} to {dst}")


class ProgressMeter:
    """Calls `progress` at most ~20 times a second, and always on the last byte."""

    def __init__(self, total: int, progress: Progress | None, interval: float = 0.05) -> None:
        self.total, self.progress, self.interval = total, progress, interval
        self.done, self._last = 0, 0.0
        self.overflow: dict[str, int] = {}  # tensor name -> finite values written as +-inf
        #: what the stream checks as it reads (CRCs, NaN/Inf counts), across all shards
        self.verification: Verification | None = None

    def add(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self.progress(self.done, self.total, name)


def copy_tensors(tensors: list[OutputTensor], sink: Callable[[memoryview], None],
                 meter: ProgressMeter, should_stop: ShouldStop | None = None,
                 chunk: int = CHUNK, depth: int = DEPTH, readers: int = READERS) -> None:
    """Stream the bytes of `tensors`, converted to their output dtype, into `sink`, in order.
    The reader threads read, check, weave and convert; this thread only writes."""
    verification = meter.verification
    batches = _Batcher(chunk, verification).batches(tensors)
    with SourceFiles() as files, ThreadPoolExecutor(readers, "zinspect-read") as pool:
        inflight: deque = deque()

        def submit(slot: _Slot) -> None:
            batch = next(batches, None)
            if batch is not None:
                inflight.append((batch, pool.submit(_read_batch, files, batch, slot,
                                                        verification), slot))

        for _ in range(depth):
            submit(_Slot(chunk))
        try:
            while inflight:
                batch, future, slot = inflight.popleft()
                out, inf = future.result()
                if inf:
                    meter.overflow[batch.last_name] = meter.overflow.get(batch.last_name, 0) + inf
                if len(out):
                    sink(out)
                meter.add(len(out), batch.last_name)
                if should_stop is not None and should_stop():
                    raise MergeCancelled("merge cancelled; nothing was written")
                submit(slot)
        except BaseException:
            if verification is not None:
                verification.abort.set()
            raise
        finally:
            for _, future, _ in inflight:
                future.cancel()
            for _, future, _ in inflight:
                if not future.cancelled():
                    future.exception()  # wait: the fds close after the reads end


def fd_sink(fd: int) -> Callable[[memoryview], None]:
    def write(data: memoryview) -> None:
        while len(data):
            data = data[os.write(fd, data):]
    return write


class BufferSink:
    """Fills one bytearray per tensor, in order (for in-memory results and torch output)."""

    def __init__(self, tensors: list[OutputTensor]) -> None:
        self.buffers = [bytearray(t.nbytes) for t in tensors]
        self._i, self._pos = 0, 0

    def __call__(self, data: memoryview) -> None:
        while len(data):
            while self._pos == len(self.buffers[self._i]):
                self._i, self._pos = self._i + 1, 0
            buf = self.buffers[self._i]
            n = min(len(data), len(buf) - self._pos)
            buf[self._pos:self._pos + n] = data[:n]
            self._pos += n
            data = data[n:]
