"""Two same-shaped params swapped in a ZeRO-1/2 model states' `param_shapes` (every CRC valid):
the order the merge follows and the order the optimizer's `param_slice_mappings` record disagree,
and nothing says which is right. That was a warning and the merge wrote the two swapped (exit 0);
it is a `param-order-mismatch` error now, the merge refuses, and --salvage leaves the whole flat
group out. (A partition cut short stays a `slice-mapping-mismatch` warning beside the located
`param-coverage` error: only the param with the gap is lost.)"""

from __future__ import annotations

from collections import OrderedDict

import damage as D
import pytest
from conftest import FIXTURES
from test_merge import assert_matches_reference, read_output, reference
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.merge import merge
from zinspect.errors import NotMergeable

FIXTURE = "s2_w2_fp32_plain"


def _swapped(tmp_path) -> tuple[object, int, tuple[str, str]]:
    """A copy of FIXTURE whose param_shapes has its first adjacent same-shaped pair swapped:
    (root, the group, the pair)."""
    import torch

    root = D.copy_root(tmp_path, FIXTURE)
    (path,) = root.glob("*/*model_states.pt")
    state = torch_load(path)
    for gi, group in enumerate(state["param_shapes"]):
        items = list(group.items())
        i = next((i for i in range(len(items) - 1)
                  if tuple(items[i][1]) == tuple(items[i + 1][1])), None)
        if i is not None:
            pair = (items[i][0], items[i + 1][0])
            items[i], items[i + 1] = items[i + 1], items[i]
            state["param_shapes"][gi] = OrderedDict(items)
            torch.save(state, path)
            return root, gi, pair
    pytest.fail(f"{FIXTURE} has no two adjacent params of one shape")


def test_swapped_params_are_an_error_and_the_merge_refuses(tmp_path):
    root, gi, pair = _swapped(tmp_path)
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.code == "param-order-mismatch"]
    assert found and all(f.severity == "error" and f.group == gi for f in found)
    assert {f.param for f in found} <= set(pair)
    with pytest.raises(NotMergeable):
        merge(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_salvage_leaves_the_whole_group_out(tmp_path):
    root, gi, pair = _swapped(tmp_path)
    ckpt = open_checkpoint(root)
    group = next(g for g in ckpt.groups if g.index == gi)
    result = merge(ckpt, tmp_path / "out", salvage=True, hf_files=False)
    got = read_output(result.files)
    assert set(pair) <= set(group.params) and not set(group.params) & set(got)
    assert_matches_reference(got, reference(FIXTURE), leave_out=set(group.params))


def test_the_fixture_itself_has_no_mismatch():
    assert not [f for f in open_checkpoint(FIXTURES / FIXTURE).findings
                if f.code in ("slice-mapping-mismatch", "param-order-mismatch")]
