"""The structure of a torch.save zip, checked before any record is trusted.

A zip names each record twice: in its local header (just before the bytes) and in the central
directory (at the end). zinspect reads offsets and sizes from the directory, so a forged or
damaged directory could point two names at one record, one name at another record's bytes (the
Adam moment read as the weight), or a record over the directory itself. `check_records`
refuses all of these: names unique, every local header matching its directory entry (name,
compression, and sizes when the header holds them), and no two records, or a record and the
directory, sharing a byte. It resolves every record's data offset on the way, reading each
local header and name exactly, never a tensor byte.

A ZeRO-3 model-states file has one zero-byte record per param (297k at 297k names), written
back to back: `read_directory` finds such runs of records in the directory bytes and
`check_directory` checks their local headers whole (`zipruns`); anything else, or any doubt,
goes record by record (`check_records`), so the verdicts and messages are the same. A stretch
of alike records with data has their headers, still read one by one, compared whole with the
first's (`zipruns.check_alike`), or else one by one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from zinspect.core.zipruns import (
    DESCRIPTOR,
    LOCAL_HEADER,
    Doubt,
    EmptyRun,
    Runs,
    alike,
    check_alike,
    check_runs,
    run_at,
)


class ZipStructureError(Exception):
    """The zip's records contradict each other; the message says how."""


@dataclass(slots=True)
class Record:
    """Where a storage's bytes are: `data_offset` in the file and `size` bytes, of which
    `present` are actually inside the file (less when the file is truncated)."""

    size: int
    present: int
    data_offset: int | None = None  # resolved lazily for zip records (one 30-byte read)
    header_offset: int | None = None
    crc: int | None = None


class Records(Mapping):
    """key -> Record of a file's tensor records: those `listed`, and each record of the runs
    of zero-byte records (a ZeRO-3 model-states file's 297k placeholders) made when asked."""

    __slots__ = ("listed", "_prefix", "_runs")

    def __init__(self, listed: dict[str, Record], prefix: str = "",
                 runs: list[EmptyRun] = ()) -> None:
        self.listed, self._prefix, self._runs = listed, prefix, Runs(runs)

    def __getitem__(self, key: str) -> Record:
        rec = self.listed.get(key)
        if rec is not None:
            return rec
        found = self._runs.find(self._prefix + key)
        if found is None:
            raise KeyError(key)
        run, i = found
        at = run.header + i * run.stride
        return Record(0, 0, at + run.stride, at, run.crc)

    def __iter__(self) -> Iterator[str]:
        yield from self.listed
        for run in self._runs.runs:
            yield from (run.name(i)[len(self._prefix):] for i in range(run.count))

    def __len__(self) -> int:
        return len(self.listed) + sum(run.count for run in self._runs.runs)


@dataclass(frozen=True, slots=True)
class Directory:
    """A central directory in its order: entries (name, local header offset, compression,
    size, crc) and `EmptyRun`s."""

    items: list

    @property
    def entries(self) -> list[tuple[str, int, int, int, int]]:
        return [e for e in self.items if not isinstance(e, EmptyRun)]

    @property
    def runs(self) -> list[EmptyRun]:
        return [e for e in self.items if isinstance(e, EmptyRun)]

    def expanded(self) -> list[tuple[str, int, int, int, int]]:
        """Every entry, the runs' too."""
        out: list = []
        for e in self.items:
            if not isinstance(e, EmptyRun):
                out.append(e)
                continue
            out += [(e.prefix + str(n), at, 0, 0, e.crc) for n, at in
                    zip(range(e.first, e.first + e.count), range(e.header, e.end, e.stride),
                        strict=True)]
        return out


def check_directory(f, size: int, directory: Directory, directory_start: int
                    ) -> tuple[list, list[EmptyRun], dict[str, int | None]]:
    """`check_records` of the whole directory: (entries, runs, data offset of each entry).
    Each run's local headers are compared whole with those its entries imply; when one
    differs, a name may repeat, or any record is refused, every record is checked alone (the
    runs expanded into entries, `runs` then empty): the same verdicts and messages, record by
    record. (A refusal too: a message quoting a local name quotes the bytes of the window of
    headers read, and a window ends before a run where the records alone read on.)"""
    entries, runs = directory.entries, directory.runs
    if runs:
        try:
            check_runs(f, size, entries, Runs(runs))
            return entries, runs, check_records(f, size, entries, directory_start, runs)
        except (Doubt, ZipStructureError):
            pass
    entries = directory.expanded()
    return entries, [], check_records(f, size, entries, directory_start)


def check_records(f, size: int, entries: list[tuple[str, int, int, int, int]],
                  directory_start: int, runs: list[EmptyRun] = ()) -> dict[str, int | None]:
    """name -> data offset of every entry of `central_directory`, or None for a record whose
    local header lies past the end of the file (a truncated copy: validate says so). Raises
    ZipStructureError for duplicate names, a local header that does not match its entry, or
    records overlapping each other or the directory. `runs` (already checked by check_runs)
    take their place among the records as one span each.

    The headers are read in windows: one read covers a run of consecutive records whose data
    is empty or that are not tensor records, never a tensor byte."""
    if len({e[0] for e in entries}) != len(entries):
        seen: set[str] = set()
        for name, *_ in entries:
            if name in seen:
                raise ZipStructureError(f"two zip records are named {name[-120:]!r}")
            seen.add(name)
    ordered = sorted([*entries, *runs], key=_header_offset)
    out: dict[str, int | None] = {}
    # the first overlap between consecutive records, raised once every local header passed
    overlap, end_prev, prev = None, 0, None
    window, window_start = b"", 0
    stretches, done = alike(ordered), 0
    for i, item in enumerate(ordered):
        if i < done:  # checked with the first of its stretch
            continue
        if isinstance(item, EmptyRun):  # its records follow each other, checked whole
            if item.header < end_prev:
                raise Doubt  # described record by record
            end_prev, prev = item.end, None
            continue
        name, header, comp, usize, _ = item
        encoded = name.encode("utf-8", "surrogatepass")
        need = LOCAL_HEADER + len(encoded)
        if header + need > size:
            out[name] = None
            continue
        at = header - window_start
        if at < 0 or at + need > len(window):
            window_start, at = header, 0
            window = _read_window(f, ordered, i)
        (sig, flags, lcomp, lcsize, lusize, nlen, xlen) = _LOCAL.unpack_from(window, at)
        if sig != b"PK\x03\x04":
            raise ZipStructureError(f"record {name[-120:]!r}: no local header at offset "
                                    f"{header:,} (the directory points elsewhere)")
        # the length first: a window ends with its last record's name, so a slice of a longer
        # local name (the directory's name and then its extra field's first bytes) is cut to it
        if nlen != len(encoded) or not window.startswith(encoded, at + LOCAL_HEADER):
            lname = window[at + LOCAL_HEADER:at + LOCAL_HEADER + nlen]
            raise ZipStructureError(
                f"record {name[-120:]!r}: its local header at offset {header:,} names "
                f"{lname[-120:].decode('utf-8', 'replace')!r}" + ("" if nlen == len(encoded) else
                                                                 f" ({nlen} bytes long, the "
                                                                 f"directory's {len(encoded)})"))
        if lcomp != comp or not flags & 8 and lusize != usize and lcsize != 0xFFFFFFFF and \
                lusize != 0xFFFFFFFF:
            raise ZipStructureError(f"record {name[-120:]!r}: its local header says "
                                    f"{lusize:,} bytes (method {lcomp}), the directory "
                                    f"{usize:,} (method {comp})")
        data = header + LOCAL_HEADER + nlen + xlen
        out[name] = data
        end = data + usize + (DESCRIPTOR if flags & 8 else 0)
        if header < end_prev and overlap is None:
            if prev is None:
                raise Doubt
            overlap = f"records {prev[-120:]!r} and {name[-120:]!r} overlap at offset {header:,}"
        # a record said to run past the end of the file is cut (validate: truncated-file);
        # only its header must not overlap
        end_prev, prev = data if end > size else end, name
        if i in stretches:  # the records alike after it, compared with its header whole
            rest = ordered[i:stretches[i]]
            found = check_alike(f, size, rest, window[at:at + LOCAL_HEADER], end_prev)
            if found is not None:  # else they are checked one by one
                out.update(found[0])
                done, prev, end_prev = stretches[i], rest[-1][0], found[1]
    if overlap is not None:
        raise ZipStructureError(overlap)
    if directory_start < end_prev:
        if prev is None:
            raise Doubt
        raise ZipStructureError(f"record {prev[-120:]!r} runs into the zip directory at "
                                f"offset {directory_start:,}")
    return out


_LOCAL = struct.Struct("<4s2xHH8xIIHH")  # signature, flags, method, sizes, name/extra lengths
#: most bytes one read of local headers covers
WINDOW_BYTES = 1 << 20


def _header_offset(item) -> int:
    return item.header if isinstance(item, EmptyRun) else item[1]


def _read_window(f, ordered: list, i: int) -> bytes:
    """The bytes from record i's local header through its name, and on through the headers of
    the records after it while each one before holds no data (up to WINDOW_BYTES, up to a
    run): never a tensor byte."""
    start, last = ordered[i][1], i
    for j in range(i, len(ordered)):
        if isinstance(ordered[j], EmptyRun):
            break
        _, header, _, usize, _ = ordered[j]
        if header - start > WINDOW_BYTES:
            break
        last = j
        if usize:
            break
    name, header = ordered[last][:2]
    f.seek(start)
    return f.read(header + LOCAL_HEADER + len(name.encode("utf-8", "surrogatepass")) - start)


def _tail(f, size: int) -> bytes:
    """The end of a zip: its end record (22 bytes, more with a comment) and, for zip64, the
    locator and record before it. torch writes no comment, so 98 bytes nearly always do."""
    for want in (22 + 20 + 56, 22 + 20 + 56 + 65535):
        n = min(size, want)
        f.seek(size - n)
        tail = f.read(n)
        if tail.rfind(b"PK\x05\x06") >= 0 or n == size:
            return tail
    return tail


class NoZipDirectory(Exception):
    """The zip's end record or central directory is missing or malformed."""


def central_directory(f, size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, local header offset, compression, size, crc) of every record, read straight from
    the central directory: zipfile builds an object per record, too slow at 300k records.
    Raises NoZipDirectory when the end record or an entry is missing or malformed, OSError."""
    return read_directory(f, size).expanded()


def read_directory(f, size: int) -> Directory:
    """The central directory with its runs of zero-byte records as `EmptyRun`s (raises
    like central_directory)."""
    try:
        return _parse_central_directory(f, size)
    except (struct.error, StopIteration) as e:
        raise NoZipDirectory from e


def directory_offset(f, size: int) -> int:
    """Where the central directory starts (raises NoZipDirectory like central_directory)."""
    try:
        return _directory_span(_tail(f, size))[2]
    except struct.error as e:
        raise NoZipDirectory from e


def _parse_central_directory(f, size: int) -> Directory:
    count, cd_size, cd_offset, _ = _directory_span(_tail(f, size))
    if cd_offset + cd_size > size:
        raise NoZipDirectory
    f.seek(cd_offset)
    cd = f.read(cd_size)
    out, pos, last, n, retry, wait = [], 0, len(cd) - 46, 0, 0, 1
    unpack, append = _CENTRAL.unpack_from, out.append
    while pos <= last:  # one entry (or run of empty records) per loop, so kept tight
        sig, comp, crc, csize, usize, nlen, xlen, clen, offset = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise NoZipDirectory
        if not (usize or csize or comp or xlen or clen) and n >= retry:
            run = run_at(cd, pos, nlen, offset)
            if run is not None:
                append(run)
                n, wait = n + run.count, 1
                pos += run.count * (46 + nlen)
                continue
            retry, wait = n + wait, min(16, 2 * wait)  # after lone ones, look less often
        pos += 46
        name = cd[pos:pos + nlen].decode("utf-8", "replace")
        if csize == 0xFFFFFFFF or usize == 0xFFFFFFFF or offset == 0xFFFFFFFF:  # (no tuple)
            usize, offset = _zip64_extra(cd[pos + nlen:pos + nlen + xlen], usize, csize, offset)
        append((name, offset, comp, usize, crc))
        n += 1
        pos += nlen + xlen + clen
    if n != count:
        raise NoZipDirectory
    return Directory(out)



#: a central-directory entry: signature, method, crc, sizes, name/extra/comment lengths, offset
_CENTRAL = struct.Struct("<4s6xH4xIIIHHH8xI")


def _directory_span(tail: bytes) -> tuple[int, int, int, int]:
    """From a zip's last bytes: (record count, directory size, directory offset, where the end
    record starts in `tail`), from the zip64 records when the end record defers to them."""
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise NoZipDirectory
    count, cd_size, cd_offset = struct.unpack_from("<HII", tail, i + 10)
    if count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        j = tail.rfind(b"PK\x06\x06", 0, i)
        if j < 0 or len(tail) - j < 56:
            raise NoZipDirectory
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", tail, j + 32)
    return count, cd_size, cd_offset, i


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            usize = next(values) if usize == 0xFFFFFFFF else usize
            if csize == 0xFFFFFFFF:
                next(values)
            offset = next(values) if offset == 0xFFFFFFFF else offset
            return usize, offset
        pos += 4 + length
    raise NoZipDirectory


def local_data_offset(header_offset: int, head: bytes) -> int | None:
    """Where a zip record's data starts, from the LOCAL_HEADER bytes at `header_offset` (None
    when they are not a local header)."""
    if len(head) < LOCAL_HEADER or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return header_offset + LOCAL_HEADER + name_len + extra_len
