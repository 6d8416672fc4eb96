"""Write torch-style zip files by hand, with tensor records as holes (sparse files).

A real torch.save of a multi-GB file costs minutes and GBs; zinspect only reads the pickle and
the zip directory, so a record whose bytes are a hole reads the same. zip64 records and end
records are written whenever an offset or the file passes 4 GiB, or there are over 65535
records. Hole records get CRC 0 (a deep check flags them; nothing else reads their bytes).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

ZIP64_LIMIT = 0xFFFFFFFF


@dataclass
class Record:
    name: bytes
    data: bytes = b""
    hole: int = 0  # when > 0: this many unwritten bytes instead of `data`
    at: int | None = None  # absolute offset of the local header (None: next in line)

    @property
    def size(self) -> int:
        return self.hole or len(self.data)

    @property
    def crc(self) -> int:
        return 0 if self.hole else zlib.crc32(self.data)


def _local_header(r: Record) -> bytes:
    big = r.size > ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, r.size, r.size) if big else b""
    size = ZIP64_LIMIT if big else r.size
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0, r.crc, size, size,
                       len(r.name), len(extra)) + r.name + extra


def _central_entry(r: Record, offset: int) -> bytes:
    fields = [r.size] * 2 if r.size > ZIP64_LIMIT else []
    fields += [offset] if offset > ZIP64_LIMIT else []
    extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
    size = ZIP64_LIMIT if r.size > ZIP64_LIMIT else r.size
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, r.crc, size, size,
                       len(r.name), len(extra), 0, 0, 0, 0, min(offset, ZIP64_LIMIT)) \
        + r.name + extra


def write_zip(path, records: list[Record]) -> None:
    entries = []
    with open(path, "wb") as f:
        for r in records:
            if r.at is not None:
                f.seek(r.at)  # a hole before the header
            offset = f.tell()
            f.write(_local_header(r))
            if r.hole:
                f.seek(r.hole, 1)
            else:
                f.write(r.data)
            entries.append(_central_entry(r, offset))
        cd = b"".join(entries)
        cd_offset = f.tell()
        f.write(cd)
        n = len(records)
        if cd_offset + len(cd) > ZIP64_LIMIT or n > 0xFFFF:
            eocd64 = f.tell()
            f.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cd),
                                cd_offset))
            f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
            f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, ZIP64_LIMIT,
                                ZIP64_LIMIT, 0))
        else:
            f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_offset, 0))
