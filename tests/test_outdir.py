"""Safe paths out (issue 8 item 5): planted links, a checkpoint file in OUT_DIR, two merges at
once, signals and SIGKILL leftovers, all on real fixtures and real `zinspect merge` processes.

A child merge is paused deterministically by a hook (HOOKS below) that touches a `ready` file and
then waits for the signal the test sends; no timing is asserted."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, copy_fixture, manifest, run_zinspect
from test_merge import assert_matches_reference, read_output, reference

from zinspect.core import open_checkpoint
from zinspect.core import outdir as outdir_mod
from zinspect.core.merge import merge
from zinspect.core.outdir import LOCK_NAME, PARTIAL

NAME = "s3_w4_bf16"
SHARD = "8KB"  # several shards and an index: every kind of output name
OUT_NAMES = ["model.safetensors", "model.safetensors.index.json",
             *(f"model-{i:05d}-of-{n:05d}.safetensors" for n in range(1, 6)
               for i in range(1, n + 1)), LOCK_NAME, "model.safetensors" + PARTIAL]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def ckpt_copy(tmp_path):
    """A private copy of the fixture (its root), with the hash of every file in it."""
    tag = copy_fixture(tmp_path / "in", NAME)
    return tag.parent, hashes(tag.parent)


def output_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir())


# -- planted links and checkpoint files ------------------------------------------------------

GUESSED = "0badc0de"


def links(out: Path, tag: Path, names: list[str]) -> None:
    ranks = sorted(tag.iterdir())
    for i, n in enumerate(names):
        if not os.path.lexists(out / n):
            (out / n).symlink_to(ranks[i % len(ranks)])


def guessed_temp(name: str) -> str:
    return f".{name}{PARTIAL}-{os.getpid()}-{GUESSED}"


def test_links_at_every_output_name_refuse_without_force(ckpt_copy, tmp_path):
    root, before = ckpt_copy
    out = tmp_path / "out"
    out.mkdir()
    links(out, root / manifest(NAME)["tag"], [n for n in OUT_NAMES if n != LOCK_NAME])
    r = run_zinspect("merge", "--max-shard-size", SHARD, root, out)
    assert r.returncode == 2 and "partial output of an interrupted merge" in r.stderr, r.stderr
    assert hashes(root) == before


def test_links_at_every_temp_and_output_name_are_never_followed_with_force(ckpt_copy, tmp_path,
                                                                         monkeypatch):
    """Links at every output name, at the old fixed temp name, and at the exact temp names this
    merge tries first (its lock's before it starts, its shards' once the lock is held)."""
    root, before = ckpt_copy
    tag = root / manifest(NAME)["tag"]
    out = tmp_path / "out"
    out.mkdir()
    outputs = [n for n in OUT_NAMES if n != LOCK_NAME]
    links(out, tag, outputs + [guessed_temp(LOCK_NAME)])
    real, calls = outdir_mod.secrets.token_hex, []

    def token_hex(n):  # each name's first try is the planted one, its second a fresh one
        calls.append(n)
        return GUESSED if len(calls) % 2 else real(n)

    monkeypatch.setattr(outdir_mod.secrets, "token_hex", token_hex)
    claim = outdir_mod.OutputDir._claim

    def plant_then_claim(self):
        links(out, tag, [guessed_temp(n) for n in self.names])
        claim(self)

    monkeypatch.setattr(outdir_mod.OutputDir, "_claim", plant_then_claim)
    notes = []
    result = merge(open_checkpoint(root), out, max_shard_size=SHARD, force=True,
                   notice=notes.append)
    assert len(result.files) > 2 and len(calls) == 2 * (len(result.files) + 1)
    assert_matches_reference(read_output(result.files), reference(NAME))
    assert all(p.is_file() and not p.is_symlink() for p in result.files)
    written = {p.name for p in result.files}
    for n in outputs:  # links at names this merge does not write stay as they were
        if n not in written and PARTIAL not in n:
            assert (out / n).is_symlink(), n
    assert not os.path.lexists(out / LOCK_NAME)
    assert notes == ["removed 2 partial file(s) of an interrupted merge"]
    assert hashes(root) == before


def test_a_link_at_the_lock_name_refuses_and_touches_nothing(ckpt_copy, tmp_path):
    root, before = ckpt_copy
    out = tmp_path / "out"
    out.mkdir()
    victim = root / manifest(NAME)["tag"] / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    (out / LOCK_NAME).symlink_to(victim)
    r = run_zinspect("merge", "--force", root, out)
    assert r.returncode == 2 and f"{LOCK_NAME} is a symbolic link" in r.stderr, r.stderr
    assert hashes(root) == before
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize("where", ["hardlink", "root", "tag"])
def test_force_never_writes_where_a_checkpoint_file_is(ckpt_copy, tmp_path, where):
    root, before = ckpt_copy
    tag = root / manifest(NAME)["tag"]
    if where == "hardlink":
        out = tmp_path / "out"
        out.mkdir()
        os.link(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", out / "model.safetensors")
        expect = "a file of the checkpoint"
    else:
        out = root if where == "root" else tag
        expect = "is the checkpoint's directory"
    r = run_zinspect("merge", "--force", root, out)
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert hashes(root) == before
    assert not [p for p in out.rglob("*") if PARTIAL in p.name or p.name == LOCK_NAME]


# -- a child merge paused at a chosen point ----------------------------------------------------

#: where the child waits: lock held and checked / mid-shard / every shard written, before commit
HOOKS = {
    "locked": ("zinspect.core.outdir", "OutputDir", "_claim"),
    "writing": ("zinspect.cli.common", "Bar", "update"),
    "written": ("zinspect.core.outdir", "OutputDir", "write_text"),
}


def start_merge(root: Path, out: Path, ready: Path, hook: str, *extra: str) -> subprocess.Popen:
    mod, cls, meth = HOOKS[hook]
    code = (
        "import importlib, os, sys, time\n"
        "from zinspect import cli\n"
        "from zinspect.cli import common\n"
        "seen = []\n"
        "h = common.Stop._handler\n"
        "def handler(self, *a):\n"
        "    seen.append(1)\n"
        "    h(self, *a)\n"
        "common.Stop._handler = handler\n"
        f"cls = getattr(importlib.import_module({mod!r}), {cls!r})\n"
        f"orig = getattr(cls, {meth!r})\n"
        "def hooked(*a, **k):\n"
        f"    if {hook!r} == 'writing': common.Bar.SHOW_AFTER = 0\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    deadline = time.monotonic() + 60\n"
        f"    while not seen and not os.path.exists({str(ready.with_name('go'))!r}) "
        "and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    return orig(*a, **k)\n"
        f"setattr(cls, {meth!r}, hooked)\n"
        f"sys.exit(cli.main(['merge', {str(root)!r}, {str(out)!r}, "
        f"'--max-shard-size', {SHARD!r}, *{list(extra)!r}]))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 60
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), p.communicate()
    return p


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      (signal.SIGHUP, 129)])
def test_a_signal_at_any_point_leaves_nothing(ckpt_copy, tmp_path, hook, sig, code):
    root, before = ckpt_copy
    out = tmp_path / "new" / "parents" / "out"
    p = start_merge(root, out, tmp_path / "ready", hook)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "cancelled" in err and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()  # the dirs it created, parents included
    assert hashes(root) == before


def test_a_signal_into_an_existing_dir_leaves_it_as_it_was(ckpt_copy, tmp_path):
    root, _ = ckpt_copy
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    p = start_merge(root, out, tmp_path / "ready", "written", "--force")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert [(q.name, q.read_text()) for q in out.iterdir()] == [("notes.txt", "mine")]


@pytest.mark.parametrize("hook", ["writing", "written"])
def test_sigkill_leftover_is_named_on_the_rerun_and_force_replaces_it(ckpt_copy, tmp_path,
                                                                      hook):
    root, before = ckpt_copy
    out = tmp_path / "out"
    p = start_merge(root, out, tmp_path / "ready", hook)
    pid = p.pid
    p.kill()
    p.communicate(timeout=60)
    left = sorted(q.name for q in out.iterdir())
    assert LOCK_NAME in left and any(PARTIAL in n for n in left), left  # what SIGKILL leaves

    r = run_zinspect("merge", "--max-shard-size", SHARD, root, out)
    assert r.returncode == 2, r.stderr
    assert "partial output of an interrupted merge" in r.stderr
    assert f"pid {pid}" in r.stderr and "started" in r.stderr and "--force" in r.stderr
    assert sorted(q.name for q in out.iterdir()) == left  # the refusal changed nothing

    r = run_zinspect("merge", "--force", "--max-shard-size", SHARD, root, out)
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of an interrupted merge (pid {pid}" in r.stderr
    assert "partial file(s) of an interrupted merge" in r.stderr
    files = output_files(out)
    assert not [q for q in files if PARTIAL in q.name or q.name == LOCK_NAME]
    assert_matches_reference(read_output(files), reference(NAME))
    assert hashes(root) == before


def test_a_stale_lock_alone_is_taken_over_and_said(ckpt_copy, tmp_path):
    root, _ = ckpt_copy
    out = tmp_path / "out"
    p = start_merge(root, out, tmp_path / "ready", "locked")
    p.kill()
    p.communicate(timeout=60)
    assert sorted(q.name for q in out.iterdir()) == [LOCK_NAME]
    r = run_zinspect("merge", root, out)
    assert r.returncode == 0, r.stderr
    assert f"took over the lock of an interrupted merge (pid {p.pid}" in r.stderr
    assert_matches_reference(read_output(output_files(out)), reference(NAME))


def test_two_merges_into_one_dir_give_one_output_and_one_refusal(ckpt_copy, tmp_path):
    root, before = ckpt_copy
    out = tmp_path / "out"
    first = start_merge(root, out, tmp_path / "ready", "writing", "--force")
    try:
        second = run_zinspect("merge", "--force", "--max-shard-size", SHARD, root, out)
    finally:
        (tmp_path / "go").touch()  # the first goes on
        _, err = first.communicate(timeout=60)
    assert second.returncode == 2, second.stderr
    assert "another zinspect merge is writing into it" in second.stderr
    assert f"pid {first.pid} on " in second.stderr
    assert first.returncode == 0, err
    files = output_files(out)
    assert not [q for q in files if PARTIAL in q.name or q.name == LOCK_NAME]
    assert_matches_reference(read_output(files), reference(NAME))
    assert hashes(root) == before


# -- the app killed by SIGTERM/SIGHUP while its merge worker writes ------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_the_app_killed_by_a_signal_mid_merge_leaves_nothing(ckpt_copy, tmp_path, sig):
    """`zinspect PATH` in a real pty: `m`, an OUT_DIR, enter; the worker pauses once OUT_DIR is
    locked (a hook that waits until the worker is cancelled); the signal must end the app and
    let the worker remove what it made."""
    from test_tui_e2e import read_until, spawn_in_pty

    root, before = ckpt_copy
    out = tmp_path / "new" / "out"
    ready = tmp_path / "ready"
    code = (
        "import sys, time\n"
        "from textual.worker import get_current_worker\n"
        "from zinspect import cli\n"
        "from zinspect.core import outdir\n"
        "orig = outdir.OutputDir.create\n"
        "def create(self, name):\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    worker, deadline = get_current_worker(), time.monotonic() + 60\n"
        "    while not worker.is_cancelled and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    return orig(self, name)\n"
        "outdir.OutputDir.create = create\n"
        f"sys.exit(cli.main([{str(root)!r}]))\n")
    proc, main = spawn_in_pty(["-c", code])
    try:
        # the loading label names the files as they are read ("... (zero_pp_rank_3_...)"):
        # only the tabs say the checkpoint is loaded and `m` is bound
        screen = read_until(main, b"Findings (", 60)
        assert b"Findings (" in screen, screen[-2000:]
        read_until(main, b"\x00never", 1)
        os.write(main, b"m")
        screen = read_until(main, b"Output directory", 30)
        assert b"Output directory" in screen, screen[-2000:]
        # the field takes focus once the dialog is mounted: keys typed before (a loaded machine)
        # went to the screen below ('/' opens its filter) and the path lost its first characters
        read_until(main, b"\x00never", 2)
        for key in [b"\x15", *(bytes([c]) for c in str(out).encode())]:  # ctrl+u clears
            os.write(main, key)
            read_until(main, b"\x00never", 0.02)
        screen = read_until(main, out.name.encode(), 30)
        os.write(main, b"\r")
        screen = read_until(main, b"\x00never", 30, stop=ready.exists)
        assert ready.exists(), screen[-3000:].decode(errors="replace")
        assert (out / LOCK_NAME).exists()
        proc.send_signal(sig)
        read_until(main, b"\x00never", 60, stop=lambda: proc.poll() is not None)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    assert proc.returncode == 128 + sig  # 143 / 129, as the CLI's merge exits
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))
    assert hashes(root) == before
