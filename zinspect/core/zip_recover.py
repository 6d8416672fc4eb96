"""A torch.save zip cut short (no central directory): its records found by their local
headers (`walk_local_headers`, torchzip's fallback)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from zinspect.core.zipcheck import Record, Records

_DESCRIPTOR = b"PK\x07\x08"


def walk_local_headers(f, size: int, pickle_at: Callable) -> tuple[object, object, Records]:
    """(the object, the unpickler, the records) of a zip of `size` bytes whose central
    directory is gone (a truncated copy); the unpickler is None when no data.pkl was read.

    torch writes records in order, with sizes in data descriptors, so walk the local headers:
    data.pkl ends itself with STOP, storages' sizes come from the pickle, and the small records
    end at their data descriptor. `pickle_at(f, offset)`: (object, unpickler, bytes read) of
    the pickle at `offset` (torchzip's reader)."""
    off, obj, up, records = 0, None, None, {}
    while off + 30 <= size:
        f.seek(off)
        head = f.read(30)
        if head[:4] != b"PK\x03\x04":
            break
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        name = f.read(name_len).decode("utf-8", "replace")
        data = off + 30 + name_len + extra_len
        if data > size:  # cut inside the local header itself
            break
        leaf = name.rsplit("/", 1)[-1]
        if name.endswith("data.pkl"):
            obj, up, length = pickle_at(f, data)
        elif up is not None and "/data/" in name and leaf in up.storages:
            length = up.storages[leaf].nbytes
            records[leaf] = Record(length, max(0, min(length, size - data)), data_offset=data)
        else:
            f.seek(data)
            window = f.read(4096)
            j = window.find(_DESCRIPTOR)
            if j < 0:
                break
            length = j
        off = data + length + (24 if length >= 0xFFFFFFFF or off >= 0xFFFFFFFF else 16)
    return obj, up, Records(records)
