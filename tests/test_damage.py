"""The damage corpus: broken, partial and hostile copies of the real fixtures, each with its exact
verdict from `zinspect validate`, `info` and `merge` (run as a user runs them, in a subprocess),
and from the app. A hostile pickle must never run, in any command.

Verdicts: validate exits 1 with the listed error codes when the checkpoint is found and partly
readable, 2 when it cannot be located or nothing in it can be read; info exits 0 whenever it can
show something; merge refuses (non-zero, the reason on stderr) and leaves no output behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import damage as D
import pytest
from conftest import REPO, run_zinspect

TIMEOUT = 60  # seconds; a hang guard only: every command takes well under a second here


@dataclass
class Case:
    build: object  # damage builder: tmp dir -> PATH
    rc: int  # exit code of `zinspect validate`
    errors: set[str] = field(default_factory=set)  # exact set of error codes (rc 1)
    #: findings that must exist: (code, file or None, rank or None); file/rank must match
    named: list[tuple[str, str | None, int | None]] = field(default_factory=list)
    stderr: str = ""  # rc 2: words the message must hold
    text: str = ""  # a word the key finding's message must hold


OPTIM = D.optim_name
CASES = {
    "missing_optim": Case(D.missing_optim, 1, {"missing-optimizer-file", "param-coverage"},
                          [("missing-optimizer-file", None, 2), ("param-coverage", None, 2)]),
    "missing_model_z3": Case(D.missing_model_z3, 1,
                             {"missing-model-states-file", "param-coverage"},
                             [("missing-model-states-file", None, 2),
                              ("param-coverage", None, 2)]),
    "rank_gap_stale": Case(D.rank_gap_stale, 1,
                           {"missing-optimizer-file", "stale-rank-file", "param-coverage"},
                           [("missing-optimizer-file", None, 2), ("stale-rank-file", OPTIM(7), 7)]),
    "extra_stale": Case(D.extra_stale, 1, {"stale-rank-file"}, [("stale-rank-file", OPTIM(4), 4)]),
    "truncated_60": Case(D.truncated_60, 1, {"truncated-file", "param-truncated"},
                         [("truncated-file", OPTIM(1), 1), ("param-truncated", OPTIM(1), 1)],
                         text="truncated"),
    "truncated_100": Case(D.truncated_100, 1, {"unreadable-file", "param-coverage"},
                          [("unreadable-file", OPTIM(1), 1), ("param-coverage", None, 1)],
                          text="truncated"),
    "corrupt_pickle": Case(D.corrupt_pickle, 1, {"unreadable-file", "param-coverage"},
                           [("unreadable-file", OPTIM(1), 1)], text="data.pkl"),
    "corrupt_pickle_crc_ok": Case(D.corrupt_pickle_crc_ok, 1,
                                  {"unreadable-file", "param-coverage"},
                                  [("unreadable-file", OPTIM(1), 1)], text="pickle is corrupt"),
    "not_a_zip": Case(D.not_a_zip, 1, {"unreadable-file", "param-coverage"},
                      [("unreadable-file", OPTIM(1), 1)], text="not a torch.save file"),
    "zero_bytes": Case(D.zero_bytes, 1, {"unreadable-file", "param-coverage"},
                       [("unreadable-file", OPTIM(1), 1)], text="empty"),
    "all_unreadable": Case(D.all_unreadable, 2, stderr="no file in it can be read"),
    "latest_missing_tag": Case(D.latest_missing_tag, 2, stderr="global_step9"),
    "no_latest_two_tags": Case(D.no_latest_two_tags, 2, stderr="--tag"),
    "empty_dir": Case(D.empty_dir, 2, stderr="no DeepSpeed checkpoint here"),
    "path_is_file": Case(D.path_is_file, 2, stderr="is a file"),
    "other_world_size": Case(D.other_world_size, 1,
                             {"world-size-mismatch", "partition-size", "group-coverage",
                              "param-overlap", "param-order-mismatch"},
                             [("world-size-mismatch", OPTIM(1), 1), ("partition-size", OPTIM(1), 1)],
                             text="world size 3"),
    "mixed_stages": Case(D.mixed_stages, 1, {"stage-mismatch", "group-missing", "param-coverage"},
                         [("stage-mismatch", OPTIM(1), 1), ("group-missing", OPTIM(1), 1)],
                         text="ZeRO-3"),
    "malicious_pickle": Case(None, 1, {"unsafe-pickle", "no-params"},
                             [("unsafe-pickle", D.MODEL, None), ("no-params", D.MODEL, None)],
                             text="posix.system"),
}


def build(name: str, tmp: Path) -> Path:
    if name == "malicious_pickle":
        return D.malicious_pickle(tmp, tmp / "MARKER")
    return CASES[name].build(tmp)


def run_json(*args) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = run_zinspect(*args, "--json", timeout=TIMEOUT)
    assert "Traceback" not in r.stderr, r.stderr
    return r, (json.loads(r.stdout) if r.stdout.strip() else None)


def check_findings(case: Case, findings: list[dict]) -> None:
    errors = {f["code"] for f in findings if f["severity"] == "error"}
    assert errors == case.errors
    for code, file, rank in case.named:
        hits = [f for f in findings if f["code"] == code and
                (file is None or f["file"] == file) and (rank is None or f["rank"] == rank)]
        assert hits, f"no {code} naming file={file} rank={rank}: {findings}"
    if case.text:
        key = case.named[0][0]
        assert any(case.text in f["message"] for f in findings if f["code"] == key), findings
    for f in findings:
        if f["severity"] == "error":  # every error says where: a file, a rank, a group or param
            assert f["file"] or f["rank"] is not None or f["group"] is not None or f["param"], f
            assert f["hint"], f


@pytest.mark.parametrize("name", list(CASES))
def test_validate_verdict(tmp_path, name):
    case = CASES[name]
    path = build(name, tmp_path)
    r, out = run_json("validate", path)
    assert r.returncode == case.rc, r.stderr
    if case.rc == 2:
        assert case.stderr in r.stderr
        assert "hint:" in r.stderr
        return
    assert out["ok"] is False
    check_findings(case, out["findings"])
    human = run_zinspect("validate", path, timeout=TIMEOUT)  # the same verdict, for people
    assert human.returncode == case.rc
    assert case.named[0][0] in human.stdout


@pytest.mark.parametrize("name", list(CASES))
def test_info_shows_what_can_be_read(tmp_path, name):
    case = CASES[name]
    path = build(name, tmp_path)
    r, out = run_json("info", path)
    if name == "all_unreadable":  # located: exit 2, but it lists each file and why it failed
        assert r.returncode == 2
        assert len(out["files"]) == 5 and all("empty" in f["error"] for f in out["files"])
        return
    if case.rc == 2:
        assert r.returncode == 2 and case.stderr in r.stderr and out is None
        return
    assert r.returncode == 0, r.stderr
    assert out["counts"]["error"] >= 1
    assert out["stage"] in (2, 3) and out["world_size"] in (2, 4)
    damaged = {f for _, f, _ in case.named if f}
    by_name = {f["name"]: f for f in out["files"]}
    assert damaged <= set(by_name)
    # the intact files are read as usual
    assert any(f["format"] == "zip" and not f["error"] for f in out["files"])
    if name != "malicious_pickle":  # the model states are intact: every param is listed
        assert len(out["params"]) >= 20
    human = run_zinspect("info", path, timeout=TIMEOUT)
    assert human.returncode == 0 and "error(s)" in human.stdout


@pytest.mark.parametrize("name", list(CASES))
def test_merge_refuses_and_leaves_nothing(tmp_path, name):
    case = CASES[name]
    path = build(name, tmp_path)
    out_dir = tmp_path / "merged"
    r = run_zinspect("merge", path, out_dir, timeout=TIMEOUT)
    assert r.returncode == case.rc, r.stderr
    assert "Traceback" not in r.stderr
    if case.rc == 2:
        assert case.stderr in r.stderr
    else:  # names the problems and the way out
        assert "validation found" in r.stderr and "--salvage" in r.stderr
    assert not out_dir.exists()
    assert not list(tmp_path.rglob("*.safetensors*"))


def test_no_latest_one_tag_is_fine(tmp_path):
    """No `latest`, one tag dir: that tag is taken, nothing is wrong, the merge works."""
    path = D.no_latest_one_tag(tmp_path)
    r, out = run_json("validate", path)
    assert r.returncode == 0 and out["ok"] and out["tag"] == "global_step2"
    note = [f for f in out["findings"] if f["code"] == "no-latest"]  # which tag, and why
    assert len(note) == 1 and note[0]["severity"] == "info" and "global_step2" in note[0]["message"]
    r = run_zinspect("merge", path, tmp_path / "out", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_two_tags_open_with_tag(tmp_path):
    path = D.no_latest_two_tags(tmp_path)
    r, out = run_json("validate", path, "--tag", "global_step1")
    assert r.returncode == 0 and out["tag"] == "global_step1"


# ------------------------------------------------------------------ unreadable permissions
def _drop_dac_caps() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    capability bounding set (prctl PR_CAPBSET_DROP), so that root obeys file modes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _run_without_dac(*args, **kw) -> subprocess.CompletedProcess:
    extra = {"preexec_fn": _drop_dac_caps} if os.geteuid() == 0 else {}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=TIMEOUT, **extra, **kw)


def test_unreadable_permissions(tmp_path):
    """chmod 000 on a rank file. root reads through file modes; when the tests run as root the
    commands run with the capabilities that allow that (DAC override) dropped, so the mode is
    enforced for them as for any user. Skipped only if that cannot be arranged."""
    path = D.unreadable_file(tmp_path)
    victim = path / D.TAG / OPTIM(1)
    try:
        probe = _run_without_dac("-c", "import sys; open(sys.argv[1], 'rb')", victim)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run a process that obeys file modes here ({e})")
    if probe.returncode == 0 or "PermissionError" not in probe.stderr:
        pytest.skip("chmod 000 does not block reads here (root with DAC override kept)")
    r = _run_without_dac("-m", "zinspect", "validate", path, "--json")
    assert r.returncode == 1, r.stderr
    findings = json.loads(r.stdout)["findings"]
    bad = [f for f in findings if f["code"] == "unreadable-file"]
    assert len(bad) == 1 and bad[0]["file"] == OPTIM(1) and bad[0]["rank"] == 1
    assert "permission denied" in bad[0]["message"] and "chmod" in bad[0]["hint"]
    assert {f["code"] for f in findings if f["severity"] == "error"} == \
        {"unreadable-file", "param-coverage"}
    r = _run_without_dac("-m", "zinspect", "info", path, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["params"]) >= 20
    r = _run_without_dac("-m", "zinspect", "merge", path, tmp_path / "out")
    assert r.returncode == 1 and "permission denied" in r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the hostile pickle
def test_malicious_payload_is_live(tmp_path):
    """The test's payload really runs under torch.load(weights_only=False), as DeepSpeed loads
    checkpoints: so the marker checks below can fail."""
    marker = tmp_path / "MARKER"
    path = D.malicious_pickle(tmp_path, marker)
    code = ("import torch, sys; torch.load(sys.argv[1], weights_only=False)")
    subprocess.run([sys.executable, "-c", code, str(path / D.TAG / D.MODEL)],
                   capture_output=True, timeout=TIMEOUT)
    assert marker.exists()


@pytest.mark.parametrize("command", [
    ("info",), ("info", "--json"), ("validate",), ("validate", "--json"),
    ("validate", "--deep", "--json"), ("merge", "{out}"), ("merge", "{out}", "--salvage"),
    ("{path}",),  # `zinspect PATH`: the app, or the summary when not on a terminal
])
def test_malicious_pickle_never_runs(tmp_path, command):
    marker = tmp_path / "MARKER"
    path = D.malicious_pickle(tmp_path, marker)
    args = [a.format(out=tmp_path / "out", path=path) for a in command]
    if command[0] != "{path}":
        args.insert(1, str(path))
    r = run_zinspect(*args, timeout=TIMEOUT)
    assert "Traceback" not in r.stderr
    assert not marker.exists(), f"the pickle ran during {command}"
    if command[0] == "validate":
        assert r.returncode == 1 and "unsafe-pickle" in r.stdout
    if command[0] == "merge":
        assert r.returncode != 0 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the app
#: the app's param tree crashes on a checkpoint with no params (IndexError: No line no. 0 in
#: the tree, ParamTree.move_cursor_to_line); owned by the app, reported. strict: remove the mark
#: when it is fixed.
APP_CASES = [n for n, c in CASES.items() if c.rc == 1]


@pytest.mark.parametrize("name", APP_CASES)
async def test_app_opens_and_shows_findings(tmp_path, name):
    app_mod = pytest.importorskip("zinspect.tui.app")
    case = CASES[name]
    path = build(name, tmp_path)
    app = app_mod.ZinspectApp(str(path))
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.view is not None, "the app did not load the damaged checkpoint"
        codes = {f.code for f in app.view.ckpt.findings if f.severity == "error"}
        assert codes == case.errors
        # the findings are on screen (the findings tab lists each code)
        app.main.action_show_tab("findings")
        await pilot.pause()
        shown = "\n".join(str(w.render()) for w in app.screen.walk_children()
                          if hasattr(w, "render"))
        assert case.named[0][0] in shown or case.named[0][0] in _text_of(app)
    if name == "malicious_pickle":
        assert not (tmp_path / "MARKER").exists()


def _text_of(app) -> str:
    """Everything the findings pane holds, as plain text (widgets vary: tables, lists)."""
    from zinspect.tui.widgets.findings_pane import FindingsPane

    pane = app.screen.query_one(FindingsPane)
    out = []
    for w in [pane, *pane.walk_children()]:
        for attr in ("renderable", "_renderable", "content"):
            v = getattr(w, attr, None)
            if v is not None:
                out.append(str(v))
        rows = getattr(w, "rows", None)
        if rows:
            try:
                out.extend(str(w.get_row(k)) for k in rows)
            except Exception:
                pass
    return "\n".join(out)
