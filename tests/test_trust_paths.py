"""Safe paths in and escaped output (issue 8, items 4 and 6), on damaged copies of real fixtures.

Every run is a subprocess with a timeout, as a user runs it: a FIFO under a rank-file name
would block an open() forever, and a hang must fail the test, not stall the suite."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import FIXTURES, run_zinspect
from damage import (
    FORGED_NAME,
    MODEL,
    SPECIAL_KINDS,
    TAG,
    copy_root,
    forged_name,
    hostile_latest,
    optim_name,
    special_rank_file,
    z3_model_name,
)

TIMEOUT = 60
#: what the finding says each special file is
SAID = {"fifo": "a FIFO", "dev_zero_link": "a symbolic link to a character device",
        "dangling_link": "a dangling symbolic link", "link_loop": "a symbolic link loop",
        "directory": "a directory"}
#: bytes no human output may hold: ESC, BEL, CSI (C1), the ANSI/OSC introducers
RAW_CONTROL = ("\x1b", "\x07", "\x9b")


def run(*args, **kw):
    return run_zinspect(*args, timeout=TIMEOUT, **kw)


def flat(text: str) -> str:
    """Human output with rich's line wrapping undone."""
    return " ".join(text.split())


def no_raw_control(text: str) -> None:
    for c in RAW_CONTROL:
        assert c not in text, repr(text[:400])


# ---------------------------------------------------------------------------- hostile `latest`
def _latest_cases(tmp):
    return {
        "parent": b"../decoy",
        "absolute": str(tmp / "decoy").encode(),
        "nested": b"global_step2/../../decoy",
        "dot": b".",
        "escapes": b"\x1b]0;owned\x07global_step2",
        "binary": bytes(range(256)),
        "huge": b"A" * (16 << 20),
    }


@pytest.mark.parametrize("case", ["parent", "absolute", "nested", "dot", "escapes", "binary",
                                  "huge"])
def test_hostile_latest_is_refused_naming_it(tmp_path, case):
    content = _latest_cases(tmp_path)[case]
    root = hostile_latest(tmp_path, content)
    for cmd in (["validate"], ["info"], ["validate", "--json"]):
        r = run(*cmd, root)
        assert r.returncode == 2, (cmd, r.stdout[:300], r.stderr[:300])
        assert r.stdout == ""  # the decoy (a healthy checkpoint) was not validated
        assert f"{root / 'latest'}:" in r.stderr and "hint:" in r.stderr
        assert len(r.stderr) < 1500  # a 16 MiB `latest` is not echoed
        no_raw_control(r.stderr)
    if case == "escapes":
        assert "\\x1b]0;owned\\x07global_step2" in r.stderr  # what it holds, made visible
    if case in ("parent", "absolute"):
        assert "does not name a directory directly inside" in r.stderr
    r = run("merge", root, tmp_path / "out")
    assert r.returncode == 2 and not (tmp_path / "out").exists()


def test_latest_with_a_trailing_newline_is_fine(tmp_path):
    root = hostile_latest(tmp_path, b"global_step2\n")
    r = run("validate", root)
    assert r.returncode == 0, r.stderr


def test_hostile_latest_leaves_tag_for_an_explicit_tag(tmp_path):
    root = hostile_latest(tmp_path, b"../decoy")
    r = run("validate", root, "--tag", TAG)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------- special files under rank names
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_model_states_is_a_located_error_and_never_opened(tmp_path, kind):
    """Stage 2, the one model-states file: before, a dangling link or a link to /dev/zero gave
    'ok: 0 errors' and a merge of 0 tensors (exit 0); a FIFO blocked the open() forever."""
    root = special_rank_file(tmp_path, kind)
    r = run("validate", "--json", root)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    errs = [f for f in doc["findings"] if f["severity"] == "error" and f["file"] == MODEL]
    assert errs and SAID[kind] in errs[0]["message"], doc["findings"]
    assert "not a regular file" in errs[0]["message"] and errs[0]["hint"]
    r = run("validate", root)
    assert r.returncode == 1 and "ok:" not in r.stdout and SAID[kind] in flat(r.stdout)
    r = run("info", "--json", root)
    assert r.returncode == 0, r.stderr
    files = {f["name"]: f for f in json.loads(r.stdout)["files"]}
    assert SAID[kind] in files[MODEL]["error"]
    for extra in ([], ["--salvage"]):
        out = tmp_path / ("out" + "".join(extra))
        r = run("merge", root, out, *extra)
        assert r.returncode == 1, (extra, r.stderr)
        assert "wrote" not in r.stderr and not out.exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link", "directory"])
def test_special_optimizer_file_names_its_rank(tmp_path, kind):
    root = special_rank_file(tmp_path, kind, optim_name(1))
    r = run("validate", "--json", root)
    assert r.returncode == 1, r.stderr
    hits = [f for f in json.loads(r.stdout)["findings"]
            if f["file"] == optim_name(1) and SAID[kind] in f["message"]]
    assert hits and hits[0]["rank"] == 1 and hits[0]["severity"] == "error"
    r = run("validate", "--deep", root)  # the deep check must not open it either
    assert r.returncode == 1 and SAID[kind] in flat(r.stdout)


def test_special_zero3_model_states_of_a_later_rank(tmp_path):
    """ZeRO-3 model states of ranks > 0 are only checked whole at open: a FIFO there too."""
    root = special_rank_file(tmp_path, "fifo", z3_model_name(1), fixture="s3_w2_fp32")
    r = run("validate", "--json", root)
    assert r.returncode == 1, r.stderr
    hits = [f for f in json.loads(r.stdout)["findings"] if f["file"] == z3_model_name(1)]
    assert any(SAID["fifo"] in f["message"] and f["rank"] == 1 for f in hits), hits


def test_symlink_to_a_regular_file_is_followed_and_said(tmp_path):
    import torch
    from safetensors.torch import load_file

    root = special_rank_file(tmp_path, "regular_link")
    r = run("validate", "--json", root)
    assert r.returncode == 0, r.stdout
    links = [f for f in json.loads(r.stdout)["findings"] if f["code"] == "symlinked-file"]
    assert [(f["severity"], f["file"]) for f in links] == [("info", MODEL)]
    assert str(root.parent / f"{root.name}-real-file") in links[0]["message"]
    r = run("merge", root, tmp_path / "out", "--max-shard-size", "0")
    assert r.returncode == 0, r.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = torch.load(FIXTURES / "s2_w2_fp32_plain" / "reference_fp32.pt", weights_only=True)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k].float() if ref[k].is_floating_point() else ref[k])
               for k in ref)


# ----------------------------------------------------------------------------- escaped output
@pytest.fixture
def forged(tmp_path):
    """The forged name, plus a missing rank so that findings quote it."""
    root = forged_name(tmp_path)
    (root / TAG / optim_name(1)).unlink()
    return root


def test_validate_escapes_a_forged_name_and_json_keeps_it_exact(forged):
    r = run("validate", "-v", forged)
    assert r.returncode == 1
    no_raw_control(r.stdout)
    lines = r.stdout.splitlines()
    assert not [x for x in lines if x.startswith("ok:")], r.stdout  # the forged line is gone
    assert "\\e[2K\\nok: 0 errors\\e]0;\\x07" in r.stdout
    assert lines[-1].startswith("not mergeable as is")
    r = run("validate", "--json", forged)
    named = {f["param"] for f in json.loads(r.stdout)["findings"]}
    assert FORGED_NAME in named  # exact, JSON-escaped on the wire
    assert "\x1b" not in r.stdout and "\\u001b" in r.stdout


def test_merge_escapes_names_it_lists_and_writes_them_exactly(tmp_path):
    root = forged_name(tmp_path)
    out = tmp_path / "out"
    r = run("merge", root, out, "--exclude", "*errors*", "--json")
    assert r.returncode == 0, r.stderr
    no_raw_control(r.stderr)
    assert "excluded by the selection: 1 (\\e[2K\\nok: 0 errors" in r.stderr
    assert json.loads(r.stdout)["excluded"] == [FORGED_NAME]
    out2 = tmp_path / "out2"
    r = run("merge", root, out2, "--max-shard-size", "0")
    assert r.returncode == 0, r.stderr
    raw = (out2 / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert FORGED_NAME in header  # the output keeps the name as the checkpoint has it


def test_merge_refusal_escapes_names(forged, tmp_path):
    r = run("merge", forged, tmp_path / "out")
    assert r.returncode == 1
    no_raw_control(r.stderr)
    assert not [x for x in r.stderr.splitlines() if x.startswith("ok:")], r.stderr


def test_info_escapes_a_forged_tag_and_json_keeps_it_exact(tmp_path):
    root = copy_root(tmp_path, "s2_w2_fp32_plain", "forged_tag")
    tag = "step\x1b[31m\nok: 0 errors\x07"
    (root / TAG).rename(root / tag)
    (root / "latest").unlink()
    r = run("info", root / tag)
    assert r.returncode == 0, r.stderr
    no_raw_control(r.stdout)
    assert "step\\e[31m\\nok: 0 errors\\x07" in r.stdout
    assert not [x for x in r.stdout.splitlines() if x.startswith("ok:")]
    r = run("info", "--json", root / tag)
    assert json.loads(r.stdout)["tag"] == tag
    r = run("validate", root / tag)
    no_raw_control(r.stdout)
    assert [x for x in r.stdout.splitlines() if x.startswith("ok:")] == \
        [r.stdout.splitlines()[-1]]  # only the real verdict


def test_the_escaping_rule_shortens_and_keeps_both_ends():
    from zinspect.core.fmt import SHOWN_CHARS, shown

    s = shown("a" * 30_000 + "\x1b")
    assert len(s) == SHOWN_CHARS and s.endswith("a\\e") and "..." in s
    assert len(shown("x" * 24_000_000)) == SHOWN_CHARS
    assert shown("line\u2028two\u202eowt") == "line\\u2028two\\u202eowt"
    assert shown("naïve ✓ 中文") == "naïve ✓ 中文"  # printable text is left alone
