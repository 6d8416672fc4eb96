"""The checkpoint model built from the fixtures' metadata, and each validation rule on broken
copies of them (made in tmp dirs)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import FIXTURES, copy_fixture, fixture_names, manifest, tag_dir

from zinspect.core import open_checkpoint
from zinspect.core.model import ERROR, Checkpoint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _open(name: str) -> Checkpoint:
    return open_checkpoint(tag_dir(name))


# ------------------------------------------------------------------------- model vs manifests
@pytest.mark.parametrize("name", fixture_names)
def test_fragments_cover_each_param_exactly(name):
    c = _open(name)
    checked = 0
    for p in c.owners():
        if p.numel == 0 or (p.frozen and c.stage == 1 and not p.fragments):
            continue
        spans = sorted((f.start, f.start + f.numel) for f in p.fragments if f.numel)
        pos = 0
        for lo, hi in spans:
            assert lo == pos, (p.name, spans)  # no gap, no overlap
            pos = hi
        assert pos == p.numel, (p.name, spans)
        assert all(f.intact and f.offset is not None for f in p.fragments), p.name
        checked += 1
    assert checked == len(c.owners())


@pytest.mark.parametrize("name", [n for n in fixture_names if manifest(n)["stage"] == 3])
def test_zero3_fragments_are_ceil_n_over_ws_per_rank(name):
    c = _open(name)
    ws = c.world_size
    assert ws == manifest(name)["world_size"]
    for p in c.owners():
        part = math.ceil(p.numel / ws)
        assert sorted(f.rank for f in p.fragments) == list(range(ws)), p.name
        for f in p.fragments:
            assert f.start == f.rank * part, p.name
            assert f.numel + f.padding == part, (p.name, f)
            assert f.numel == max(0, min(part, p.numel - f.rank * part)), (p.name, f)
        assert sum(f.padding for f in p.fragments) == part * ws - p.numel


def test_zero3_master_fragments_are_lean_and_built_on_first_use():
    """A Fragments plus its partial per param was 80 MB at 297k params: each trainable ZeRO-3
    param holds a slotted MasterFragments on its group's shared source, unbuilt after open and
    validate, then exactly the fragments `fragments_of` gives for its place in the group."""
    from zinspect.core.layouts.zero3 import MasterFragments, fragments_of

    c = _open("s3_w4_bf16")
    owners = [p for p in c.owners() if not p.frozen]
    assert len(owners) > 2 and all(type(p.fragments) is MasterFragments for p in owners)
    assert all(repr(p.fragments) == "Fragments(<lazy>)" for p in owners)
    assert not hasattr(owners[1].fragments, "__dict__")
    p, q = [o for o in owners if o.sub_group == owners[0].sub_group][:2]
    frags = p.fragments
    parts, group, shard = frags._source
    assert q.fragments._source is frags._source and group == p.sub_group  # one per group
    assert list(frags) == fragments_of(parts, group, frags._offset, p.numel, frags._share,
                                       "master", shard)
    assert repr(q.fragments) == "Fragments(<lazy>)"  # building one built no other
    assert frags == list(frags) and len(frags) == c.world_size and not p.fragments_need_reads


def test_params_are_lean_with_containers_made_on_first_use():
    """A Param's list and two dicts were 2/3 of its 350 bytes (105 MB at 297k params): Params
    are slotted, and after open and validate no ZeRO-3 param has made its shards or copies
    dicts; one made on first use is kept (what is written to it stays), and a param compares
    and prints as the dataclass did."""
    from zinspect.core.model import Param, Shard

    c = _open("s3_w4_bf16")
    params = list(c.params.values())
    assert not any(hasattr(p, "__dict__") for p in params)
    assert all(p._shards is None and p._copies is None for p in params)
    p = params[0]
    assert p.shards == {} and p.copies == {} and p._shards == {}
    p.shards[0] = Shard(0, p.shape)
    p.copies.setdefault(1, []).append("x")
    assert p.shards[0].shape == p.shape and p.copies == {1: ["x"]}
    fresh = Param("w", (2, 3), "bfloat16")
    fresh.fragments.append("f")
    assert fresh.fragments == ["f"] and fresh.numel == 6
    assert Param("w", (2,), "bf16") == Param("w", (2,), "bf16", fragments=[], shards={}, copies={})
    assert Param("w", (2,), "bf16") != Param("w", (2,), "bf16", frozen=True)
    assert repr(Param("w", (2,), "bf16", group=1)) == (
        "Param(name='w', shape=(2,), dtype='bf16', frozen=False, group=1, sub_group=None, "
        "tied_to=None, fragments=[], shards={}, copies={})")
    with pytest.raises(TypeError):
        hash(fresh)


@pytest.mark.parametrize("name", fixture_names)
def test_frozen_params_source(name):
    m = manifest(name)
    c = _open(name)
    assert sorted(n for n, p in c.params.items() if p.frozen) == sorted(m["frozen"])
    for n in m["frozen"]:
        p = c.params[n]
        assert p.fragments, n
        want = "module" if m["stage"] == 1 else "frozen"
        assert {f.source for f in p.fragments} == {want}, n
        if m["stage"] == 1:
            assert any(f.code == "frozen-from-module" and f.param == n for f in c.findings)


@pytest.mark.parametrize("name", fixture_names)
def test_layout_groups_and_subgroups(name):
    m = manifest(name)
    c = _open(name)
    assert c.layout == ("bf16_optimizer" if name.endswith("bf16opt") else "zero")
    assert len(c.groups) == len(m["flat_groups"])
    assert [g.params for g in c.groups] == m["flat_groups"]
    assert [g.index for g in c.groups] == list(range(len(m["flat_groups"])))
    for g in c.groups:
        assert sorted(g.partition_numel) == list(range(m["world_size"]))
        assert g.numel == sum(m["params"][n]["numel"] for n in g.params)
        assert g.dtype == "float32"
    # each flat group's params belong to exactly one optimizer param group
    for g in c.groups:
        pg = {i for i, names in enumerate(m["param_groups"]) if set(g.params) & set(names)}
        assert pg == {g.param_group}, g.index
        assert set(g.params) <= set(m["param_groups"][g.param_group])
    if name == "s3_w3_fp16_sub":
        assert len(c.groups) > len(m["param_groups"])  # ZeRO-3 sub-groups


@pytest.mark.parametrize("name", fixture_names)
def test_fragment_offsets_point_at_the_values(name):
    """The bytes at each fragment's offset are the reference values of that element range."""
    ref = torch.load(tag_dir(name).parent / "reference_fp32.pt", map_location="cpu",
                     weights_only=True)
    c = _open(name)
    blobs = {f.name: f.path.read_bytes() for f in c.files}
    for p in c.owners():
        want = ref[p.name].flatten()
        for f in p.fragments:
            if not f.numel:
                continue
            raw = bytearray(blobs[f.file][f.offset: f.offset + f.nbytes])
            got = torch.frombuffer(raw, dtype=TORCH_DTYPES[f.dtype])
            exp = want[f.start: f.start + f.numel].to(TORCH_DTYPES[f.dtype])
            assert torch.equal(got, exp), (p.name, f)


# ------------------------------------------------------------------------- validation rules
def codes(c: Checkpoint, severity: str = ERROR) -> set[str]:
    return {f.code for f in c.findings if f.severity == severity}


def finding(c: Checkpoint, code: str):
    hits = [f for f in c.findings if f.code == code]
    assert hits, (code, [(f.code, f.message) for f in c.findings])
    return hits


@pytest.mark.parametrize("name", fixture_names)
def test_fixtures_have_no_errors(name):
    assert codes(_open(name)) == set()


def test_missing_optim_rank_file(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    c = open_checkpoint(tag)
    [f] = finding(c, "missing-optimizer-file")
    assert f.severity == ERROR and f.rank == 2 and "rank 2" in f.message
    cov = finding(c, "param-coverage")
    assert all(x.rank in (2, None) for x in cov)
    assert any(x.rank == 2 for x in cov)


def test_stale_extra_rank_file(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    [f] = finding(c, "stale-rank-file")
    assert f.file == "zero_pp_rank_2_mp_rank_00_optim_states.pt" and f.rank == 2
    assert "missing-optimizer-file" not in codes(c)


def test_rank_gap_and_stale_file(tmp_path):
    """Ranks 0, 1, 3 of a world of 4 plus rank 4: a gap at 2 and a stale rank 4."""
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").rename(
        tag / "zero_pp_rank_4_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    assert c.world_size == 4
    [gap] = finding(c, "missing-optimizer-file")
    assert gap.rank == 2
    [stale] = finding(c, "stale-rank-file")
    assert stale.file == "zero_pp_rank_4_mp_rank_00_optim_states.pt" and stale.rank == 4


@pytest.mark.parametrize("name", ["s2_w4_fp16", "s3_w4_bf16"])
def test_truncated_optim_file_still_yields_info(tmp_path, name):
    tag = copy_fixture(tmp_path, name)
    victim = next(tag.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 3 // 4])
    c = open_checkpoint(tag)
    [f] = finding(c, "truncated-file")
    assert f.file == victim.name and f.rank == 1
    truncated = finding(c, "param-truncated")
    assert all(x.file == victim.name and x.rank == 1 for x in truncated)
    # the model is still there: names, shapes, world size
    m = manifest(name)
    assert list(c.params) == list(m["params"])
    assert c.world_size == m["world_size"] and c.stage == m["stage"]


def test_truncated_before_the_pickle_is_unreadable(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    victim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    c = open_checkpoint(tag)
    [f] = finding(c, "unreadable-file")
    assert f.file == victim.name and f.rank == 0
    assert list(c.params) == list(manifest("s2_w2_fp32_plain")["params"])


def test_mixed_prefixes(tmp_path):
    tag = copy_fixture(tmp_path, "s1_w4_bf16")
    (tag / "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt").rename(
        tag / "zero_pp_rank_3_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    [f] = finding(c, "mixed-prefix")
    assert f.file == "zero_pp_rank_3_mp_rank_00_optim_states.pt" and f.rank == 3


def test_duplicate_rank_with_another_prefix(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    shutil.copy(tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                tag / "fp16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    [f] = finding(c, "duplicate-rank")
    assert f.rank == 0 and f.file in ("fp16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                      "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_stage_mismatch(tmp_path):
    """A ZeRO-1 rank file dropped into a ZeRO-2 checkpoint of the same world size."""
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    shutil.copy(tag_dir("s1_w4_bf16") / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    assert c.stage == 2
    [f] = finding(c, "stage-mismatch")
    assert f.file == "zero_pp_rank_2_mp_rank_00_optim_states.pt" and f.rank == 2
    assert "ZeRO-1" in f.message


def test_world_size_mismatch(tmp_path):
    """Rank 1 of a world-size-2 run renamed into a world-size-4 checkpoint of the same stage."""
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    shutil.copy(tag_dir("s2_w2_fp32_plain") / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    c = open_checkpoint(tag)
    assert c.world_size == 4
    hits = [f for f in finding(c, "world-size-mismatch") if f.file]
    assert [(f.file, f.rank) for f in hits] == [("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)]
    assert "world size 2" in hits[0].message


def test_zero3_missing_model_states_file(tmp_path):
    tag = copy_fixture(tmp_path, "s3_w4_bf16")
    (tag / "zero_pp_rank_2_mp_rank_00_model_states.pt").unlink()
    c = open_checkpoint(tag)
    [f] = finding(c, "missing-model-states-file")
    assert f.rank == 2 and f.severity == ERROR
    # the frozen param's rank-2 share lived in that file
    frozen = manifest("s3_w4_bf16")["frozen"][0]
    assert any(x.code == "param-coverage" and x.param == frozen and x.rank == 2
               for x in c.findings)


def test_zero3_missing_rank0_model_states(tmp_path):
    tag = copy_fixture(tmp_path, "s3_w2_fp32")
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    c = open_checkpoint(tag)
    [w] = finding(c, "rank0-model-missing")
    assert w.file == "zero_pp_rank_1_mp_rank_00_model_states.pt"
    assert any(f.code == "missing-model-states-file" and f.rank == 0 for f in c.findings)


def test_garbage_rank_file_is_unreadable(tmp_path):
    tag = copy_fixture(tmp_path, "s1_w2_fp32")
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(b"\x00" * 4096)
    c = open_checkpoint(tag)
    [f] = finding(c, "unreadable-file")
    assert f.file == victim.name and f.rank == 1
    assert c.file(victim.name).error


def test_extra_file_is_only_info(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    (tag / "notes.txt").write_text("hello")
    c = open_checkpoint(tag)
    [f] = finding(c, "extra-file")
    assert f.severity == "info" and f.file == "notes.txt"
    assert codes(c) == set()


def test_opening_leaves_the_garbage_collector_as_it_was():
    """Opening pauses the cyclic collector (millions of acyclic objects); a host program's
    setting must come back, even when opening fails."""
    import gc

    from zinspect.errors import CheckpointNotFound

    assert gc.isenabled()
    open_checkpoint(FIXTURES / "s3_w4_bf16")
    assert gc.isenabled()
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(FIXTURES / "no-such-checkpoint")
    assert gc.isenabled()
    gc.disable()
    try:
        open_checkpoint(FIXTURES / "s3_w4_bf16")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_lazy_fragments_read_by_two_threads_at_once():
    import threading
    import time

    from zinspect.core.model import Fragment, Fragments

    def make():
        time.sleep(0.05)  # both threads are inside make() at once
        return [Fragment(r, f"rank{r}.pt", 0, 10 * r, 10, 64, "float32") for r in range(4)]

    frags = Fragments(make=make)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(len(frags))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [4, 4]  # neither thread saw a half-built (empty) list
    assert [f.rank for f in frags] == [0, 1, 2, 3]


def test_coverage_walk_pads_a_rank_past_the_params_end():
    """ZeRO-3 at ws 5: a 7-element param gives rank 4 no element and 2 padding; that is not a
    missing element (the app's coverage bar showed one) and not a gap."""
    from zinspect.core.coverage import cover, first_problem

    p = open_checkpoint(FIXTURES / "s3_w5_bf16_small").params["encoder.odd.bias"]
    cov = cover(p.numel, p.fragments)
    assert cov.segments == [("rank", 0, 2), ("rank", 1, 2), ("rank", 2, 2), ("rank", 3, 1),
                            ("pad", 3, 1), ("pad", 4, 2)]
    assert cov.gaps == cov.overlaps == [] and first_problem(p.numel, list(p.fragments)) is None
    frags = [f for f in p.fragments if f.rank != 1]
    assert first_problem(p.numel, frags) == "elements 2..4 are missing"
    assert first_problem(p.numel, [*p.fragments, p.fragments[0]]) == "elements 0..2 are held twice"


def test_which_fragments_need_file_reads():
    """One rule (the app reads them in a thread): a ZeRO-3 frozen param's fragments until the
    ranks' model states are parsed (validate parses them: it checks what the merge checks);
    never a trainable param's (lazy, but from parsed files)."""
    from zinspect.core import load_checkpoint, validate

    ckpt = load_checkpoint(FIXTURES / "hf_mistral_lora_s3_w2_bf16")  # LoRA: a frozen base
    frozen = [p for p in ckpt.params.values() if p.frozen and not p.tied_to]
    trainable = next(p for p in ckpt.params.values() if not p.frozen and not p.tied_to)
    assert len(frozen) >= 2 and all(p.fragments_need_reads for p in frozen)
    assert not trainable.fragments_need_reads
    assert len(frozen[0].fragments) == 2  # parses every rank's model states
    assert not any(p.fragments_need_reads for p in frozen)
    ckpt = load_checkpoint(FIXTURES / "hf_mistral_lora_s3_w2_bf16")
    validate(ckpt)
    assert not any(p.fragments_need_reads for p in ckpt.params.values())
    assert not open_checkpoint(FIXTURES / "s2_w2_bf16").params["embed.weight"].fragments_need_reads
