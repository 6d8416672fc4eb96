"""The CRC32 check of a reshard's reads, whatever order they come in.

A reshard reads the source records out of order: at ZeRO-3 new rank r takes the first part of
every param's share from old rank k's flat partition, rank r+1 the rest, so record k's bytes
arrive interleaved across two output files. The merge's in-order check (`zinspect.core.verify`)
re-reads such a record whole when it is small and names it unverified when it is not; here each
piece's CRC is computed as it is read and joined with its neighbours' by `crc32_combine` (zlib's
algorithm: the first CRC shifted by the second piece's length, multiplied mod the CRC
polynomial), so a record is verified once all its bytes were read once, in any order and in any
of the output batches. Bytes of a record no output needs (padding) are read for the CRC alone at
the end (`finish`).

`AnyOrderVerification` is what `zinspect.core.stream.copy_tensors` asks of a verification
(segments, feed, verdict, NaN/Inf counts), kept across the reshard's batches of files.
"""

from __future__ import annotations

import bisect
import functools
import os
import threading
import zlib

from zinspect.core.verify import CRC_HINT, Pin, Segment, check_unchanged, record_table, refusal
from zinspect.errors import NotMergeable

_POLY = 0xEDB88320  # CRC-32, reflected
_ONE = 1 << 31  # the polynomial 1, reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) mod the CRC polynomial (reflected bit order), as zlib's multmodp."""
    m, p = _ONE, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p: x^1, x^2, x^4, ...
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=4096)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) mod p: what appending `nbytes` bytes does to a CRC (lengths repeat)."""
    p, n, k = _ONE, nbytes, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of A + B from CRC32(A), CRC32(B) and len(B)."""
    return _multmodp(_shift(len2), crc1) ^ crc2


class AnyOrderCheck:
    """The CRC32 of one zip record from byte ranges fed in any order (a range inside one
    already fed is a re-read: checked the first time)."""

    def __init__(self, path: str, file: str, record: str, start: int, size: int, want: int) -> None:
        self.path, self.file, self.record = path, file, record
        self.start, self.size, self.want = start, size, want
        self.params: list[str] = []
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._crcs: list[int] = []
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.start + self.size

    def feed(self, offset: int, data, abort=None) -> None:
        crc, n = zlib.crc32(data), len(data)
        with self._lock:
            self._add(offset, offset + n, crc)

    def _add(self, a: int, b: int, crc: int) -> None:
        starts, ends, crcs = self._starts, self._ends, self._crcs
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and ends[i] >= b:
            return  # read again
        if (i >= 0 and ends[i] > a) or (i + 1 < len(starts) and starts[i + 1] < b):
            raise ValueError(f"{self.file}: {self.record}: bytes {a}..{b} overlap a range read "
                             "before")  # never planned: each source byte is read once
        if i >= 0 and ends[i] == a:  # joins the range before it
            a, crc = starts[i], crc32_combine(crcs[i], crc, b - a)
            del starts[i], ends[i], crcs[i]
        else:
            i += 1
        if i < len(starts) and starts[i] == b:  # and the one after it
            b, crc = ends[i], crc32_combine(crc, crcs[i], ends[i] - b)
            del starts[i], ends[i], crcs[i]
        starts.insert(i, a)
        ends.insert(i, b)
        crcs.insert(i, crc)

    @property
    def done(self) -> bool:
        return self._starts == [self.start] and self._ends == [self.end]

    @property
    def crc(self) -> int:
        return self._crcs[0] if self.done else 0

    @property
    def failed(self) -> bool:
        return self.done and self.crc != self.want

    def missing(self) -> list[tuple[int, int]]:
        """The byte ranges of the record not fed yet."""
        out, at = [], self.start
        for a, b in zip(self._starts, self._ends, strict=True):
            if a > at:
                out.append((at, a))
            at = b
        return out + ([(at, self.end)] if at < self.end else [])

    def problem(self) -> str:
        return (f"{self.file}: record {self.record} fails its CRC32 check ({self.crc:08x}, "
                f"the zip directory says {self.want:08x}): its bytes changed after the save")


class AnyOrderVerification:
    """The stream's verification over every batch of a reshard: each source file's records
    (found and the file pinned when it is first read), the checks of the records read."""

    salvage = False

    def __init__(self, shown=os.path.basename) -> None:
        self.shown = shown
        self.abort = threading.Event()
        self.pins: dict[str, Pin] = {}
        self.nonfinite: dict[str, tuple[int, int]] = {}
        self._records: dict[str, tuple[list[int], list[AnyOrderCheck]]] = {}
        self._touched: dict[int, AnyOrderCheck] = {}
        self._lock = threading.Lock()

    @property
    def checks(self) -> list[AnyOrderCheck]:
        return list(self._touched.values())

    @property
    def unverified(self) -> list:
        """None: every record read is checked whole, in whatever order its bytes came."""
        return []

    def _of(self, path: str) -> tuple[list[int], list[AnyOrderCheck]]:
        got = self._records.get(path)
        if got is None:
            got = self._records[path] = self._read_directory(path)
        return got

    def _read_directory(self, path: str) -> tuple[list[int], list[AnyOrderCheck]]:
        got = record_table(path, self.pins, lambda name, start, size, crc:
                           AnyOrderCheck(path, self.shown(path), name, start, size, crc))
        return got if got is not None else ([], [])

    def segments_of(self, t) -> list[Segment]:
        """A tensor's pieces, each with the record it lies in (None: bytes outside every
        record, e.g. the zip headers of a file copied byte for byte)."""
        out = []
        for i, p in enumerate(t.pieces):
            starts, checks = self._of(p.path)
            j = bisect.bisect_right(starts, p.offset) - 1
            c = checks[j] if j >= 0 and p.offset + p.nbytes <= checks[j].end else None
            if c is not None:
                with self._lock:
                    self._touched.setdefault(id(c), c)
                if not c.params or c.params[-1] != t.name:
                    c.params.append(t.name)
            out.append(Segment(p.path, p.offset, p.nbytes, c, piece=i))
        return out

    def add_nonfinite(self, name: str, nan: int, inf: int) -> None:
        with self._lock:
            n, i = self.nonfinite.get(name, (0, 0))
            self.nonfinite[name] = (n + nan, i + inf)

    def add_drift(self, name: str, tp: int, diff: float) -> None:
        raise AssertionError("a reshard compares no replicas")

    def refuse(self, c: AnyOrderCheck) -> NotMergeable:
        return refusal(c, CRC_HINT)

    def finish(self, step: int = 1 << 20) -> None:
        """Read the bytes of the touched records that no output needed (padding) for their CRC
        alone, and refuse if any record fails."""
        for c in self._touched.values():
            with open(c.path, "rb", buffering=0) as f:
                for a, b in c.missing():
                    for at in range(a, b, step):
                        data = os.pread(f.fileno(), min(step, b - at), at)
                        if not data:
                            raise NotMergeable(f"{c.file}: ended at byte {at:,}", CRC_HINT)
                        c.feed(at, data)
            if not c.done or c.failed:
                raise self.refuse(c)

    def check_unchanged(self) -> None:
        check_unchanged(self.pins, "reshard")
