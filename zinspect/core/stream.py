"""Execute a merge plan: read exactly the planned bytes and hand them, in output order, to a sink.

Reader threads `preadv` batches of pieces into a fixed ring of reused buffers (memory is bounded by
`depth * chunk`, whatever the model size) while the calling thread converts and writes the
previous batches. preadv and write release the GIL, so reading and writing overlap.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zinspect.core.dtypes import NARROW, narrow
from zinspect.core.plan import OutputTensor
from zinspect.core.verify import FLOAT_DTYPES, Segment, Verification, count_nonfinite
from zinspect.errors import MergeCancelled, UnreadableFile

CHUNK = 2 << 20  # source bytes per batch (2 MiB beat 1 and 4 MiB here: less to zero-fill, as fast)
DEPTH = 8  # batches in flight
READERS = 4  # threads; about one per rank file was fastest on these machines

Progress = Callable[[int, int, str], None]
ShouldStop = Callable[[], bool]


class SourceFiles:
    """Open file descriptors of the rank files, one per path, for positional reads; shared by
    the reader threads (opening is locked: two threads opening one path would leak an fd)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = _open_read(path)
                except OSError as e:
                    raise UnreadableFile(f"{path}: cannot open ({e.strerror})",
                                         "check that the file still exists and is readable") from e
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_read(path: str) -> int:
    """os.open, and on "too many open files" raise the soft limit to the hard one and retry:
    512 ranks with frozen params are 1024 rank files, the common soft limit is 1024."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno != errno.EMFILE or not _raise_open_file_limit():
            raise
        return os.open(path, os.O_RDONLY)


def _raise_open_file_limit() -> bool:
    try:
        import resource
    except ImportError:  # not on this platform
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # an unlimited hard limit is more than the kernel allows
        return False
    return True


@dataclass
class _Batch:
    segments: list[tuple[Segment, str | None]]  # (bytes, tensor whose NaN/Inf they count)
    conversion: tuple[str, str]  # (source dtype, output dtype)
    nbytes: int
    last_name: str


def _batches(tensors: Iterable[OutputTensor], chunk: int,
             verification: Verification | None = None) -> Iterator[_Batch]:
    """Batches of at most `chunk` output-bound bytes; bytes read only for a CRC (gaps between
    pieces) ride along with the batch of the piece after them."""
    segs: list[tuple[Segment, str | None]] = []
    size, conv, name = 0, None, ""
    for t in tensors:
        tconv = (t.src_dtype, t.dtype)
        # a narrowing batch holds one tensor, so that overflows to inf are counted per tensor
        alone = t.dtype in NARROW and t.src_dtype != t.dtype and name != t.name
        # tied aliases re-read their owner's bytes: NaN/Inf are counted under the owner
        counted = t.name if verification is not None and t.tied_to is None and \
            t.src_dtype in FLOAT_DTYPES else None
        pieces = verification.segments_of(t) if verification is not None else \
            [Segment(p.path, p.offset, p.nbytes, None) for p in t.pieces]
        for p in pieces:
            if not p.sink:
                segs.append((p, None))
                conv = conv or tconv
                continue
            off, left = p.offset, p.nbytes
            while left:
                if segs and (conv != tconv or alone or size + min(left, chunk) > chunk):
                    yield _Batch(segs, conv, size, name)
                    segs, size = [], 0
                conv, name, alone = tconv, t.name, False
                n = min(left, chunk - size)
                segs.append((Segment(p.path, off, n, p.check), counted))
                size += n
                off += n
                left -= n
        name = t.name
    if segs:
        yield _Batch(segs, conv, size, name)


_discard = threading.local()  # per reader thread: where bytes read only for a CRC go


def _read_batch(files: SourceFiles, batch: _Batch, buf: bytearray,
                verification: Verification | None = None) -> int:
    """Read the batch into `buf` (output-bound bytes, back to back; returns how many), feeding
    the CRC of each record and counting NaN/Inf as the bytes arrive: here, in the reader
    threads, where zlib.crc32 and preadv run without the GIL."""
    view = memoryview(buf)
    pos = 0
    try:
        for seg, counted in batch.segments:
            if not seg.sink:
                _read_for_check(files, seg, len(buf), verification)
                continue
            _pread_all(files.fd(seg.path), view[pos:pos + seg.nbytes], seg.path, seg.offset)
            data = view[pos:pos + seg.nbytes]
            if seg.check is not None:
                seg.check.feed(seg.offset, data, verification.abort)
                _verdict(seg, verification)
            if counted is not None:
                nan, inf = count_nonfinite(data, batch.conversion[0])
                if nan or inf:
                    verification.add_nonfinite(counted, nan, inf)
            pos += seg.nbytes
    except BaseException:
        if verification is not None:  # readers waiting for these bytes must not wait forever
            verification.abort.set()
        raise
    return pos


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
    buf = getattr(_discard, "buf", None)
    if buf is None or len(buf) < step:
        buf = _discard.buf = bytearray(step)
    view = memoryview(buf)
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
    if src == dst:
        return data, 0
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
    """Stream the bytes of `tensors`, converted to their output dtype, into `sink`, in order."""
    scratch = bytearray(2 * chunk) if any(t.src_dtype != t.dtype for t in tensors) else bytearray()
    verification = meter.verification
    batches = _batches(tensors, chunk, verification)
    with SourceFiles() as files, ThreadPoolExecutor(readers, "zinspect-read") as pool:
        inflight: deque = deque()

        def submit(buf: bytearray) -> None:
            batch = next(batches, None)
            if batch is not None:
                inflight.append((batch, pool.submit(_read_batch, files, batch, buf,
                                                        verification), buf))

        for _ in range(depth):
            submit(bytearray(chunk))
        try:
            while inflight:
                batch, future, buf = inflight.popleft()
                n = future.result()
                out, inf = _convert(batch.conversion, memoryview(buf)[:n], scratch)
                if inf:
                    meter.overflow[batch.last_name] = meter.overflow.get(batch.last_name, 0) + inf
                sink(out)
                meter.add(len(out), batch.last_name)
                if should_stop is not None and should_stop():
                    raise MergeCancelled("merge cancelled; nothing was written")
                submit(buf)
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
