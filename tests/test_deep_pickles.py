"""The deep check reads the pickles that opening a checkpoint leaves unread.

ZeRO-3 model states of ranks > 0 are only checked whole when a checkpoint is opened (their
RankFile is `shallow`), so a hostile pickle there gets no "unsafe-pickle" from `validate`. The
deep check unpickles them inertly and reports it, with validate's own finding. The hostile file
here is the real rank-1 model states with a payload (`touch MARKER`, through `posix.system`, as
`os.system` pickles on Linux) spliced in front of its pickle: torch.load runs it, zinspect must
not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import damage as D
import pytest
from conftest import run_zinspect

from zinspect.core import open_checkpoint
from zinspect.core.deep import deep_check

TIMEOUT = 60
FIXTURE = "s3_w2_fp32"


def payload(marker: Path) -> bytes:
    """Protocol-0 opcodes, valid inside any pickle: posix.system("touch MARKER"), result popped."""
    return b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR0"


def splice(path: Path, marker: Path, tail: bytes = b"") -> None:
    """Rewrite the torch zip at `path` with `payload` after its pickle's PROTO opcode (and
    `tail` after that), every other record unchanged. zipfile writes a matching CRC, so the
    file passes every check of the quick path."""
    with zipfile.ZipFile(path) as zf:
        records = [(zi.filename, zf.read(zi)) for zi in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert data[:1] == b"\x80", "a protocol 2+ pickle starts with PROTO"
                data = data[:2] + payload(marker) + tail + data[2:]
            zf.writestr(name, data)


def hostile_copy(tmp_path: Path, rank: int, tail: bytes = b"") -> tuple[Path, Path]:
    """(root of a fixture copy whose rank-`rank` model states carry the payload, marker)."""
    marker = tmp_path / "MARKER"
    root = D.copy_root(tmp_path, FIXTURE)
    splice(root / D.TAG / D.z3_model_name(rank), marker, tail)
    return root, marker


@pytest.mark.parametrize("tail", [b"", b"\xff"], ids=["parses", "then-garbage"])
def test_the_payload_is_live(tmp_path, tail):
    """torch.load(weights_only=False), as DeepSpeed loads model states, runs the payload (even
    when the pickle fails right after it): so the marker checks below can fail."""
    pytest.importorskip("torch")
    root, marker = hostile_copy(tmp_path, 1, tail)
    code = "import torch, sys; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(root / D.TAG / D.z3_model_name(1))],
                   capture_output=True, timeout=TIMEOUT)
    assert marker.exists()


def test_rank1_model_states_pickle_is_scanned(tmp_path):
    root, marker = hostile_copy(tmp_path, 1)
    ckpt = open_checkpoint(root)
    rank1 = ckpt.file(D.z3_model_name(1))
    assert rank1.shallow, "the quick path no longer skips this pickle: test something else"
    found = deep_check(ckpt)
    assert not marker.exists(), "the pickle ran"
    # the only damage is the payload: every CRC matches, the values are whole
    assert [(f.code, f.file, f.rank) for f in found] == [("unsafe-pickle", rank1.name, 1)]
    assert "posix.system" in found[0].message


def test_same_finding_as_validate_gives_rank0(tmp_path):
    """Code, severity, wording and hint are validate's, only the file differs."""
    root1, _ = hostile_copy(tmp_path / "r1", 1)
    root0, _ = hostile_copy(tmp_path / "r0", 0)
    ckpt0 = open_checkpoint(root0)  # validated
    [quick] = [f for f in ckpt0.findings if f.code == "unsafe-pickle"]
    [deep] = deep_check(open_checkpoint(root1))
    name0, name1 = D.z3_model_name(0), D.z3_model_name(1)
    assert (deep.severity, deep.code, deep.hint) == (quick.severity, quick.code, quick.hint)
    assert deep.message == quick.message.replace(name0, name1)
    assert not [f for f in deep_check(ckpt0) if f.code == "unsafe-pickle"], \
        "rank 0's pickle was read at open: validate reports it, the deep check does not repeat it"


def test_second_run_does_not_repeat_it(tmp_path):
    """The app adds the deep findings to the checkpoint and, on a second run, replaces those
    with codes in deep.CODES; "unsafe-pickle" is validate's code too, so it is not re-emitted."""
    root, marker = hostile_copy(tmp_path, 1)
    ckpt = open_checkpoint(root)
    ckpt.findings.extend(deep_check(ckpt))
    assert [f.code for f in ckpt.findings].count("unsafe-pickle") == 1
    assert not [f for f in deep_check(ckpt) if f.code == "unsafe-pickle"]
    assert not marker.exists()


def test_unreadable_pickle_is_a_finding(tmp_path):
    """The payload followed by an invalid opcode: torch.load runs the payload and then fails;
    zinspect's reader refuses the pickle, so the deep check says it could not be checked."""
    root, marker = hostile_copy(tmp_path, 1, b"\xff")
    ckpt = open_checkpoint(root)
    assert ckpt.file(D.z3_model_name(1)).shallow
    found = [f for f in deep_check(ckpt) if f.file == D.z3_model_name(1)]
    assert not marker.exists()
    assert [(f.code, f.severity) for f in found] == [("record-unreadable", "error")]
    assert "not checked for code that torch.load would run" in found[0].message


@pytest.mark.parametrize("deep", [False, True])
def test_cli(tmp_path, deep):
    """`validate` (quick) opens rank 1's file only to check it is whole; `validate --deep`
    reports it. Neither runs it."""
    root, marker = hostile_copy(tmp_path, 1)
    r = run_zinspect("validate", root, "--json", *(["--deep"] if deep else []), timeout=TIMEOUT)
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the pickle ran"
    unsafe = [f for f in json.loads(r.stdout)["findings"] if f["code"] == "unsafe-pickle"]
    if deep:
        assert r.returncode == 1
        assert [(f["file"], f["rank"], f["severity"]) for f in unsafe] == \
            [(D.z3_model_name(1), 1, "error")]


async def test_app_deep_check_twice(tmp_path):
    """`d` in the app, twice: one unsafe-pickle for rank 1's file, and the payload never ran."""
    from test_tui_app import SIZE, settle

    from zinspect.tui.app import ZinspectApp

    root, marker = hostile_copy(tmp_path, 1)
    app = ZinspectApp(str(root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        for _ in range(2):
            await pilot.press("d")
            await settle(app, pilot)
            unsafe = [f.file for f in app.view.ckpt.findings if f.code == "unsafe-pickle"]
            assert unsafe == [D.z3_model_name(1)]
    assert not marker.exists()
