"""How a data.pkl's bytes are kept while it is unpickled: small ones whole, and shared by
`PickleMemo` between files that hold the very same pickle; large ones in chunks, freed as the C
unpickler reads them.

At 297k names rank 0's model-states pickle is 47 MB; read whole, it stays alive until the
unpickler's memo peaks (the end of the load). Read as chunks of `PICKLE_CHUNK_BYTES`, scanned as
they come (fastpickle.prepare_chunks_for_c) and dropped by PiecesReader once read, it is gone by
then. Every byte is still read, and CRC-checked, before the C unpickler starts. One whose first
chunk holds a run of ZeRO-3 placeholder entries is read whole instead (pickle_runs: the runs'
bytes are gone before the C unpickler starts, and so is most of its memo).
"""

from __future__ import annotations

import mmap
import threading
import zlib

#: PickleMemo keeps pickles up to this size, and up to this many bytes of them in all
MEMO_PICKLE_BYTES = 4 << 20
MEMO_TOTAL_BYTES = 16 << 20
#: a data.pkl larger than this (and than what the memo keeps) is read in chunks of this size
PICKLE_CHUNK_BYTES = 1 << 20
#: a chunk's anonymous map, its pages faulted in at once where the system can (the read of a
#: 47 MB pickle 0.047 -> 0.030 s thread CPU, the page faults one by one cost more than the copy)
_MAP = ({"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE}
        if hasattr(mmap, "MAP_POPULATE") else {})


def read_at(f, start: int, nbytes: int) -> bytes | None:
    """The `nbytes` bytes from `start` of the file `f`, whole (None if the file ends first)."""
    f.seek(start)
    data = f.read(nbytes)
    return data if len(data) == nbytes else None


class RecordChunks:
    """The `nbytes` bytes from `start` of the file `f`, as chunks of `chunk` bytes (the last
    shorter) for fastpickle.prepare_chunks_for_c, their CRC-32 computed as they are read. Each
    is an anonymous mmap, given back to the system once unused: freed heap blocks of a MiB are
    kept by malloc (the chunks' memory would stay in the process's RSS, taken by nothing)."""

    def __init__(self, f, start: int, nbytes: int, chunk: int = PICKLE_CHUNK_BYTES) -> None:
        self._f, self.nbytes, self.chunk, self.read, self.crc = f, nbytes, chunk, 0, 0
        self.short = False  # the file ended first
        self._peeked: mmap.mmap | None = None
        f.seek(start)

    def peek(self) -> mmap.mmap | None:
        """The first chunk, read now; the first call gives it (not read again)."""
        self._peeked = self(b"")
        return self._peeked

    def __call__(self, carry: bytes) -> mmap.mmap | None:
        """The next chunk with `carry` in front of it, or None after the last."""
        if self._peeked is not None:  # (the first call: no carry yet)
            window, self._peeked = self._peeked, None
            return window
        n = min(self.chunk, self.nbytes - self.read)
        if n <= 0 or self.short:
            return None
        window = mmap.mmap(-1, len(carry) + n, **_MAP)
        window.write(carry)
        view, got = memoryview(window)[len(carry):], 0
        while got < n:
            more = self._f.readinto(view[got:])
            if not more:
                self.short = True
                return None
            got += more
        self.crc = zlib.crc32(view, self.crc)
        self.read += n
        view.release()
        return window

    def intact(self, crc: int) -> bool:
        """Read what is left (unkept): whether all `nbytes` were there and have CRC-32 `crc`."""
        while self(b"") is not None:
            pass
        return not self.short and self.crc == crc


class PickleMemo:
    """Pickles already read, by their bytes: the optimizer files of all ZeRO-3 ranks hold the
    very same data.pkl (their bytes differ only in the tensor records), so a 512-rank checkpoint
    unpickles it once, not 512 times; a pipeline x tensor-parallel run's files repeat one pickle
    per (stage, tp rank) slice (64 distinct among 512 in a tp 8 x pp 4 x dp 16 run). The results
    are shared read-only. Only small pickles are kept, `total_bytes` of them in all, so what it
    holds stays bounded (ZeRO-1/2 ranks' pickles all differ: those simply miss)."""

    def __init__(self, max_bytes: int = MEMO_PICKLE_BYTES,
                 total_bytes: int = MEMO_TOTAL_BYTES) -> None:
        self.max_bytes, self.room = max_bytes, total_bytes
        self._seen: dict[bytes, tuple] = {}
        self._lock = threading.Lock()

    def get(self, raw: bytes) -> tuple | None:
        return self._seen.get(raw) if len(raw) <= self.max_bytes else None

    def put(self, raw: bytes, parsed: tuple) -> None:
        with self._lock:
            if len(raw) <= min(self.max_bytes, self.room) and raw not in self._seen:
                self._seen[raw] = parsed
                self.room -= len(raw)
