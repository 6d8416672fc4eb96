"""The world size is the one most optimizer files were partitioned over: one forged or stray
file (its `partition_count` rewritten, every CRC valid) is then the file named as the odd one
out, instead of every other rank being "saved with another world size" and the ranks up to the
forged size "missing". On a tie (two files) the lowest rank's is kept, as before."""

from __future__ import annotations

import damage as D
from test_forged_world_size import FORGED

from zinspect.core import open_checkpoint


def test_the_forged_file_is_the_odd_one_out(tmp_path):
    root = D.copy_root(tmp_path, "s2_w3_fp32_rr")  # 3 ranks: rank 0 forged, ranks 1 and 2 not
    D.forge_partition_count(next(root.glob("*/" + D.optim_name(0))), FORGED)
    ckpt = open_checkpoint(root)
    assert ckpt.world_size == 3
    mismatch = [f for f in ckpt.findings if f.code == "world-size-mismatch"]
    assert [(f.file, f.rank) for f in mismatch] == [(D.optim_name(0), 0)]
    assert f"world size {FORGED}, the others with 3" in mismatch[0].message
    assert not any(f.code == "missing-optimizer-file" for f in ckpt.findings)
    assert ckpt.errors  # still not mergeable as is


def test_a_forged_higher_rank_is_named_too(tmp_path):
    root = D.copy_root(tmp_path, "s2_w3_fp32_rr")
    D.forge_partition_count(next(root.glob("*/" + D.optim_name(2))), FORGED)
    ckpt = open_checkpoint(root)
    assert ckpt.world_size == 3
    assert [f.rank for f in ckpt.findings if f.code == "world-size-mismatch"] == [2]
