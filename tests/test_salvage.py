"""`zinspect merge --salvage`: write every param whose fragments are all present and intact, list
what was left out and why, exit 1 when anything was dropped. What is written must be bit-exact:
salvage never writes a partly rebuilt tensor.

The expected dropped sets are computed here from the manifests and DeepSpeed's partitioning rules
(spec 3.2 and 3.4), not from zinspect's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import damage as D
import pytest
from conftest import FIXTURES, manifest, run_zinspect

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

TIMEOUT = 60


def reference(name: str) -> dict:
    return torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def z12_touching(m: dict, rank: int) -> set[str]:
    """Trainable params with at least one element in `rank`'s partition (ZeRO-1/2: each flat
    group padded to a multiple of 2*ws and cut into ws equal partitions)."""
    ws = m["world_size"]
    out = set()
    for group in m["flat_groups"]:
        sizes = [m["params"][n]["numel"] for n in group]
        part = -(-sum(sizes) // (2 * ws)) * 2
        lo, hi = rank * part, (rank + 1) * part
        start = 0
        for name, n in zip(group, sizes, strict=False):
            if n and start < hi and start + n > lo:
                out.add(name)
            start += n
    return out


def z3_touching(m: dict, rank: int) -> set[str]:
    """ZeRO-3: each param is cut into ceil(n/ws) elements per rank; rank r holds real elements
    only when n > r * ceil(n/ws)."""
    ws = m["world_size"]
    return {name for group in m["flat_groups"] for name in group
            if m["params"][name]["numel"] > rank * -(-m["params"][name]["numel"] // ws)}


def with_aliases(m: dict, names: set[str]) -> set[str]:
    return names | {alias for alias, owner in m["tied"].items() if owner in names}


def merge_salvage(path: Path, out: Path, *extra) -> tuple:
    r = run_zinspect("merge", path, out, "--salvage", "--max-shard-size", "0", *extra,
                     timeout=TIMEOUT)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def assert_bit_exact(written: dict, ref: dict) -> None:
    for name, t in written.items():
        want = ref[name]
        assert t.dtype == torch.float32 or t.dtype == want.dtype, name
        assert t.shape == want.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), \
            f"{name} differs from the reference"


def written(out: Path) -> dict:
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 1, files
    return safetensors_torch.load_file(str(files[0]))


def test_z12_missing_rank_keeps_params_of_other_ranks(tmp_path):
    m = manifest("s2_w4_fp16")
    path = D.missing_optim(tmp_path)  # rank 2's optimizer file removed
    out = tmp_path / "rescued"
    r = merge_salvage(path, out)
    assert r.returncode == 1, r.stderr
    ref = reference("s2_w4_fp16")
    dropped = with_aliases(m, z12_touching(m, 2))
    assert dropped and len(dropped) < len(ref) - 4  # a real partial case: some kept, some lost
    got = written(out)
    assert set(got) == set(ref) - dropped
    assert_bit_exact(got, ref)
    lines = [ln.strip() for ln in r.stderr.splitlines()]
    for name in dropped:  # listed, each with its reason
        why = [ln.removeprefix(f"{name}: ") for ln in lines if ln.startswith(f"{name}: ")]
        assert why and ("missing" in why[0] or "no rank file" in why[0]), (name, r.stderr)
    assert f"drops {len(dropped)}" in r.stderr or f"{len(dropped)} dropped" in r.stderr


def test_z12_missing_rank_json_lists_dropped(tmp_path):
    m = manifest("s2_w4_fp16")
    path = D.missing_optim(tmp_path)
    r = merge_salvage(path, tmp_path / "rescued", "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert set(out["dropped"]) == with_aliases(m, z12_touching(m, 2))
    assert all(why for why in out["dropped"].values())


def test_z3_missing_optimizer_rank(tmp_path):
    """ZeRO-3 spreads every param over all ranks: only those too small to reach rank 2 (none in
    this fixture), the frozen params (held by the model-states files) and the buffers survive."""
    m = manifest("s3_w4_bf16")
    root = D.copy_root(tmp_path, "s3_w4_bf16")
    (root / D.TAG / D.optim_name(2, "bf16_")).unlink()
    out = tmp_path / "rescued"
    r = merge_salvage(root, out)
    assert r.returncode == 1, r.stderr
    ref = reference("s3_w4_bf16")
    dropped = with_aliases(m, z3_touching(m, 2))
    kept = set(ref) - dropped
    assert set(m["frozen"]) <= kept and set(m["buffers"]) <= kept
    got = written(out)
    assert set(got) == kept
    assert_bit_exact(got, ref)


def test_truncated_rank_file_keeps_intact_params(tmp_path):
    """Rank 1's file cut at 60 %: params whose rank-1 bytes are still in the file are kept,
    bit-exact; the rest are dropped as truncated. Nothing of rank 1 is invented."""
    m = manifest("s2_w4_fp16")
    path = D.truncated_60(tmp_path)
    out = tmp_path / "rescued"
    r = merge_salvage(path, out)
    assert r.returncode == 1, r.stderr
    ref = reference("s2_w4_fp16")
    got = written(out)
    dropped = set(ref) - set(got)
    assert dropped and dropped <= with_aliases(m, z12_touching(m, 1))
    assert_bit_exact(got, ref)
    assert "truncated" in r.stderr
    # untouched by rank 1 means always kept
    assert set(ref) - with_aliases(m, z12_touching(m, 1)) <= set(got)


def test_rank_gap_with_stale_file(tmp_path):
    """Ranks {0,1,3,7}: the stale rank-7 file is never used as rank 2 (zero_to_fp32 would),
    so what is written is exact and what rank 2 held is dropped."""
    m = manifest("s2_w4_fp16")
    path = D.rank_gap_stale(tmp_path)
    out = tmp_path / "rescued"
    r = merge_salvage(path, out)
    assert r.returncode == 1, r.stderr
    ref = reference("s2_w4_fp16")
    got = written(out)
    assert set(got) == set(ref) - with_aliases(m, z12_touching(m, 2))
    assert_bit_exact(got, ref)


def test_salvage_of_intact_checkpoint_is_a_plain_merge(tmp_path):
    root = D.copy_root(tmp_path, "s1_w2_fp32")
    r = merge_salvage(root, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "dropped" not in r.stderr
    ref = reference("s1_w2_fp32")
    got = written(tmp_path / "out")
    assert set(got) == set(ref)
    assert_bit_exact(got, ref)


def test_salvage_with_nothing_to_rebuild_refuses(tmp_path):
    path = D.malicious_pickle(tmp_path, tmp_path / "MARKER")
    r = merge_salvage(path, tmp_path / "out")
    assert r.returncode == 1 and "no param that can be rebuilt" in r.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "MARKER").exists()


def test_salvage_does_not_touch_unlocatable_checkpoints(tmp_path):
    r = merge_salvage(D.empty_dir(tmp_path), tmp_path / "out")
    assert r.returncode == 2 and not (tmp_path / "out").exists()
