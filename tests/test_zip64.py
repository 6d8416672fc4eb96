"""zip64: rank files over 4 GiB (a 70B model at ws 64 has 13 GB optimizer files).

A real torch.save that large costs minutes and GBs here, so this test builds the same zip64 layout
by hand (tests/sparse_zip.py) around torch's own data.pkl, with the tensor record placed past
5 GiB in a sparse file.
(Checked by hand on make_sparse_ckpt output with 13.5 GB files: the central directory read here
matched Python's zipfile record for record.)
"""

from __future__ import annotations

import io
import zipfile

import torch
from sparse_zip import Record, write_zip

from zinspect.core.torchzip import read_torch_file

FAR = 5 << 30  # where the tensor record goes


def test_a_tensor_record_past_4_gib_is_found(tmp_path):
    values = torch.arange(6, dtype=torch.float32) / 4
    buf = io.BytesIO()
    torch.save({"w": values}, buf)
    pkl = zipfile.ZipFile(buf).read("archive/data.pkl")
    path = tmp_path / "big.pt"
    write_zip(path, [Record(b"archive/data.pkl", pkl),
                     Record(b"archive/data/0", bytes(values.untyped_storage()), at=FAR)])
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
    assert all(r.present == r.size == t.nbytes for r in tf.records.values())
