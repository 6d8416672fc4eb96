"""ZeRO-3 with frozen params (a LoRA or partly frozen fine-tune): every rank's model states hold
its fragment of each frozen param, so validate and the merge read every rank's pickle (as big
as rank 0's: 57 MB at 297k names). What keeps that affordable must not change what is found:
the ranks' usually identical pickles are unpickled once (`load._FirstPickle`; rank 0's parse,
made at open, too), each rank's fragments still at its own file's offsets; a rank whose pickle
differs is read on its own, however alike its size and CRC.
What a merge leaves out (exclude-frozen, globs) is read from the params' columns."""

from __future__ import annotations

import fnmatch
import zlib

import damage as D
import pytest
import torch
from conftest import FIXTURES, manifest
from torchload import torch_load

from zinspect.core import load, open_checkpoint, torchzip
from zinspect.core.params import made
from zinspect.core.selection import Selection
from zinspect.core.torchzip import PickleMemo, read_torch_file

FROZEN = "encoder.frozen_proj.weight"  # s3_w4_bf16: (15, 15) over 4 ranks, 57 elements a rank


def _later_parses(monkeypatch, chunk: int | None = None, before=None) -> dict:
    """rank -> the TorchFile `load._parse_later` gave for it (the ranks left shallow at open),
    and 0 -> the one it was given as seed (rank 0's, parsed at open). The memo of small pickles
    (`PickleMemo`, up to 4 MiB each) keeps none here, as none of the 57 MB pickles of 297k
    names: what is shared is shared by `_FirstPickle`. With `chunk`, rank 0's data.pkl is read
    in chunks of that many bytes (a large pickle's path: not kept after its parse);
    `before()` is called just before the later parse."""
    monkeypatch.setattr(PickleMemo.__init__, "__defaults__", (0, 0))
    if chunk is not None:
        monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", chunk)
    got, parse = {}, load._parse_later

    def spy(files, seed=None):
        if before is not None:
            before()
        out = parse(files, seed)
        got[0] = seed
        got.update({f.rank: out[id(f)] for f in files if id(f) in out})
        return out

    monkeypatch.setattr(load, "_parse_later", spy)
    return got


def _bytes_at(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_ranks_with_the_same_pickle_share_one_parse_at_their_own_offsets(monkeypatch):
    """s3_w4_bf16 as DeepSpeed saved it: ranks 1-3 hold the very same data.pkl (rank 0's
    differs). One parse for the three; each fragment's bytes are its own rank's fragment."""
    got = _later_parses(monkeypatch)
    ckpt = open_checkpoint(FIXTURES / "s3_w4_bf16")
    assert not ckpt.errors
    assert sorted(got) == [0, 1, 2, 3]
    assert got[1].obj is got[2].obj is got[3].obj  # shared, read-only
    assert got[0].obj is not got[1].obj  # rank 0's pickle differs (by 44 bytes)
    assert len({id(got[r].records) for r in got}) == 4  # each file's own records
    fragments = ckpt.params[FROZEN].fragments
    assert [(f.rank, f.start, f.numel, f.padding) for f in fragments] == [
        (0, 0, 57, 0), (1, 57, 57, 0), (2, 114, 57, 0), (3, 171, 54, 3)]
    for f in fragments:
        path = ckpt.path / f.file
        want = torch_load(path)["frozen_param_fragments"][FROZEN]
        assert want.dtype == torch.bfloat16 and want.numel() == 57
        raw = want.contiguous().view(torch.int16).numpy().tobytes()
        assert _bytes_at(path, f.offset, f.nbytes) == raw[:f.nbytes]


def test_a_rank_whose_pickle_differs_is_read_on_its_own(tmp_path, monkeypatch):
    """Rank 2's model states re-saved with one more key (and its frozen fragment's values
    changed): its pickle differs, so it gets its own parse, its key its own."""
    root = D.copy_root(tmp_path, "s3_w4_bf16")
    path = next(root.glob("*/" + D.z3_model_name(2)))
    state = torch_load(path)
    state["frozen_param_fragments"][FROZEN] = state["frozen_param_fragments"][FROZEN] + 1
    state["zinspect_test_marker"] = 2
    torch.save(state, path)
    got = _later_parses(monkeypatch)
    ckpt = open_checkpoint(root)
    assert not ckpt.errors
    assert got[1].obj is got[3].obj and got[2].obj is not got[1].obj
    assert got[2].obj["zinspect_test_marker"] == 2 and "zinspect_test_marker" not in got[1].obj
    [frag] = [f for f in ckpt.params[FROZEN].fragments if f.rank == 2]
    want = state["frozen_param_fragments"][FROZEN].contiguous().view(torch.int16)
    assert _bytes_at(path, frag.offset, frag.nbytes) == want.numpy().tobytes()[:frag.nbytes]


def _cut_fragments(tmp_path, *ranks: int):
    """s3_w4_bf16 with `ranks`' frozen fragment of FROZEN cut to 50 of its 57 elements."""
    root = D.copy_root(tmp_path, "s3_w4_bf16")
    for rank in ranks:
        path = next(root.glob("*/" + D.z3_model_name(rank)))
        state = torch_load(path)
        state["frozen_param_fragments"][FROZEN] = \
            state["frozen_param_fragments"][FROZEN][:50].clone()
        torch.save(state, path)
    return root


def test_a_forged_fragment_after_shared_ranks_is_still_found(tmp_path, monkeypatch):
    """The first later rank's parse is shared by those with its bytes: rank 3, cut to 50
    elements, has other bytes and is checked on its own (a shape-mismatch naming it)."""
    root = _cut_fragments(tmp_path, 3)
    got = _later_parses(monkeypatch)
    ckpt = open_checkpoint(root)
    assert got[1].obj is got[2].obj and got[3].obj is not got[1].obj
    assert [(f.code, f.param, f.rank) for f in ckpt.errors] == [("shape-mismatch", FROZEN, 3)]


def _oracle(sel: Selection, ckpt) -> set[str]:
    """What the merge leaves out, name by name from the Params (the definition)."""
    out = set()
    for name in [*ckpt.params, *ckpt.buffers]:
        globbed = any(fnmatch.fnmatchcase(name, g) or "." not in g and
                      any(fnmatch.fnmatchcase(c, g) for c in name.split("."))
                      for g in sel.exclude_globs)
        p = ckpt.params.get(name)
        if name in sel.exclude or globbed or sel.exclude_frozen and p is not None and p.frozen:
            out.add(name)
    return out


SELECTIONS = [
    Selection(exclude_frozen=True),
    Selection(exclude_globs=["lora_*"]),
    Selection(exclude_globs=["*.weight"], exclude={"no.such.name"}),
    Selection(exclude_globs=["k*t"]),  # no dot: the whole name (dots and all) or a component
    Selection(exclude_globs=["[a-d]?"]),  # a component of two characters from a to d
    Selection(exclude_globs=["[!e]*"], exclude_frozen=True),
    Selection(exclude_globs=["*frozen_proj*", "layer?"]),
]


@pytest.mark.parametrize("name", ["hf_mistral_lora_s3_w2_bf16", "s3_w4_bf16", "s3_w2_bf16_plain",
                                  "hf_llama_tied_s3_w4_fp32", "s2_w2_bf16"])
def test_excluded_is_the_definition_and_makes_no_param(name):
    """From the columns: the same names as the Param-by-Param definition, and on the usual
    ZeRO-3 model (a ParamTable) no Param made."""
    ckpt = open_checkpoint(FIXTURES / name)
    made_before = len(list(made(ckpt.params)))
    got = [sel.excluded(ckpt) for sel in SELECTIONS]
    assert len(list(made(ckpt.params))) == made_before  # (the oracle below makes them all)
    assert got == [_oracle(sel, ckpt) for sel in SELECTIONS]
    assert any(got)


def test_unmatched_names_each_pattern_matching_nothing():
    ckpt = open_checkpoint(FIXTURES / "hf_mistral_lora_s3_w2_bf16")
    globs = ["lora_*", "k*t", "lroa_*", "x.*", "[!a-z]", "*_proj", "q?proj"]
    sel = Selection(exclude={"nope", "base_model.model.lm_head.weight"}, exclude_globs=globs)
    want = [g for g in globs if not _oracle(Selection(exclude_globs=[g]), ckpt)]
    assert "lroa_*" in want and "lora_*" not in want and len(want) < len(globs)
    assert sel.unmatched(ckpt) == ["nope", *want]


def test_a_forged_fragment_in_ranks_sharing_one_parse_is_named_for_each(tmp_path, monkeypatch):
    """Ranks 1 and 2 cut alike: their pickles are the same bytes, so one parse (and one check
    of its fragments) serves both, and each rank is still named in its own finding."""
    root = _cut_fragments(tmp_path, 1, 2)
    got = _later_parses(monkeypatch)
    ckpt = open_checkpoint(root)
    assert got[1].obj is got[2].obj and got[3].obj is not got[1].obj
    assert [(f.code, f.param, f.rank, f.file) for f in ckpt.errors] == [
        ("shape-mismatch", FROZEN, r, D.z3_model_name(r)) for r in (1, 2)]


LORA = "hf_mistral_lora_s3_w2_bf16"  # ranks 0 and 1 hold the same data.pkl
RENAMED = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"  # frozen


def _pickle(path) -> bytes:
    off, size = D.zip_entry(path, "data.pkl")
    return path.read_bytes()[off:off + size]


@pytest.mark.parametrize("chunk", [None, 64])
def test_rank1_shares_rank0s_parse_when_its_pickle_is_the_same(monkeypatch, chunk):
    tag = FIXTURES / LORA / manifest(LORA)["tag"]
    assert _pickle(tag / D.z3_model_name(0)) == _pickle(tag / D.z3_model_name(1))
    got = _later_parses(monkeypatch, chunk)
    ckpt = open_checkpoint(FIXTURES / LORA)  # (validated: the later parse is done)
    assert not ckpt.errors
    seed = got[0]
    assert seed.path.endswith(D.z3_model_name(0)) and sorted(got) == [0, 1]
    assert got[1].obj is seed.obj and got[1].storages is seed.storages  # one parse, read-only
    assert got[1].records is not seed.records and got[1].path.endswith(D.z3_model_name(1))


def _same_crc_other_bytes(raw: bytes, name: str) -> bytes:
    """`raw` with some letters of `name` (its last place in it) changed to others, so that the
    CRC-32 and the size are the same: CRC-32 is affine, so toggles whose CRC changes XOR to zero
    cancel out; among 33 or more toggles of 32-bit changes such a set exists (Gaussian
    elimination)."""
    at = raw.rindex(name.encode())
    safe = b"bcdefghijklmnopqrstuvwxy0123456789"
    spots = [at + i for i, c in enumerate(name.encode()) if c in safe and c ^ 1 in safe]
    assert len(spots) > 32
    base, basis = zlib.crc32(raw), {}  # pivot bit -> (change, set of spots)
    for spot in spots:
        flipped = bytearray(raw)
        flipped[spot] ^= 1
        change, chosen = zlib.crc32(flipped) ^ base, {spot}
        while change:
            top = change.bit_length() - 1
            if top not in basis:
                basis[top] = (change, chosen)
                break
            change, chosen = change ^ basis[top][0], chosen ^ basis[top][1]
        else:
            forged = bytearray(raw)
            for s in chosen:
                forged[s] ^= 1
            assert forged != raw and zlib.crc32(forged) == base
            return bytes(forged)
    raise AssertionError("no set of toggles keeps the CRC")


@pytest.mark.parametrize("chunk", [None, 64])
def test_same_size_and_crc_but_other_bytes_is_not_shared(tmp_path, monkeypatch, chunk):
    """Rank 1's data.pkl forged to rank 0's size and CRC with a frozen param renamed: it is
    parsed on its own, so rank 1 is found to hold no fragment of that param (sharing rank 0's
    parse would have found nothing)."""
    root = D.copy_root(tmp_path, LORA)
    path = next(root.glob("*/" + D.z3_model_name(1)))
    off, size = D.zip_entry(path, "data.pkl")
    raw = _pickle(path)
    forged = _same_crc_other_bytes(raw, RENAMED)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(forged)
    own = read_torch_file(path)  # the zip's CRC still holds: a readable pickle
    assert RENAMED not in own.obj["frozen_param_fragments"]
    assert RENAMED in torch_load(next(root.glob("*/" + D.z3_model_name(0))))[
        "frozen_param_fragments"]
    got = _later_parses(monkeypatch, chunk)
    ckpt = open_checkpoint(root)
    assert got[1].obj is not got[0].obj
    assert RENAMED not in got[1].obj["frozen_param_fragments"]
    assert [(f.code, f.param, f.rank) for f in ckpt.findings if f.param == RENAMED] == [
        ("param-coverage", RENAMED, 1)]


def test_rank0_changed_since_its_parse_is_not_shared(tmp_path, monkeypatch):
    """Rank 0's data.pkl damaged after its parse, before rank 1's: read again, it is not what
    was parsed (nor rank 1's), so rank 1 gets its own parse."""
    root = D.copy_root(tmp_path, LORA)
    rank0 = next(root.glob("*/" + D.z3_model_name(0)))
    off, _ = D.zip_entry(rank0, "data.pkl")
    got = _later_parses(monkeypatch, None, lambda: D.flip(rank0, off + 40))
    open_checkpoint(root)
    assert got[1].obj is not got[0].obj
    assert got[1].obj == got[0].obj  # the same pickle all the same: only rank 0 changed
