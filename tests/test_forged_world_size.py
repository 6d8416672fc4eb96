"""A forged world size (one optimizer file's `partition_count` set to 10**7, every CRC valid)
must cost what the files really there cost: `validate` names the first missing ranks and counts
the rest in one finding, and the app's Ranks grid lists the cells with files and the first
missing ones instead of ten million rows. Before, validate made 10,000,006 findings (2 min, 5.4
GB) and the app hung on "Reading"."""

from __future__ import annotations

import json
import subprocess
import sys

import damage as D
import pytest
from conftest import REPO

from zinspect.core import open_checkpoint

FORGED = 10**7


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    root = D.copy_root(tmp_path_factory.mktemp("forged"), "s2_w2_fp32_plain")
    D.forge_partition_count(next(root.glob("*/" + D.optim_name(0))), FORGED)
    return root


def test_validate_counts_the_missing_ranks_instead_of_listing_them(forged):
    run = subprocess.run([sys.executable, "-m", "zinspect", "validate", str(forged), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1, run.stderr
    findings = json.loads(run.stdout)["findings"]
    missing = [f for f in findings if f["code"] == "missing-optimizer-file"]
    assert len(missing) == 17  # 16 located, then one that counts the rest
    assert missing[0]["rank"] == 2
    assert f"{FORGED - 2 - 16} more optimizer files are missing (of {FORGED} dp ranks)" \
        in missing[-1]["message"]
    assert len(findings) < 40
    assert any(f["code"] == "world-size-mismatch" for f in findings)


def test_the_ranks_grid_lists_only_the_cells_with_files_and_the_first_missing(forged):
    from zinspect.tui.widgets.ranks_pane import MAX_GRID_CELLS, grid_cells

    ckpt = open_checkpoint(forged)
    assert ckpt.world_size == FORGED
    cells = grid_cells(ckpt)
    assert len(cells) < MAX_GRID_CELLS
    assert [c.dp for c in cells[:3]] == [0, 1, 2]
    assert [f.name for f in cells[0].files if f.kind == "optim"] == [D.optim_name(0)]
    assert cells[2].files == [] and any(f.code == "missing-optimizer-file" for f in cells[2].findings)
