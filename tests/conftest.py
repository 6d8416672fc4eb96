"""Shared test helpers: the committed fixtures, their manifests, and broken copies of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"

#: every committed fixture dir (the root holding `latest`), sorted by name
fixture_dirs: list[Path] = sorted(p.parent for p in FIXTURES.glob("*/manifest.json"))
fixture_names: list[str] = [p.name for p in fixture_dirs]


def manifest(name: str) -> dict:
    return json.loads((FIXTURES / name / "manifest.json").read_text())


def tag_dir(name: str) -> Path:
    return FIXTURES / name / manifest(name)["tag"]


def copy_fixture(tmp_path: Path, name: str) -> Path:
    """A private copy of fixture `name` (its `latest` and tag dir only) under tmp_path;
    returns the copy's tag dir, ready to be broken."""
    root = tmp_path / name
    root.mkdir(parents=True)
    tag = manifest(name)["tag"]
    shutil.copy2(FIXTURES / name / "latest", root / "latest")
    shutil.copytree(FIXTURES / name / tag, root / tag)
    return root / tag


def run_zinspect(*args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m zinspect ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "zinspect", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(params=fixture_names)
def fixture_name(request) -> str:
    return request.param
