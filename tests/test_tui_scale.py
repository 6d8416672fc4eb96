"""300k parameter names: the tree opens lazily, the filter and the palette stay usable.

The checkpoint is synthetic metadata (a Checkpoint dataclass built in Python); no timing is asserted,
but a tree or filter that walked every name eagerly per keystroke would make this test crawl."""

from __future__ import annotations

import threading
from pathlib import Path

from textual.widgets import Static

from zinspect.core.model import Checkpoint, Finding, Fragment, Param
from zinspect.tui import app as app_module
from zinspect.tui import inspection as inspection_module
from zinspect.tui.app import ZinspectApp
from zinspect.tui.inspection import Inspection
from zinspect.tui.rows import Orders
from zinspect.tui.screens.param_detail import ParamDetailScreen
from zinspect.tui.widgets.findings_pane import FindingTable
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.param_tree import ParamTree
from zinspect.tui.widgets.params_pane import ParamsPane
from zinspect.tui.widgets.ranks_pane import RankGrid
from zinspect.tui.widgets.virtual_table import ROWS_AT_ONCE

LAYERS, EXPERTS = 1600, 64


def serve(monkeypatch, ckpt: Checkpoint) -> None:
    """The app's load worker gets `ckpt` as if read from disk, with its findings as they are
    (validated already, or made by the test: validate would add its own to a synthetic one)."""
    monkeypatch.setattr(app_module, "load_checkpoint", lambda path, tag=None, progress=None: ckpt)
    monkeypatch.setattr(app_module, "validate", lambda c: c.findings)


def synthetic_checkpoint() -> Checkpoint:
    params: dict[str, Param] = {"model.embed_tokens.weight": Param(
        "model.embed_tokens.weight", (32000, 64), "bfloat16", sub_group=0,
        fragments=[Fragment(r, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", 0,
                            r * 256000, 256000, 1024 + r, "float32") for r in range(8)])}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "input_layernorm", "post_attention_layernorm"):
            params[f"{prefix}.{name}.weight"] = Param(f"{prefix}.{name}.weight", (64, 64),
                                                      "bfloat16", sub_group=0)
        for expert in range(EXPERTS):
            for w in ("w1", "w2", "w3"):
                name = f"{prefix}.mlp.experts.{expert}.{w}.weight"
                params[name] = Param(name, (128, 64), "bfloat16", sub_group=0)
    return Checkpoint(path=Path("synthetic/global_step1000"), tag="global_step1000", stage=3,
                      world_size=8, layout="zero", dtype="bfloat16", master_dtype="float32",
                      params=params)


async def test_300k_names_open_expand_filter_and_jump(monkeypatch):
    ckpt = synthetic_checkpoint()
    assert len(ckpt.params) > 300_000
    serve(monkeypatch, ckpt)
    app = ZinspectApp("synthetic")
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("2")
        tree = app.screen.query_one(ParamTree)
        assert [n.data.path for n in tree.root.children] == ["model"]
        assert tree.root.children[0].data.count == len(ckpt.params)
        await pilot.press("enter", "down", "down", "enter")  # model, then model.layers
        layers = tree.cursor_node
        assert layers.data.path == "model.layers"
        assert len(layers.children) == LAYERS
        assert not layers.children[0].children  # layer 0 not built before it is opened

        await pilot.press("down", "space")  # exclude layer 0 whole: 6 + 64*3 params
        assert len(app.view.excluded) == 6 + EXPERTS * 3

        await pilot.press("slash", *"experts.63. w3")
        await app.workers.wait_for_complete()  # 300k names are searched by a worker
        await pilot.pause()
        table = app.screen.query_one(ParamTable)
        assert len(table.names) == LAYERS
        assert all(".mlp.experts.63.w3." in n for n in table.names)
        await pilot.press("enter", "end")
        assert table.cursor == LAYERS - 1
        summary = str(app.screen.query_one("#output-summary", Static).content)
        assert f"{LAYERS:,} of {len(ckpt.params):,} match" in summary

        await pilot.press("ctrl+g", *"layers.1599. experts.7. w2")
        await pilot.pause(1.0)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen)
        assert app.screen.param_name == "model.layers.1599.mlp.experts.7.w2.weight"


async def test_100k_findings_list_and_jump(monkeypatch):
    """A ZeRO-3 checkpoint missing a rank has a coverage finding per param: the Findings tab
    draws only the rows on screen, and enter still jumps to the param or rank named."""
    ckpt = synthetic_checkpoint()
    names = list(ckpt.params)[-100_000:]
    ckpt.findings = [Finding("error", "missing-optimizer-file", "rank 7's optimizer file is gone",
                             rank=7)]
    ckpt.findings += [Finding("error", "param-coverage", f"{n}: 64 of 8,192 elements are held "
                              "by no rank file (rank 7)", "restore the missing rank files",
                              rank=7, param=n) for n in names]
    serve(monkeypatch, ckpt)
    folded = threads_of(monkeypatch, inspection_module, "folded_order")
    gridded = threads_of(monkeypatch, app_module, "grid_cells")
    app = ZinspectApp("synthetic")
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("4")
        # ordered (and indexed per file for the Overview) by the load worker
        assert folded and gridded
        assert threading.current_thread().name not in {t for t, _ in folded + gridded}
        table = app.screen.query_one(FindingTable)
        assert table.has_focus and table.row_count == len(ckpt.findings) == 100_001
        await pilot.press("end")
        assert table.cursor == 100_000
        assert names[-1] in str(app.screen.query_one("#finding-detail", Static).content)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen)
        assert app.screen.param_name == names[-1]
        await pilot.press("escape", "4", "home", "enter")
        assert app.screen.query_one("#tabs").active == "tab-ranks"
        grid = app.screen.query_one("#rank-table", RankGrid)  # 100,001 findings on one cell
        assert grid.row_count == 8 and grid.cursor == 7
        assert grid.row_cells(7)[-1] == "error: missing-optimizer-file +100000"


def threads_of(monkeypatch, module, name: str) -> list[tuple[str, tuple]]:
    """Record the thread (and the arguments) of each call of `module.name`."""
    seen: list[tuple[str, tuple]] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, args[1:]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


async def test_300k_names_are_counted_searched_and_sorted_off_the_ui_thread(monkeypatch):
    """The overview's counts are made by the load worker, a filter or a sort of 300k names by
    a worker of its own: the UI thread never walks every name, so keys never wait for it."""
    ckpt = synthetic_checkpoint()
    serve(monkeypatch, ckpt)
    counted = threads_of(monkeypatch, inspection_module, "totals")
    searched = threads_of(monkeypatch, Orders, "rows")
    sorted_ = threads_of(monkeypatch, Orders, "_sort")
    app = ZinspectApp("synthetic")
    ui = threading.current_thread().name
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert counted and ui not in {thread for thread, _ in counted}
        await pilot.press("2", "slash", *"layers.1599.")  # typed on while it searches
        pane = app.screen.query_one(ParamsPane)
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one(ParamTable)
        assert not pane.searching
        assert table.names and all("layers.1599." in n for n in table.names)
        assert len(table.names) == 6 + EXPERTS * 3  # the last key's rows, not a stale key's
        # the UI thread searched only the few rows an earlier key had left, never all names
        on_ui = [args for thread, args in searched if thread == ui and args[1:2] not in ((), ("",))]
        assert all(args[2] is not None and len(args[2].names) <= ROWS_AT_ONCE for args in on_ui)
        assert any(thread != ui for thread, _ in searched)
        await pilot.press("escape", "t", "o")  # the table, sorted by name: a sort
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert pane.sort == "name" and not pane.searching
        assert table.names[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
        assert sorted_ and ui not in {thread for thread, _ in sorted_}


async def test_the_loaded_checkpoint_is_kept_out_of_the_collectors_full_passes(monkeypatch):
    """Its ~1M objects hold no cycle; walked by each full collection they froze the UI for up
    to a second at some later key."""
    import gc

    ckpt = synthetic_checkpoint()
    serve(monkeypatch, ckpt)
    gc.unfreeze()
    app = ZinspectApp("synthetic")
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert gc.get_freeze_count() > len(ckpt.params)
            frozen = set(map(id, gc.get_objects(generation=2)))
            assert id(ckpt) not in frozen and id(app.view.tree) not in frozen  # frozen, not gen 2
        assert gc.get_freeze_count() == 0  # given back when the app ends
    finally:
        gc.unfreeze()


async def test_a_module_of_thousands_opens_with_only_the_lines_on_screen_labelled(monkeypatch):
    """Opening model.layers adds its 1,600 children at once; each label (sizes, marks) is made
    when its line is drawn, and after an exclusion only the lines on screen are re-made."""
    ckpt = synthetic_checkpoint()
    serve(monkeypatch, ckpt)
    app = ZinspectApp("synthetic")
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("2", "enter", "down", "down", "enter")
        await pilot.pause()
        tree = app.screen.query_one(ParamTree)
        layers = tree.cursor_node
        assert layers.data.path == "model.layers" and len(layers.children) == LAYERS
        labelled = [c for c in layers.children if "params" in str(c.label)]
        assert 10 < len(labelled) < 100  # the screenful, not 1,600
        assert str(layers.children[0].label).startswith("0  198 params")
        await pilot.press("down", "space")
        await pilot.pause()
        assert "198/198 excluded" in str(layers.children[0].label)
        assert "excluded" not in str(layers.children[-1].label)
        await pilot.press("end")
        await pilot.pause()
        assert str(layers.children[-1].label).startswith("1599  198 params")
        # sorted by name, then by size: the tree is made again (its 1,600 layers dropped at
        # once: Textual's remove_children took seconds there), keeping what is open and the
        # cursor's param
        at = tree.cursor_node.data.path
        await pilot.press("o", "o")
        await app.workers.wait_for_complete()
        await pilot.pause()
        model = tree.root.children[0]
        assert [c.data.name for c in model.children] == ["layers", "embed_tokens"]
        layers = model.children[0]
        assert layers.is_expanded and len(layers.children) == LAYERS
        assert tree.cursor_node.data.path == at


async def test_statistics_of_300k_tensors_are_prepared_and_sorted_off_the_ui_thread(monkeypatch):
    """The Statistics screen's layer sums, name widths, first sort and the parameter table's
    statistics columns are made by its worker; a later sort of 300k rows by a worker too."""
    from zinspect.core import stats as stats_module
    from zinspect.core.stats import TensorStats
    from zinspect.tui.screens import stats as stats_screen
    from zinspect.tui.widgets import param_table as param_table_module

    ckpt = synthetic_checkpoint()
    values = [TensorStats(name, "float32", p.shape, numel=p.numel, finite=p.numel, min=-1.0,
                          max=float(i), mean=0.0, sumsq=float(i), max_abs=float(i))
              for i, (name, p) in enumerate(ckpt.params.items())]
    serve(monkeypatch, ckpt)
    monkeypatch.setattr(stats_module, "compute_stats", lambda tensors, **kwargs: values)
    monkeypatch.setattr("zinspect.core.plan.plan_merge", lambda ckpt, *a, **k: type("P", (), {"tensors": []}))
    layers = threads_of(monkeypatch, stats_screen, "layer_norms")
    widths = threads_of(monkeypatch, param_table_module, "stat_widths")
    sorts = threads_of(monkeypatch, stats_screen, "sorted_rows")
    app = ZinspectApp("synthetic")
    ui = threading.current_thread().name
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("a")
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, stats_screen.StatisticsScreen)
        table = screen.query_one("#stats-table", stats_screen.StatsTable)
        assert table.row_count == len(values) and table.rows[0] is values[-1]  # largest L2
        assert len(app.view.stats) == len(values)
        await pilot.press("o")  # by max|x|
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.sub_title == "sorted by max|x| ↓" and table.rows[0] is values[-1]
    assert layers and widths and len(sorts) == 2  # the first sort and `o`'s
    assert ui not in {thread for thread, _ in layers + widths + sorts}


async def test_the_largest_modules_are_split_ahead_off_the_ui_thread_while_no_key_comes(
        monkeypatch):
    """After the findings a worker prepares the param look-ups and splits off the module that
    holds most names (a pass over them), once no key has come for a moment: beside the
    filter's first keys it took the interpreter from them. Opening a module splits its own
    largest children ahead in a worker too (at once: the user is in the tree), a level at a
    time."""
    from zinspect.core.tree import ModuleNode

    serve(monkeypatch, synthetic_checkpoint())
    split: list[tuple[str, str]] = []
    real = ModuleNode._split

    def spy(node):
        split.append((threading.current_thread().name, node.path))
        return real(node)

    monkeypatch.setattr(ModuleNode, "_split", spy)
    prepared = threads_of(monkeypatch, Inspection, "prepare_lookups")
    monkeypatch.setattr(app_module, "IDLE", 3600.0)  # as if keys kept coming
    app = ZinspectApp("synthetic")
    ui = threading.current_thread().name

    async def until(done, what: str) -> None:
        for _ in range(3000):  # a hang guard, not a timing
            if done():
                return
            await pilot.pause(0.01)
        raise AssertionError(f"never: {what}")

    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("2")  # (on the loading screen: it acts once the tabs are shown)
        await until(lambda: prepared, "the look-ups prepared after the findings")
        assert app.view.validated and ui not in {thread for thread, _ in prepared}
        await pilot.press("2")
        await pilot.pause(0.3)
        assert "model" not in {path for _, path in split}  # waits while keys come
        monkeypatch.setattr(app_module, "IDLE", 0.0)  # no key for a while now
        await until(lambda: "model" in {path for _, path in split}, "model split ahead")
        monkeypatch.setattr(app_module, "IDLE", 3600.0)  # the tree's worker does not wait
        await pilot.press("enter")  # open model: its children are there already
        await until(lambda: "model.layers" in {path for _, path in split},
                    "model.layers split ahead")
        tree = app.screen.query_one(ParamTree)
        assert [c.data.path for c in tree.cursor_node.children] == \
            ["model.embed_tokens", "model.layers"]
    assert [path for _, path in split].count("model") == 1
    assert all(thread != ui for thread, path in split if path.startswith("model"))
    assert "model.layers.0" not in {path for _, path in split}  # one level at a time
