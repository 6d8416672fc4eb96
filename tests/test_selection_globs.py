"""Exclusion globs as users write them, and selection files that say what is wrong with them,
on a real PEFT checkpoint (Mistral + LoRA at ZeRO-3)."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, run_zinspect

from zinspect.core import open_checkpoint
from zinspect.core.selection import Selection, matching
from zinspect.errors import UsageError

LORA = FIXTURES / "hf_mistral_lora_s3_w2_bf16"


@pytest.fixture(scope="module")
def ckpt():
    return open_checkpoint(LORA)


def test_a_pattern_without_a_dot_matches_a_component(ckpt):
    lora = {n for n in ckpt.params if ".lora_" in n}
    assert lora and Selection(exclude_globs=["lora_*"]).excluded(ckpt) == lora
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert matching("lora_*", [lora_a]) == [lora_a]
    assert matching("lora_*", ["model.layers.0.self_attn.q_proj.weight"]) == []


def test_full_name_patterns_keep_working(ckpt):
    got = Selection(exclude_globs=["*.q_proj.lora_A.*"]).excluded(ckpt)
    assert got and all(".q_proj.lora_A." in n for n in got)
    assert Selection(exclude_globs=["base_model.model.lm_head.weight"]).excluded(ckpt) == \
        {"base_model.model.lm_head.weight"}


def test_unmatched_patterns_and_names_are_named(ckpt):
    sel = Selection(exclude={"no.such.param"}, exclude_globs=["lora_*", "lroa_*", "x.*"])
    assert sel.unmatched(ckpt) == ["no.such.param", "lroa_*", "x.*"]
    with pytest.raises(UsageError, match="lroa_"):
        sel.check_matches(ckpt)


def test_cli_exits_2_naming_the_pattern_and_writes_nothing(tmp_path):
    r = run_zinspect("merge", LORA, tmp_path / "out", "--exclude", "lroa_*")
    assert r.returncode == 2 and "'lroa_*'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_zinspect("merge", LORA, tmp_path / "ok", "--exclude", "lora_*", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["excluded"]) == 16


@pytest.mark.parametrize("content, message", [
    ({"exclude_glob": ["lora_*"]}, "unknown key"),
    ({"exclude": "base_model.model.lm_head.weight"}, "'exclude' must be a list"),
    ({"exclude_globs": [1]}, "'exclude_globs' must be a list of strings"),
    ({"exclude_frozen": "yes"}, "'exclude_frozen' must be true or false"),
    ({"zinspect_selection": 7}, "selection format 7"),
    ([], "not a zinspect selection file"),
])
def test_selection_files_are_validated(tmp_path, content, message):
    path = tmp_path / "sel.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        Selection.load(path)
    r = run_zinspect("merge", LORA, tmp_path / "out", "--selection", path)
    assert r.returncode == 2 and message.split("'")[0].strip() in r.stderr


def test_a_selection_file_name_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "sel.json"
    Selection(exclude={"base_model.model.lm_head.wieght"}).save(path)
    r = run_zinspect("merge", LORA, tmp_path / "out", "--selection", path)
    assert r.returncode == 2 and "lm_head.wieght" in r.stderr
