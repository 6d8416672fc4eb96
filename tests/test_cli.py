"""The `zinspect` command, run as a user runs it (a subprocess): info/validate against every
fixture's manifest in both path forms, path resolution, usage errors, help, and merge."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import (
    FIXTURES,
    REPO,
    copy_fixture,
    fixture_names,
    manifest,
    run_zinspect,
    tag_dir,
)

SHORT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def info_json(*args) -> dict:
    r = run_zinspect("info", "--json", *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def expected_group(m: dict, name: str) -> int | None:
    """Index of the manifest param group holding `name` (a tied alias: its owner's)."""
    owner = m["tied"].get(name, name)
    if m["params"][owner]["frozen"]:
        return None
    hits = [i for i, g in enumerate(m["param_groups"]) if owner in g]
    assert len(hits) == 1, (name, hits)
    return hits[0]


# ------------------------------------------------------------------------- info vs manifests
@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", fixture_names)
def test_info_json_matches_manifest(name, form):
    m = manifest(name)
    path = FIXTURES / name if form == "root" else tag_dir(name)
    j = info_json(path)

    assert j["stage"] == m["stage"]
    assert j["world_size"] == m["world_size"]
    assert j["dtype"] == m["dtype"]
    assert j["tag"] == m["tag"]
    assert j["ds_version"] == m["deepspeed_version"]
    assert Path(j["path"]).resolve() == tag_dir(name).resolve()
    assert j["tags"] == [m["tag"]]

    params = j["params"]
    assert [p["name"] for p in params] == list(m["params"])  # exact set and model order
    model_dtype = SHORT[m["model_param_dtype"]]
    for p in params:
        want = m["params"][p["name"]]
        assert p["shape"] == want["shape"], p["name"]
        assert p["numel"] == want["numel"], p["name"]
        assert p["frozen"] is want["frozen"], p["name"]
        assert p["tied_to"] == m["tied"].get(p["name"]), p["name"]
        assert p["group"] == expected_group(m, p["name"]), p["name"]
        assert p["dtype"] == model_dtype, p["name"]
    assert {p["name"] for p in params if p["frozen"]} == set(m["frozen"])
    # tied params appear under both names, with the same shape
    for alias, owner in m["tied"].items():
        by_name = {p["name"]: p for p in params}
        assert by_name[alias]["shape"] == by_name[owner]["shape"]

    assert {b["name"]: b["shape"] for b in j["buffers"]} == m["buffers"]
    assert [b["name"] for b in j["buffers"]] == list(m["buffers"])

    # the files the generator wrote, each readable, ranks parsed from the names
    want_files = {Path(f).name for f in m["files"] if f.startswith(m["tag"] + "/")}
    assert {f["name"] for f in j["files"]} == want_files
    for f in j["files"]:
        assert f["error"] is None and f["format"] == "zip", f
        if f["rank"] is not None:
            assert f"rank_{f['rank']}_" in f["name"]
    assert [g["params"] for g in j["groups"]] == m["flat_groups"]
    assert j["counts"]["error"] == 0
    assert j["counts"] == {s: sum(f["severity"] == s for f in j["findings"])
                           for s in ("error", "warning", "info")}
    assert j["totals"]["numel"] == m["model"]["num_params_unique"]


@pytest.mark.parametrize("name", fixture_names)
def test_validate_exits_0_on_every_fixture(name):
    for path in (FIXTURES / name, tag_dir(name)):
        r = run_zinspect("validate", path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ok" in r.stdout
        r = run_zinspect("validate", "--json", path)
        assert r.returncode == 0, r.stderr
        j = json.loads(r.stdout)
        assert j["ok"] is True and j["counts"]["error"] == 0
        assert all(f["severity"] != "error" for f in j["findings"])


def test_info_human_output():
    r = run_zinspect("info", FIXTURES / "s3_w4_bf16")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("global_step2", "ZeRO stage", "bf16", "0.19.8", "frozen", "tied",
                 "zero_pp_rank_3_mp_rank_00_model_states.pt",
                 "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", "param groups"):
        assert text in out, text
    assert re.search(r"world size\s+4", out)
    assert re.search(r"ZeRO stage\s+3", out)


def test_open_without_a_terminal_prints_the_summary():
    # stdout is a pipe here, so no app: the summary, exit 0
    r = run_zinspect(FIXTURES / "s2_w2_bf16")
    assert r.returncode == 0, r.stderr
    assert "ZeRO stage" in r.stdout and "global_step2" in r.stdout


# ------------------------------------------------------------------------- path resolution
def _two_tags(tmp_path: Path) -> Path:
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    shutil.copytree(tag, tag.parent / "global_step7")
    return tag.parent


def test_tag_option_picks_another_tag(tmp_path):
    root = _two_tags(tmp_path)
    j = info_json(root)
    assert j["tag"] == "global_step2"  # what `latest` says
    assert j["tags"] == ["global_step2", "global_step7"]
    j = info_json(root, "--tag", "global_step7")
    assert j["tag"] == "global_step7"
    assert Path(j["path"]).name == "global_step7"
    r = run_zinspect("info", root, "--tag", "global_step9")
    assert r.returncode == 2
    assert "global_step9" in r.stderr and "global_step7" in r.stderr


def test_no_latest_and_one_tag_dir(tmp_path):
    root = copy_fixture(tmp_path, "s1_w2_fp32").parent
    (root / "latest").unlink()
    j = info_json(root)
    assert j["tag"] == "global_step2" and j["stage"] == 1


def test_no_latest_and_several_tags_lists_them(tmp_path):
    root = _two_tags(tmp_path)
    (root / "latest").unlink()
    for cmd in ("info", "validate"):
        r = run_zinspect(cmd, root)
        assert r.returncode == 2
        assert "global_step2" in r.stderr and "global_step7" in r.stderr and "--tag" in r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["info", "validate", None])
def test_unusable_paths_exit_2(tmp_path, cmd):
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"not a checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, words in ((a_file, "is a file"), (empty, "no DeepSpeed checkpoint"),
                        (tmp_path / "nope", "no such file")):
        r = run_zinspect(*([cmd] if cmd else []), path)
        assert r.returncode == 2, (path, r.stdout, r.stderr)
        assert words in r.stderr and "hint:" in r.stderr
        assert "Traceback" not in r.stderr


def test_every_file_unreadable_exits_2(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    for f in tag.iterdir():
        f.write_bytes(b"garbage" * 10)
    for cmd in ("info", "validate"):
        r = run_zinspect(cmd, tag)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stderr


def test_info_still_reads_a_broken_checkpoint(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    j = info_json(tag)  # exit 0: it shows what could be read
    assert j["counts"]["error"] > 0
    assert [p["name"] for p in j["params"]] == list(manifest("s2_w4_fp16")["params"])
    r = run_zinspect("validate", tag)
    assert r.returncode == 1
    assert "truncated" in r.stdout and victim.name in r.stdout and "hint:" in r.stdout
    r = run_zinspect("validate", "--json", tag)
    assert r.returncode == 1
    j = json.loads(r.stdout)
    assert j["ok"] is False and j["counts"]["error"] >= 1
    assert any(f["code"] == "truncated-file" and f["file"] == victim.name for f in j["findings"])


def test_validate_reports_a_missing_rank(tmp_path):
    tag = copy_fixture(tmp_path, "s3_w4_bf16")
    (tag / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    r = run_zinspect("validate", "--json", tag)
    assert r.returncode == 1
    codes = {f["code"] for f in json.loads(r.stdout)["findings"]}
    assert "missing-optimizer-file" in codes


# ------------------------------------------------------------------------- usage, help
@pytest.mark.parametrize("args", [
    ["info"],  # no PATH
    ["validate", "--bogus", "x"],
    ["merge", str(FIXTURES / "s1_w2_fp32")],  # no OUT_DIR
    ["merge", str(FIXTURES / "s1_w2_fp32"), "out", "--format", "npz"],
    ["--no-such-option"],
    [],
])
def test_bad_usage_exits_2(args):
    r = run_zinspect(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "usage:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [None, "info", "validate", "merge"])
def test_help_teaches(cmd):
    r = run_zinspect(*([cmd] if cmd else []), "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "usage:" in out and "examples:" in out and "exit codes:" in out
    assert "zinspect " + (cmd or "") in out
    if cmd:
        assert "--tag" in out and "--json" in out or cmd == "merge"
    if cmd == "merge":
        for opt in ("--format", "--max-shard-size", "--exclude", "--exclude-frozen",
                    "--selection", "--force", "--salvage"):
            assert opt in out


def test_version_matches_pyproject():
    want = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    r = run_zinspect("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"zinspect {want}"
    import zinspect

    assert zinspect.__version__ == want
