"""The structure of a torch.save zip, checked before any record is trusted.

A zip names each record twice: in its local header (just before the bytes) and in the central
directory (at the end). zinspect reads offsets and sizes from the directory, so a forged or
damaged directory could point two names at one record, one name at another record's bytes (the
Adam moment read as the weight), or a record over the directory itself. `check_records`
refuses all of these: names unique, every local header matching its directory entry (name,
compression, and sizes when the header holds them), and no two records, or a record and the
directory, sharing a byte. It resolves every record's data offset on the way, reading each
local header and name exactly, never a tensor byte (a ZeRO-3 model-states file has one record
per param: 300k small reads).
"""

from __future__ import annotations

import operator
import struct

LOCAL_HEADER = 30  # bytes of a zip local header before its name and extra field
_DESCRIPTOR = 16  # crc, sizes after the data when flag bit 3 is set (24 with zip64 sizes)


class ZipStructureError(Exception):
    """The zip's records contradict each other; the message says how."""


def check_records(f, size: int, entries: list[tuple[str, int, int, int, int]],
                  directory_start: int) -> dict[str, int | None]:
    """name -> data offset of every entry of `central_directory`, or None for a record whose
    local header lies past the end of the file (a truncated copy: validate says so). Raises
    ZipStructureError for duplicate names, a local header that does not match its entry, or
    records overlapping each other or the directory.

    The headers are read in windows: one read covers a run of consecutive records whose data
    is empty (a ZeRO-3 model-states file: 300k of them, 300k reads before) or that are not
    tensor records, never a tensor byte."""
    if len({e[0] for e in entries}) != len(entries):
        seen: set[str] = set()
        for name, *_ in entries:
            if name in seen:
                raise ZipStructureError(f"two zip records are named {name[-120:]!r}")
            seen.add(name)
    ordered = sorted(entries, key=_HEADER_OFFSET)
    out: dict[str, int | None] = {}
    spans = []
    window, window_start = b"", 0
    for i, (name, header, comp, usize, _) in enumerate(ordered):
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
        if window[at + LOCAL_HEADER:at + LOCAL_HEADER + nlen] != encoded:
            lname = window[at + LOCAL_HEADER:at + LOCAL_HEADER + nlen]
            raise ZipStructureError(
                f"record {name[-120:]!r}: its local header at offset {header:,} names "
                f"{lname[-120:].decode('utf-8', 'replace')!r}")
        if lcomp != comp or not flags & 8 and 0xFFFFFFFF not in (lcsize, lusize) and \
                lusize != usize:
            raise ZipStructureError(f"record {name[-120:]!r}: its local header says "
                                    f"{lusize:,} bytes (method {lcomp}), the directory "
                                    f"{usize:,} (method {comp})")
        data = header + LOCAL_HEADER + nlen + xlen
        out[name] = data
        end = data + usize + (_DESCRIPTOR if flags & 8 else 0)
        # a record said to run past the end of the file is cut (validate: truncated-file);
        # only its header must not overlap
        spans.append((header, data if end > size else end, name))
    end_prev, prev = 0, None
    for start, end, name in spans:
        if start < end_prev:
            raise ZipStructureError(f"records {prev[-120:]!r} and {name[-120:]!r} overlap "
                                    f"at offset {start:,}")
        end_prev, prev = end, name
    if spans and directory_start < end_prev:
        raise ZipStructureError(f"record {prev[-120:]!r} runs into the zip directory at "
                                f"offset {directory_start:,}")
    return out


_LOCAL = struct.Struct("<4s2xHH8xIIHH")  # signature, flags, method, sizes, name/extra lengths
_HEADER_OFFSET = operator.itemgetter(1)
#: most bytes one read of local headers covers
WINDOW_BYTES = 1 << 20


def _read_window(f, ordered: list, i: int) -> bytes:
    """The bytes from record i's local header through its name, and on through the headers of
    the records after it while each one before holds no data (up to WINDOW_BYTES): never a
    tensor byte."""
    start = end = ordered[i][1]
    for j in range(i, len(ordered)):
        name, header, _, usize, _ = ordered[j]
        if header - start > WINDOW_BYTES:
            break
        end = header + LOCAL_HEADER + len(name.encode("utf-8", "surrogatepass"))
        if usize:
            break
    f.seek(start)
    return f.read(end - start)
