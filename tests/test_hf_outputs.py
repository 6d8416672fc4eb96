"""Outputs people load next: HF folders into real transformers, adapters into real peft, 16-bit
weights bit-equal to torch's own cast. Models are built from the fixture's config.json (offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import FIXTURES, run_zinspect  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from zinspect.core import open_checkpoint  # noqa: E402
from zinspect.core.dtypes import narrow  # noqa: E402
from zinspect.core.merge import merge  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FULL = ["hf_llama_s2_w2_bf16", "hf_llama_tied_s3_w4_fp32"]
LORA = "hf_mistral_lora_s3_w2_bf16"
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def reference(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def ckpt(name: str):
    return open_checkpoint(FIXTURES / name)


@pytest.mark.parametrize("name", FULL)
def test_from_pretrained_loads_the_merge_with_no_missing_or_unexpected_key(name, tmp_path):
    out = tmp_path / "out"
    result = merge(ckpt(name), out)
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert any("copying config.json" in n for n in result.notes)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = reference(name)
    state = model.state_dict()
    for key, want in ref.items():
        assert torch.equal(state[key], want), key
    assert set(state) <= set(ref) | {k for k in state if k.endswith("inv_freq")}


def test_tied_alias_left_out_when_the_config_ties_it(tmp_path):
    name = "hf_llama_tied_s3_w4_fp32"
    merge(ckpt(name), tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in written and "model.embed_tokens.weight" in written
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, reference(name)["lm_head.weight"])
    merge(ckpt(name), tmp_path / "plain", hf_files=False)  # a plain state dict keeps the alias
    assert "lm_head.weight" in load_file(tmp_path / "plain" / "model.safetensors")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", [*FULL, LORA])
def test_16bit_output_is_bit_equal_to_torch_cast_of_the_reference(name, dtype, tmp_path):
    out = tmp_path / "out"
    result = merge(ckpt(name), out, dtype=dtype, hf_files=False)
    assert not (out / "config.json").exists()
    written = load_file(out / "model.safetensors")
    ref = reference(name)
    for key, got in written.items():
        want = ref[key].to(TORCH_DTYPES[dtype]) if ref[key].is_floating_point() else ref[key]
        assert same_bits(got, want), key
    assert result.bytes == sum(t.numel() * t.element_size() for t in written.values())
    if name in FULL:
        shutil.copy(FIXTURES / name / "config.json", out / "config.json")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=TORCH_DTYPES[dtype])
        assert model.model.embed_tokens.weight.dtype == TORCH_DTYPES[dtype]


def test_narrow_matches_torch_on_every_kind_of_value():
    """Random bit patterns (NaNs of every payload and sign, subnormals, infinities) and values
    around the fp16 limit: bit-identical to torch, overflow counted."""
    rng = np.random.default_rng(12)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edge = np.array([65504, 65519.99, 65520, -70000, 1e-8, 6e-8, 3.4e38, np.inf, -np.inf, np.nan,
                     -np.nan, 1 + 2**-8, 1 + 3 * 2**-8], dtype=np.float32)
    for values in (bits, edge):
        t = torch.from_numpy(values.copy())
        for dst, td in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            out, overflow = narrow("float32", dst, memoryview(values.tobytes()),
                                   bytearray(values.nbytes))
            want = t.to(td)
            got = torch.frombuffer(bytearray(out), dtype=td)
            assert same_bits(got, want), dst
            finite = torch.isfinite(t)
            assert overflow == int((finite & torch.isinf(want.float())).sum())
    _, overflow = narrow("float32", "float16", memoryview(edge.tobytes()), bytearray(edge.nbytes))
    assert overflow == 3  # 65520, -70000, 3.4e38


def test_fp16_overflow_is_reported_per_param(tmp_path):
    """A real checkpoint with one param scaled past fp16's range (its fp32 master rewritten)."""
    from conftest import copy_fixture
    from damage import record_holding, set_crc

    name = "hf_llama_s2_w2_bf16"
    tag = copy_fixture(tmp_path, name)
    c = open_checkpoint(tag)
    target = "model.layers.0.mlp.up_proj.weight"
    frag = c.params[target].fragments[0]
    path = tag / frag.file
    with open(path, "r+b") as f:
        f.seek(frag.offset)
        f.write(np.full(3, 1e6, dtype=np.float32).tobytes())
    set_crc(path, record_holding(path, frag.offset)[0].split("/", 1)[1])  # as saved, not corrupt
    result = merge(open_checkpoint(tag), tmp_path / "out", dtype="fp16", hf_files=False)
    assert result.overflow == {target: 3}
    assert any(target in w and "overflowed" in w for w in result.warnings)


def test_no_config_says_what_from_pretrained_needs(tmp_path):
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "hf_llama_s2_w2_bf16")  # latest + tag dir, no config.json
    r = run_zinspect("merge", tag.parent, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "no config.json" in r.stderr and "AutoConfig.from_pretrained" in r.stderr


def test_cli_copies_hf_files_and_no_hf_files_skips_them(tmp_path):
    r = run_zinspect("merge", FIXTURES / FULL[0], tmp_path / "a", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "copying config.json, generation_config.json" in r.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    r = run_zinspect("merge", FIXTURES / FULL[0], tmp_path / "b", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.safetensors"]


def test_sharded_output_uses_hf_names_and_loads(tmp_path):
    out = tmp_path / "out"
    merge(ckpt(FULL[0]), out, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")}
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _base_model(tmp_path, ref):
    """The LoRA run's base model with the reference's base weights (PEFT's base_layer names)."""
    config = transformers.AutoConfig.from_pretrained(FIXTURES / LORA)
    base = transformers.AutoModelForCausalLM.from_config(config)
    prefix = "base_model.model."
    state = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in ref.items()
             if ".lora_" not in k}
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return base


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peft_adapter_loads_with_peftmodel_from_pretrained(tmp_path, dtype):
    out = tmp_path / "adapter"
    r = run_zinspect("merge", FIXTURES / LORA, out, "--peft", "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = load_file(out / "adapter_model.safetensors")
    assert written and all(".default" not in k and ".lora_" in k for k in written)
    ref = reference(LORA)
    model = peft.PeftModel.from_pretrained(_base_model(tmp_path, ref), out)
    state = model.state_dict()
    lora = {k: v for k, v in ref.items() if ".lora_" in k}
    assert len(lora) == len(written)
    for key, want in lora.items():
        want = want if dtype == "fp32" else want.to(torch.bfloat16).float()
        assert torch.equal(state[key].float(), want), key


def test_peft_without_adapter_config_is_an_error(tmp_path):
    root = tmp_path / "run"
    shutil.copytree(FIXTURES / LORA, root)
    (root / "adapter_config.json").unlink()
    r = run_zinspect("merge", root, tmp_path / "out", "--peft")
    assert r.returncode == 2 and "adapter_config.json" in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "out").exists()


def test_full_merge_of_a_peft_run_points_to_peft(tmp_path):
    r = run_zinspect("merge", FIXTURES / LORA, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "--peft writes the adapter" in r.stderr


def test_peft_on_a_plain_run_is_an_error(tmp_path):
    r = run_zinspect("merge", FIXTURES / FULL[0], tmp_path / "out", "--peft")
    assert r.returncode == 2 and "not a PEFT run" in r.stderr


def test_info_recognises_the_peft_run():
    r = run_zinspect("info", FIXTURES / LORA, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["peft"]
    assert got["peft_type"] == "LORA" and got["rank"] == 4 and got["adapter"] == "default"
    assert got["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    params = json.loads(r.stdout)["params"]
    assert got["trainable_numel"] == sum(p["numel"] for p in params if not p["frozen"])
    assert got["base_numel"] == sum(p["numel"] for p in params if p["frozen"])
    human = run_zinspect("info", FIXTURES / LORA)
    assert "LORA r=4" in human.stdout + human.stderr
    assert json.loads(run_zinspect("info", FIXTURES / FULL[0], "--json").stdout)["peft"] is None
