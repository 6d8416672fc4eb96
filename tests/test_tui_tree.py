"""The module trie (zinspect.core.tree) and the app's view state (Inspection), without Textual."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from zinspect.core import open_checkpoint
from zinspect.core.model import Finding
from zinspect.core.tree import build_tree, count_below, ordered_children
from zinspect.tui.inspection import Inspection, split_ahead

SAMPLE = Path(__file__).parent.parent / "zinspect" / "sample"
FIXTURES = Path(__file__).parent / "fixtures"


def tree_of(sizes: dict[str, tuple[int, int]]):
    return build_tree(list(sizes), list(sizes.values()))


def test_tree_sums_numel_bytes_and_counts_up_each_path():
    root = tree_of({"a.0.w": (6, 24), "a.0.b": (2, 8), "a.10.w": (4, 16), "c": (1, 4)})
    assert (root.numel, root.nbytes, root.count) == (13, 52, 4)
    a = root.children["a"]
    assert (a.numel, a.count, a.is_param) == (12, 3, False)
    assert a.children["0"].children["w"].is_param
    assert a.children["0"].children["w"].path == "a.0.w"
    assert root.children["c"].is_param and root.children["c"].path == "c"
    assert list(a.params()) == ["a.0.w", "a.0.b", "a.10.w"]
    assert root.find("a.10") is a.children["10"]
    assert root.find("a.2") is None


def test_children_sort_numerically_and_by_size():
    root = tree_of({f"layers.{i}.w": (i + 1, 4 * (i + 1)) for i in (10, 9, 2, 1)})
    layers = root.children["layers"]
    assert [c.name for c in ordered_children(layers, "model")] == ["10", "9", "2", "1"]
    assert [c.name for c in ordered_children(layers, "name")] == ["1", "2", "9", "10"]
    assert [c.name for c in ordered_children(layers, "size")] == ["10", "9", "2", "1"]
    assert [c.name for c in ordered_children(layers, "numel")] == ["10", "9", "2", "1"]


def test_count_below_counts_every_prefix():
    assert count_below(["a.b.c", "a.d", "e"]) == {"": 3, "a": 2, "a.b": 1, "a.b.c": 1, "a.d": 1,
                                                  "e": 1}


def test_tree_module_is_stdlib_only():
    code = ("import sys, zinspect.core.tree; "
            "bad = [m for m in ('textual', 'rich', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inspection_toggles_and_summarizes():
    view = Inspection(open_checkpoint(SAMPLE))
    total = view.output.nbytes
    assert view.output.params == 27 and view.output.buffers == 4
    assert view.toggle(["embed.weight", "head.bias"])
    assert view.excluded == {"embed.weight", "head.bias"}
    assert view.output.params == 25
    assert view.output.nbytes == total - 4 * (915 + 61)
    assert view.excluded_in(view.tree.find("head")) == 1
    assert view.marks(view.names.index("embed.weight")) == "x   "
    assert view.marks(view.names.index("head.weight")) == "  T "
    assert not view.toggle(["embed.weight", "head.bias"])
    assert view.excluded == set()


def test_inspection_filters_by_every_word():
    view = Inspection(open_checkpoint(SAMPLE))
    assert view.orders.rows("model", "BLOCKS.1 Down").names == [
        "encoder.blocks.1.mlp.down.weight", "encoder.blocks.1.mlp.down.bias"]
    # buffers are listed too (issue 14.6), in natural order with the params
    assert view.orders.rows("name").names[:3] == ["bn.bias", "bn.num_batches_tracked",
                                                  "bn.running_mean"]


def test_update_findings_reflags_in_place():
    view = Inspection(open_checkpoint(SAMPLE))
    tree, sizes = view.tree, view.sizes
    assert not view.flagged
    view.ckpt.findings.append(Finding("error", "nan-values", "NaN", param="encoder.cube"))
    view.update_findings()
    assert view.flagged == {"encoder.cube"}
    assert view.flagged_in(view.tree.find("encoder")) == 1
    assert view.marks(view.names.index("encoder.cube")).endswith("!")
    assert view.tree is tree and view.sizes is sizes


def test_lazy_tree_groups_names_apart_in_model_order_whoever_splits_first():
    """Children are split off when first asked for (by the UI thread or a worker ahead of it):
    a module whose names come apart (`a.x`, `b.y`, `a.z`) is one node listing them in model
    order, a name that is also a module keeps both roles, an empty part is a part."""
    import threading

    sizes = {"a": (1, 4), "a.x": (2, 8), "b.y": (3, 12), "a.z.w": (4, 16), "a..e": (5, 20),
             "b.q": (6, 24)}
    ahead = tree_of(sizes)
    worker = threading.Thread(target=split_ahead, args=(ahead, 1, lambda: True))
    worker.start()
    for root in (tree_of(sizes), ahead):
        a = root.find("a")
        assert list(root.children) == ["a", "b"]
        assert (a.count, a.numel, a.is_param, a.has_children) == (4, 12, True, True)
        assert list(a.children) == ["x", "z", ""]
        assert list(a.params()) == ["a", "a.x", "a.z.w", "a..e"]
        assert root.find("a..e").is_param and not root.find("a..e").has_children
        assert [c.count for c in root.find("b").children.values()] == [1, 1]
        # each node's totals are its own names' (sizes stay beside their names when the names
        # of a module come apart)
        assert [c.nbytes for c in a.children.values()] == [8, 16, 20]
        assert (root.find("b").numel, root.find("a.z").numel, root.numel) == (9, 4, 21)
        worker.join()


def test_lookups_made_in_chunks_are_the_whole_dict(monkeypatch):
    """The name look-ups a worker makes after the findings (the sizes, the ParamTable's index)
    are made a chunk at a time, so that the UI thread gets its turn between: every name of
    every chunk is found, params and buffers."""
    from zinspect.core import params as params_module

    monkeypatch.setattr(params_module, "CHUNK", 4)
    view = Inspection(open_checkpoint(FIXTURES / "s3_w2_bf16_plain"))
    table = view.ckpt.params
    assert type(table) is params_module.ParamTable and len(table) > 3 * params_module.CHUNK
    groups = table.column("sub_group")  # (from the columns, no look-up by name)
    view.prepare_lookups(lambda: True)
    assert [table._position(n) for n in table] == list(range(len(table)))
    assert [table[n].sub_group for n in table] == groups  # each name's place in its group
    assert len(view.sizes) == len(table) + len(view.ckpt.buffers)
    for name, p in table.items():
        assert view.sizes[name] == (p.numel, 4 * p.numel)
    for name, b in view.ckpt.buffers.items():
        assert view.sizes[name] == (b.numel, b.nbytes)
