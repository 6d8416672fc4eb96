"""A tag dir holding only the model states of a ZeRO-1/2/3 run: validate must say the fp32
masters are missing (it said ok while merge refused 'a unknown checkpoint')."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES


@pytest.mark.parametrize("fixture", ["s2_w2_bf16", "s3_w2_fp32"])
def test_only_model_states_is_an_error_naming_the_missing_optimizer_files(tmp_path, fixture):
    root = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, root)
    for f in root.glob("*/*optim_states.pt"):
        f.unlink()
    run = [sys.executable, "-m", "zinspect"]
    got = subprocess.run([*run, "validate", str(root), "--json"], capture_output=True, text=True)
    assert got.returncode == 1, got.stderr
    found = json.loads(got.stdout)["findings"]
    assert [f["code"] for f in found if f["severity"] == "error"] == ["no-optimizer-files"]
    assert "_optim_states.pt" in found[0]["hint"]
    human = subprocess.run([*run, "validate", str(root)], capture_output=True, text=True)
    assert "ZeRO-None" not in human.stdout and "no-optimizer-files" in human.stdout
    merged = subprocess.run([*run, "merge", str(root), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert merged.returncode != 0 and not (tmp_path / "out").exists()
    assert "cannot merge this checkpoint: its layout is unknown" in merged.stderr
