"""The headless paths stay light: no torch, no textual, and no rich unless printing for humans.
Each check runs in a fresh interpreter (a subprocess), since this test process imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO, tag_dir

HEAVY = ("torch", "textual", "rich", "numpy", "safetensors")


def _modules_after(code: str) -> set[str]:
    """Modules in sys.modules after running `code` in a fresh interpreter: every name, and
    each top-level package."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    names = set(json.loads(r.stdout.splitlines()[-1]))
    return names | {m.split(".")[0] for m in names}


def test_the_probe_sees_imports():
    assert "torch" in _modules_after("import torch")


def test_core_load_and_validate_import_nothing_heavy():
    mods = _modules_after(
        "from zinspect.core import open_checkpoint\n"
        "from zinspect.core.selection import Selection\n"
        "from zinspect.core import fmt\n"
        f"c = open_checkpoint({str(tag_dir('s3_w4_bf16'))!r})\n"
        "assert c.params and not c.errors\n"
        f"c = open_checkpoint({str(FIXTURES / 's1_w2_bf16_bf16opt')!r})\n"
        "assert c.layout == 'bf16_optimizer'\n"
        "Selection(exclude_frozen=True).excluded(c)\n")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_import_zinspect_is_light():
    mods = _modules_after("import zinspect\nassert zinspect.__version__\n"
                          "assert 'open_checkpoint' in dir(zinspect)")
    assert not mods & {*HEAVY, "humanize", "zinspect.core", "zinspect.cli"}
    assert "zinspect" in mods


def test_lazy_public_api():
    mods = _modules_after(
        "import zinspect\n"
        f"c = zinspect.open_checkpoint({str(FIXTURES / 's2_w2_bf16')!r})\n"
        "assert c.stage == 2\n"
        "try:\n"
        "    zinspect.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n")
    assert not mods & set(HEAVY), mods & set(HEAVY)


@pytest.mark.parametrize("cmd", ["info", "validate"])
def test_cli_json_imports_nothing_heavy(cmd):
    mods = _modules_after(
        "import sys, io, contextlib\n"
        "from zinspect.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    code = main([{cmd!r}, '--json', {str(FIXTURES / 's3_w3_fp16_sub')!r}])\n"
        "assert code == 0, code\n"
        "assert out.getvalue().lstrip().startswith('{')\n")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_cli_json_importtime():
    """`python -X importtime -m zinspect info --json` names no heavy module."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "zinspect", "info", "--json",
                        str(FIXTURES / "s3_w4_bf16")], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "zinspect" in imported  # the probe works
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_human_output_uses_rich_but_not_torch():
    mods = _modules_after(
        "import io, contextlib\n"
        "from zinspect.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['info', {str(FIXTURES / 's2_w4_fp16')!r}]) == 0\n")
    assert "rich" in mods
    assert not mods & {"torch", "textual", "numpy"}


def test_every_core_module_imports_nothing_heavy():
    """Each module of zinspect.core, found by walking the package (a new module is covered
    without editing this test), imported in a fresh interpreter: no torch, textual or rich."""
    import pkgutil

    import zinspect.core

    names = sorted(m.name for m in pkgutil.walk_packages(zinspect.core.__path__, "zinspect.core."))
    assert {"zinspect.core.load", "zinspect.core.layouts.zero3", "zinspect.core.validate"} <= \
        set(names)
    heavy = {"torch", "textual", "rich"}
    mods = _modules_after("\n".join(f"import {name}" for name in names))
    assert set(names) <= mods
    if mods & heavy:  # name the module that pulls them in
        culprits = [n for n in names if _modules_after(f"import {n}") & heavy]
        raise AssertionError(f"{culprits} import {sorted(mods & heavy)}")
