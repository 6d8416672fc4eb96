"""zip64: rank files over 4 GiB (a 70B model at ws 64 has 13 GB optimizer files).

A real torch.save that large costs minutes and GBs here, so this test builds the same zip64 layout
by hand around torch's own data.pkl, with the tensor record placed past 5 GiB in a sparse file.
(Checked by hand on make_sparse_ckpt output with 13.5 GB files: the central directory read here
matched Python's zipfile record for record.)
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import torch

from zinspect.core.torchzip import read_torch_file

FAR = 5 << 30  # where the tensor record goes


def local_header(name: bytes, data: bytes) -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0, zlib.crc32(data),
                       len(data), len(data), len(name), 0) + name


def central_entry(name: bytes, data: bytes, offset: int) -> bytes:
    big = offset > 0xFFFFFFFF
    extra = struct.pack("<HHQ", 1, 8, offset) if big else b""
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0,
                       zlib.crc32(data), len(data), len(data), len(name), len(extra), 0, 0, 0, 0,
                       0xFFFFFFFF if big else offset) + name + extra


def write_zip64(path, records: list[tuple[bytes, bytes, int | None]]) -> None:
    """records: (name, data, where) with `where` None for "next in line"."""
    cd = b""
    with open(path, "wb") as f:
        for name, data, where in records:
            if where is not None:
                f.seek(where)  # a hole: the file stays sparse
            offset = f.tell()
            f.write(local_header(name, data) + data)
            cd += central_entry(name, data, offset)
        cd_offset = f.tell()
        f.write(cd)
        eocd64 = f.tell()
        n = len(records)
        f.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cd),
                            cd_offset))
        f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                            0xFFFFFFFF, 0))


def test_a_tensor_record_past_4_gib_is_found(tmp_path):
    values = torch.arange(6, dtype=torch.float32) / 4
    buf = io.BytesIO()
    torch.save({"w": values}, buf)
    pkl = zipfile.ZipFile(buf).read("archive/data.pkl")
    path = tmp_path / "big.pt"
    write_zip64(path, [(b"archive/data.pkl", pkl, None),
                       (b"archive/data/0", bytes(values.untyped_storage()), FAR)])
    assert path.stat().st_size > FAR
    assert max(i.header_offset for i in zipfile.ZipFile(path).infolist()) >= FAR  # valid zip64

    tf = read_torch_file(path)
    t = tf.obj["w"]
    offset = tf.tensor_offset(t)
    assert offset > FAR
    with open(path, "rb") as f:
        f.seek(offset)
        got = torch.frombuffer(bytearray(f.read(t.nbytes)), dtype=torch.float32)
    assert torch.equal(got, values)
    assert not tf.storage_problems()
