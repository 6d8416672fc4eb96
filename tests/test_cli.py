"""The `zinspect` command, run as a user runs it (a subprocess): info/validate against every
fixture's manifest in both path forms, path resolution, usage errors, help, and merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


# ------------------------------------------------------------------------- merge
def _reference(name: str) -> dict:
    import torch

    return torch.load(FIXTURES / name / "reference_fp32.pt", map_location="cpu",
                      weights_only=True)


def _safetensors(out: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.mark.parametrize("name", ["s3_w4_bf16", "s1_w2_bf16_bf16opt", "s2_w3_fp32_rr"])
def test_merge_writes_the_reference(tmp_path, name):
    import torch

    out = tmp_path / "out"
    r = run_zinspect("merge", FIXTURES / name, out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    m = manifest(name)
    assert res["files"] == ["model.safetensors"] and res["dropped"] == {}
    assert res["tensors"] == len(m["params"]) + len(m["buffers"])
    assert "writing" in r.stderr and f"{len(m['params'])} params" in r.stderr
    state = _safetensors(out)
    ref = _reference(name)
    assert set(state) == set(m["params"]) | set(m["buffers"])
    for n in m["params"]:
        assert state[n].dtype == torch.float32 and torch.equal(state[n], ref[n].float()), n


def test_merge_pt_sharded_with_exclusions(tmp_path):
    import torch

    name = "s2_w4_fp16"
    m = manifest(name)
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"zinspect_selection": 1, "exclude": ["encoder.cube"]}))
    out = tmp_path / "out"
    r = run_zinspect("merge", FIXTURES / name, out, "--format", "pt", "--max-shard-size", "8KB",
                     "--exclude", "encoder.blocks.1.*", "--exclude-frozen", "--selection", sel,
                     "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["files"]) > 2 and "pytorch_model.bin.index.json" in res["files"]
    assert sorted(os.listdir(out)) == sorted(res["files"])
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    excluded = {n for n in m["params"] if n.startswith("encoder.blocks.1.")} | \
        set(m["frozen"]) | {"encoder.cube"}
    assert set(index["weight_map"]) == (set(m["params"]) | set(m["buffers"])) - excluded
    assert "excluded by the selection" in r.stderr
    ref = _reference(name)
    for f in set(index["weight_map"].values()):
        for n, t in torch.load(out / f, map_location="cpu", weights_only=True).items():
            if n in m["params"]:
                assert torch.equal(t, ref[n].float()), n


def test_merge_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    assert run_zinspect("merge", FIXTURES / "s1_w2_fp32", out).returncode == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", out)
    assert r.returncode == 2 and "--force" in r.stderr
    assert "merging" not in r.stderr  # refused before any progress bar
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", out, "--force")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("size", ["5XB", "-1GB", "lots", "1" + "0" * 400, "0.1"])
def test_merge_bad_shard_size_exits_2(tmp_path, size):
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", tmp_path / "out", f"--max-shard-size={size}")
    assert r.returncode == 2 and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [
    b"{not json", b"\x80\x02\xff\xfe binary", b"[1, 2]", b'{"exclude_globs": 5}',
    b'{"exclude_globs": null}', b'{"exclude_globs": "head.*"}', b'{"exclude": [1]}',
    b'{"exclude_frozen": "yes"}'])
def test_merge_bad_selection_file_exits_2(tmp_path, content):
    sel = tmp_path / "sel.json"
    sel.write_bytes(content)
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", tmp_path / "out", "--selection", sel)
    assert r.returncode == 2 and "selection" in r.stderr and "hint:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_merge_that_excludes_everything_writes_nothing(tmp_path):
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", tmp_path / "out", "--exclude", "*")
    assert r.returncode == 2 and "nothing to write" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_merge_broken_checkpoint_refused_then_salvaged(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    r = run_zinspect("merge", tag, out)
    assert r.returncode == 1 and "--salvage" in r.stderr
    assert not out.exists()
    r = run_zinspect("merge", tag, out, "--salvage", "--json")
    assert r.returncode == 1, r.stderr
    dropped = json.loads(r.stdout)["dropped"]
    assert "encoder.blocks.1.mlp.up.weight" in dropped  # wholly on rank 2
    for n, why in dropped.items():
        assert f"{n}: {why}" in r.stderr  # listed with the reason
    state = _safetensors(out)
    assert not set(dropped) & set(state)
    m = manifest("s2_w4_fp16")
    assert set(state) == (set(m["params"]) | set(m["buffers"])) - set(dropped)


def test_merge_cancel_leaves_nothing(tmp_path, monkeypatch, capsys):
    """should_stop() answering True (what Ctrl-C sets) cancels with 130 and no output."""
    from zinspect import cli
    from zinspect.cli import common

    monkeypatch.setattr(common.Stop, "__call__", lambda self: True)
    out = tmp_path / "out"
    code = cli.main(["merge", str(FIXTURES / "s3_w4_bf16"), str(out)])
    assert code == 130
    assert "cancelled" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_handler_asks_to_stop_then_aborts():
    import signal

    from zinspect.cli import common

    before = signal.getsignal(signal.SIGINT)
    with common.Stop() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handler
        assert stop() is False
        stop._handler(signal.SIGINT, None)
        assert stop() is True
        with pytest.raises(KeyboardInterrupt):
            stop._handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == before


def test_merge_sigint_in_a_subprocess(tmp_path):
    """A real SIGINT while a merge runs: exit 130, nothing left. The merge is slowed by a
    progress callback that waits for the signal, so no timing is involved."""
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    code = (
        "import os, sys, time\n"
        "from zinspect import cli\n"
        "from zinspect.cli import common\n"
        "orig = common.Bar.update\n"
        "def update(self, done, total, name=''):\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    orig(self, done, total, name)\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not cli._STOP_SEEN and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "cli._STOP_SEEN = False\n"
        "h = common.Stop._handler\n"
        "def handler(self, *a):\n"
        "    h(self, *a)\n"
        "    cli._STOP_SEEN = True\n"
        "common.Stop._handler = handler\n"
        "common.Bar.update = update\n"
        f"sys.exit(cli.main(['merge', {str(FIXTURES / 's3_w4_bf16')!r}, {str(out)!r}]))\n")
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 60
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "cancelled" in err and "Traceback" not in err
    assert not out.exists()


def test_validate_deep(tmp_path):
    r = run_zinspect("validate", "--deep", "--json", FIXTURES / "s2_w2_bf16")
    assert r.returncode == 0, r.stderr
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    victim = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    from zinspect.core import open_checkpoint

    frag = next(f for p in open_checkpoint(tag).owners() for f in p.fragments
                if f.file == victim.name and f.numel > 4)
    data[frag.offset + 1] ^= 0xFF  # one byte of an fp32 master
    victim.write_bytes(bytes(data))
    assert run_zinspect("validate", tag).returncode == 0  # metadata alone cannot see it
    r = run_zinspect("validate", "--deep", "--json", tag)
    assert r.returncode == 1, r.stderr
    hits = [f for f in json.loads(r.stdout)["findings"] if f["code"] == "crc-mismatch"]
    assert [h["file"] for h in hits] == [victim.name]


def test_merge_into_a_path_under_a_file_exits_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_zinspect("merge", FIXTURES / "s1_w2_fp32", tmp_path / "afile" / "out")
    assert r.returncode == 2 and "cannot use it as the output directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_dir_that_cannot_be_listed_is_a_clean_error(monkeypatch, tmp_path):
    from zinspect.core import discover
    from zinspect.errors import CheckpointNotFound

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(discover.Path, "iterdir", denied)
    with pytest.raises(CheckpointNotFound, match="Permission denied") as e:
        discover.locate(tmp_path)
    assert "chmod" in e.value.hint


NO_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` raises ImportError
from zinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pt_output_without_torch_says_what_to_install(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "merge", str(FIXTURES / "s3_w4_bf16"),
                        str(out), "--format", "pt"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "torch is not installed" in r.stderr and "zinspect[torch]" in r.stderr
    assert "internal error" not in r.stderr and "writing" not in r.stderr and not out.exists()
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "merge", str(FIXTURES / "s1_w4_bf16"),
                        str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr  # safetensors (fp16/bf16 upcasts too) needs no torch


# -- wording a newcomer meets (issue 14 items 5 and 6) -----------------------------------------
@pytest.mark.parametrize("typo,meant", [("valdate", "validate"), ("mrege", "merge"),
                                        ("inof", "info")])
def test_a_mistyped_command_suggests_the_command(typo, meant):
    r = run_zinspect(typo, FIXTURES / "s3_w4_bf16")
    assert r.returncode == 2
    assert f"did you mean `zinspect {meant}`?" in r.stderr
    assert "unrecognized arguments" not in r.stderr and "Traceback" not in r.stderr


def test_a_dir_named_like_a_typo_is_still_opened_as_a_path(tmp_path):
    """Only a word that is no existing path is taken for a typo: `zinspect valdate` with a
    ./valdate dir goes to the app's path handling (here: not a checkpoint, exit 2, no hint)."""
    (tmp_path / "valdate").mkdir()
    r = run_zinspect("valdate", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean" not in r.stderr
    assert "no DeepSpeed checkpoint here" in r.stderr


@pytest.mark.parametrize("where", ["not_empty", "in_tag"])
def test_merge_checks_the_output_before_announcing(tmp_path, where):
    out = tmp_path / "out"
    if where == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out = copy_fixture(tmp_path, "s2_w4_fp16") / "merged"
    r = run_zinspect("merge", out.parent.parent if where == "in_tag" else FIXTURES / "s2_w4_fp16",
                     out)
    assert r.returncode == 2, r.stderr
    assert "writing" not in r.stderr, r.stderr  # refused first, nothing announced
    assert ("not empty" if where == "not_empty" else "inside the checkpoint") in r.stderr


def test_merge_too_small_disk_refuses_before_announcing(tmp_path, monkeypatch, capsys):
    import shutil as sh

    from zinspect import cli

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1000))
    assert cli.main(["merge", str(FIXTURES / "s3_w2_fp32"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "only 1,000 are free" in err and "writing" not in err
    assert not (tmp_path / "out").exists()


def test_deep_check_of_a_hostile_file_does_not_talk_of_salvage(tmp_path):
    from damage import malicious_pickle

    root = malicious_pickle(tmp_path, tmp_path / "marker")
    r = run_zinspect("validate", "--deep", root)
    assert r.returncode == 1 and "unsafe-pickle" in r.stdout
    assert "--salvage" not in r.stdout and not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["s2_w4_fp16", "s3_w4_bf16", "s1_w2_bf16_bf16opt"])
def test_info_size_is_what_the_merge_writes(tmp_path, name):
    """One size rule: `info` (json and human), the merge announcement and the bytes written
    agree, tied aliases and buffers included (info said 143.4 KiB where merge said 168.2)."""
    from zinspect.core import fmt

    totals = info_json(FIXTURES / name)["totals"]
    r = run_zinspect("merge", FIXTURES / name, tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["bytes"]
    assert totals["output_bytes"] == written
    assert written > totals["fp32_bytes"]  # a tied alias and the buffers are written too
    human = run_zinspect("info", FIXTURES / name).stdout
    assert f"fp32 output  {fmt.size(written)}" in human
    assert f"({fmt.size(written)}) to" in r.stderr


@pytest.mark.parametrize("name", fixture_names)
def test_the_app_overview_size_is_the_info_size(name):
    """The app's Overview ("fp32 output") and `info` use the same rule, on every fixture."""
    from zinspect.core import open_checkpoint
    from zinspect.core.plan import plan_merge
    from zinspect.report import totals
    from zinspect.tui.inspection import Inspection

    ckpt = open_checkpoint(FIXTURES / name)
    out = Inspection(ckpt).output
    assert out.nbytes + out.excluded_nbytes == totals(ckpt)["output_bytes"] \
        == plan_merge(ckpt).total_bytes


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_validate_deep_stopped_by_a_signal_exits_128_plus_it(sig, code):
    """A signal during `validate --deep` (sent from its first progress call, so no timing is
    involved) stops it with the signal's exit code, as a merge does."""
    import subprocess
    import sys

    probe = (
        "import os, signal, sys\n"
        "from zinspect import cli\n"
        "from zinspect.cli import common\n"
        "orig, sent = common.Bar.update, []\n"
        "def update(self, done, total, name=''):\n"
        "    if not sent:\n"
        f"        sent.append(1); os.kill(os.getpid(), signal.{sig})\n"
        "    orig(self, done, total, name)\n"
        "common.Bar.update = update\n"
        f"sys.exit(cli.main(['validate', '--deep', {str(FIXTURES / 's3_w4_bf16')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert "cancelled" in r.stderr and "Traceback" not in r.stderr
