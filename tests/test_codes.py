"""Every finding is made through the code registry (zinspect/core/codes.py): each code used in
the source is registered, no module builds a Finding by hand, and every finding the damage
corpus produces has its registered severity."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import damage
import pytest
from conftest import FIXTURES, REPO

from zinspect.core import open_checkpoint
from zinspect.core.codes import CODES
from zinspect.errors import ZinspectError

SOURCES = sorted((REPO / "zinspect").rglob("*.py"))
#: calls whose first argument is a finding code: codes.finding(...), ctx.find(...), self.add(...)
_MAKERS = {"finding", "find", "add"}


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else None
            yield name, node


def test_the_scan_sees_the_source():
    used = {n.args[0].value for p in SOURCES for name, n in _calls(p) if name in _MAKERS
            and n.args and isinstance(n.args[0], ast.Constant)}
    assert {"unreadable-file", "crc-mismatch", "partition-size"} <= used


def test_every_code_used_is_registered():
    unknown = []
    for path in SOURCES:
        for name, node in _calls(path):
            if name in _MAKERS and node.args and isinstance(node.args[0], ast.Constant) and \
                    isinstance(node.args[0].value, str) and "-" in node.args[0].value and \
                    node.args[0].value not in CODES:
                unknown.append(f"{path.relative_to(REPO)}:{node.lineno} {node.args[0].value}")
    assert not unknown, unknown


def test_no_finding_is_built_by_hand():
    """Finding(severity, code, ...) outside the registry could give a code a second severity."""
    by_hand = [f"{p.relative_to(REPO)}:{n.lineno}" for p in SOURCES for name, n in _calls(p)
               if name == "Finding" and p.name != "codes.py"]
    assert not by_hand, by_hand


def _builders():
    for name, fn in vars(damage).items():
        if inspect.isfunction(fn) and fn.__module__ == "damage" and not name.startswith("_"):
            params = list(inspect.signature(fn).parameters.values())
            if params and params[0].name == "tmp" and \
                    all(p.default is not p.empty for p in params[1:]):
                yield name, fn


def test_the_damage_corpus_findings_have_their_registered_severity(tmp_path):
    seen = set()
    cases = [(n, lambda t, n=n: FIXTURES / n) for n in ("s1_w2_bf16_bf16opt", "s3_w4_bf16")]
    for name, build in [*_builders(), *cases]:
        try:
            ckpt = open_checkpoint(build(tmp_path / name))
        except (ZinspectError, OSError):
            continue  # refused as bad input: no findings to check
        for f in ckpt.findings:
            assert f.code in CODES, (name, f.code)
            assert f.severity == CODES[f.code][0], (name, f.code, f.severity)
            seen.add(f.code)
    assert len(seen) >= 20, seen  # the corpus reaches most codes


@pytest.mark.parametrize("code", sorted(CODES))
def test_each_code_has_a_severity_and_a_meaning(code):
    severity, meaning = CODES[code]
    assert severity in ("error", "warning", "info") and meaning
