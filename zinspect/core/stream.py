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
    segments: list[tuple[str, int, int]]  # (path, offset, nbytes)
    conversion: tuple[str, str]  # (source dtype, output dtype)
    nbytes: int
    last_name: str


def _batches(tensors: Iterable[OutputTensor], chunk: int) -> Iterator[_Batch]:
    segs: list[tuple[str, int, int]] = []
    size, conv, name = 0, None, ""
    for t in tensors:
        tconv = (t.src_dtype, t.dtype)
        # a narrowing batch holds one tensor, so that overflows to inf are counted per tensor
        alone = t.dtype in NARROW and t.src_dtype != t.dtype and name != t.name
        for p in t.pieces:
            off, left = p.offset, p.nbytes
            while left:
                if segs and (conv != tconv or alone or size + min(left, chunk) > chunk):
                    yield _Batch(segs, conv, size, name)
                    segs, size = [], 0
                conv, name, alone = tconv, t.name, False
                n = min(left, chunk - size)
                segs.append((p.path, off, n))
                size += n
                off += n
                left -= n
        name = t.name
    if segs:
        yield _Batch(segs, conv, size, name)


def _read_batch(files: SourceFiles, batch: _Batch, buf: bytearray) -> int:
    view = memoryview(buf)
    pos = 0
    for path, offset, nbytes in batch.segments:
        fd = files.fd(path)
        end = pos + nbytes
        while pos < end:
            n = os.preadv(fd, [view[pos:end]], offset)
            if n <= 0:
                raise UnreadableFile(f"{path}: ended at byte {offset:,} while reading "
                                     f"{nbytes:,} bytes", "the file is truncated; copy it again")
            pos += n
            offset += n
    return pos


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
    batches = _batches(tensors, chunk)
    with SourceFiles() as files, ThreadPoolExecutor(readers, "zinspect-read") as pool:
        inflight: deque = deque()

        def submit(buf: bytearray) -> None:
            batch = next(batches, None)
            if batch is not None:
                inflight.append((batch, pool.submit(_read_batch, files, batch, buf), buf))

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
