"""`zinspect stats`: per-param statistics equal torch's on the committed fixtures' references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, tag_dir
from torchload import torch_load

from zinspect.cli import main
from zinspect.core.sources import open_source
from zinspect.core.stats import compute_stats, nonfinite_findings
from zinspect.core.stream import ProgressMeter
from zinspect.errors import MergeCancelled

CASES = ["s2_w2_fp32_plain", "s3_w4_bf16", "s3_w3_fp16_sub", "s1_w2_bf16_bf16opt"]


def _close(a, b, rel=1e-9, abs_=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("which", ["checkpoint", "reference"])
def test_stats_equal_torch_on_the_reference(name, which):
    ref = torch.load(FIXTURES / name / "reference_fp32.pt")
    path = FIXTURES / name if which == "checkpoint" else FIXTURES / name / "reference_fp32.pt"
    stats = compute_stats(open_source(path).tensors)
    assert {s.name for s in stats} <= set(ref) and len(stats) >= len(ref) - 2  # tied aliases
    for s in stats:
        t = ref[s.name].double().flatten()
        assert s.numel == t.numel()
        if not t.numel():
            continue
        assert s.min == t.min().item() and s.max == t.max().item()
        assert s.max_abs == t.abs().max().item()
        assert _close(s.mean, t.mean().item()), s.name
        assert _close(s.std, t.std(unbiased=False).item()), s.name
        assert _close(s.l2, t.norm().item()), s.name
        assert s.zeros == int((t == 0).sum()) and s.nan == 0 and s.inf == 0


def test_stats_of_a_large_tensor_across_chunks(tmp_path):
    """A tensor larger than the stream's chunks is combined exactly (Chan's formula)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_000, generator=g) * 5 + 1000  # a big mean: naive sums lose precision
    x[17] = float("nan")
    x[18] = float("inf")
    x[19:40] = 0
    save_file({"w": x}, tmp_path / "m.safetensors")
    (s,) = compute_stats(open_source(tmp_path / "m.safetensors").tensors)
    f = x.double()[torch.isfinite(x)]
    assert s.nan == 1 and s.inf == 1 and s.zeros == 21 and s.finite == x.numel() - 2
    assert _close(s.mean, f.mean().item(), 1e-12) and _close(s.std, f.std(unbiased=False).item(), 1e-10)
    codes = [(f.code, f.param) for f in nonfinite_findings([s])]
    assert codes == [("nan-values", "w"), ("inf-values", "w")]


def test_progress_and_cancel():
    tensors = open_source(FIXTURES / "s2_w2_fp32_plain").tensors
    seen = []
    compute_stats(tensors, progress=lambda d, t, n: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] == sum(t.nbytes for t in tensors if not t.tied_to)
    with pytest.raises(MergeCancelled, match="statistics cancelled"):
        compute_stats(tensors, should_stop=lambda: True)


def test_cli_json_and_exit_codes(capsys, tmp_path):
    assert main(["stats", str(FIXTURES / "s2_w2_fp32_plain"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in out["params"]]
    assert "embed.weight" in names and out["findings"] == []
    assert main(["stats", str(tag_dir("s2_w2_fp32_plain"))]) == 0
    assert "embed.weight" in capsys.readouterr().out
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 4)
    assert main(["stats", str(tmp_path / "x.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the app
async def test_app_statistics_screen_table_and_layers():
    from test_tui_app import SIZE, settle
    from textual.widgets import Sparkline

    from zinspect.tui.app import ZinspectApp
    from zinspect.tui.screens.stats import L2_COLUMN, StatisticsScreen, StatsTable

    name = "s3_w2_fp32"
    ref = torch.load(FIXTURES / name / "reference_fp32.pt")
    app = ZinspectApp(str(FIXTURES / name))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("a")
        await settle(app, pilot)
        assert isinstance(app.screen, StatisticsScreen)
        table = app.screen.query_one("#stats-table", StatsTable)  # drawn a screenful at a time
        rows = [table.row_cells(i) for i in range(table.row_count)]
        l2 = [float(r[L2_COLUMN]) for r in rows]  # right after the name (80 columns show it)
        assert L2_COLUMN == 1
        assert l2 == sorted(l2, reverse=True)  # L2, largest first
        top = max((n for n in ref if ref[n].is_floating_point()), key=lambda n: ref[n].double().norm())
        assert rows[0][0] == top  # names escaped (fmt.shown), never markup
        # per layer: the L2 norm of every param named `.N.`, in depth order
        layers = {}
        for n, t in ref.items():
            if ".0." in n or ".1." in n:
                i = 0 if ".0." in n else 1
                layers[i] = layers.get(i, 0.0) + t.double().pow(2).sum().item()
        spark = app.screen.query_one("#stats-layers", Sparkline)
        assert [round(v, 9) for v in spark.data] == [round(math.sqrt(layers[i]), 9) for i in (0, 1)]
        await pilot.click("#stats-table", offset=(2, 0))  # the `name` header: sort by name
        await pilot.pause()
        names = [table.row_cells(i)[0] for i in range(table.row_count)]
        assert names == sorted(names)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, StatisticsScreen)


async def test_app_escape_cancels_the_statistics(monkeypatch):
    import time

    from test_tui_app import SIZE, settle

    from zinspect.core import stats as stats_module
    from zinspect.tui.app import ZinspectApp
    from zinspect.tui.screens.stats import StatisticsScreen

    def slow(tensors, progress=None, should_stop=None):
        for step in range(2000):
            progress(step, 2000, "x")
            if should_stop():
                raise MergeCancelled("statistics cancelled")
            time.sleep(0.005)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(stats_module, "compute_stats", slow)
    app = ZinspectApp(str(FIXTURES / "s2_w2_fp32_plain"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("a")
        await pilot.pause(0.2)
        assert isinstance(app.screen, StatisticsScreen)
        await pilot.press("escape")
        await settle(app, pilot)
        assert not isinstance(app.screen, StatisticsScreen)


def test_app_statistics_in_a_real_terminal():
    """`a` in the real app (a pty): the worker runs, the table and the per-layer line draw,
    escape goes back and q quits."""
    import os

    from test_tui_e2e import read_until, spawn_in_pty

    proc, main_fd = spawn_in_pty(["-m", "zinspect", str(FIXTURES / "s3_w2_fp32")])
    try:
        assert b"Overview" in read_until(main_fd, b"Overview", 60)
        read_until(main_fd, b"\x00never", 1)  # let the first frames settle
        os.write(main_fd, b"a")
        screen = read_until(main_fd, b"L2 norm per layer", 60)
        assert b"L2 norm per layer" in screen, screen[-2000:]
        os.write(main_fd, b"\x1b")
        assert b"Overview" in read_until(main_fd, b"Overview", 30)
        os.write(main_fd, b"q")
        read_until(main_fd, b"\x00never", 30, stop=lambda: proc.poll() is not None)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)


@pytest.mark.parametrize("name", ["s1_w2_fp32", "s2_w2_fp32_plain", "s3_w2_fp32", "s2_w3_fp32_rr",
                                  "parallel/pp2_dp2_s1_fp32", "parallel/moe_ep2_w4_s2_fp32",
                                  "parallel/tp2_dp2_s1_toy", "parallel/tp2_dp2_s3_toy"])
def test_moments_are_the_slices_of_the_optimizer_state(name):
    """NAME:exp_avg / :exp_avg_sq are the param's slices of each rank's flat-group moments
    (checked against torch.load of the optimizer files), exp_avg_sq is never negative."""
    from zinspect.core import open_checkpoint
    from zinspect.core.stream import BufferSink, copy_tensors

    ckpt = open_checkpoint(FIXTURES / name)
    tensors = [t for t in open_source(FIXTURES / name, moments=True).tensors if ":exp_avg" in t.name]
    assert {t.name.split(":")[0] for t in tensors} == {n for n, p in ckpt.params.items()
                                                      if not p.frozen and not p.tied_to}
    sink = BufferSink(tensors)
    copy_tensors(tensors, sink, ProgressMeter(0, None))
    loaded = {}
    for t, buf in zip(tensors, sink.buffers, strict=True):
        pname, key = t.name.split(":")
        got = torch.frombuffer(bytearray(buf), dtype=torch.float32)
        p = ckpt.params[pname]

        def flat(fragments, key=key):
            parts = []
            for f in sorted(fragments, key=lambda f: f.start):
                if f.file not in loaded:
                    loaded[f.file] = torch_load(ckpt.path / f.file)["optimizer_state_dict"]
                osd = loaded[f.file]
                state = (osd.get("base_optimizer_state") or osd["optimizer_state_dict"])["state"]
                parts.append(state[f.group][key].flatten()[f.group_offset:f.group_offset + f.numel])
            return torch.cat(parts)

        frags = [f for f in p.fragments if f.numel and f.source == "master"]
        if not p.shards:
            want = flat(frags)
        else:  # each tp rank's shard, placed in the full tensor by its boxes (tp 0 if replicated)
            want = torch.zeros(p.shape)
            for tp, shard in sorted(p.shards.items(), reverse=True):
                held = flat([f for f in frags if f.shard == tp]).reshape(shard.shape)
                for box, full in shard.maps:
                    want[tuple(slice(o, o + n) for o, n in zip(full.offsets, full.sizes, strict=True))] = \
                        held[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes, strict=True))]
            want = want.flatten()
        assert torch.equal(got, want), t.name
    sq = compute_stats([t for t in tensors if t.name.endswith(":exp_avg_sq")])
    assert all(s.min >= 0 for s in sq) and any(s.max > 0 for s in sq)
