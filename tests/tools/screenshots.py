"""Regenerate screenshots/*.svg and *.png from the real app on the bundled sample.

    .venv/bin/python tests/tools/screenshots.py [OUT_DIR] [--merge-from CKPT]

OUT_DIR defaults to ./screenshots. merge_progress is a real merge held part way (at the first
progress report past 35 %), so its rate and ETA are the true ones of that moment: the bundled
sample is 26 KiB and merges in milliseconds (one report, at 100 %), so give a real checkpoint
of some hundred MiB with --merge-from (the committed shot: the 122M-param ZeRO-3 checkpoint of
`tests/tools/make_ds_checkpoints.py --stage 3 --world-size 4 --size large --steps 2`).
The findings shot is of a damaged copy of the sample the script makes (rank 2's optimizer file
removed), the ranks shots of the sample and of a committed tp 2 x dp 2 fixture.

PNGs need cairosvg (the `dev` extra). Textual's SVG asks for the web font "Fira Code"; cairosvg
would fall back to a proportional font, so it is rewritten to DejaVu Sans Mono, and the PNG is
scaled so that a cell is a whole number of pixels (see svg_to_png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import ProgressBar

from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens import merge as merge_screen

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the repo: tests/tools/ is two below
SAMPLE = "zinspect/sample"  # relative to PACKAGE_PARENT: what the screenshots show as the path
TP_FIXTURE = "tests/fixtures/parallel/tp2_dp2_s2_toy"
SIZE = (120, 34)
CELL = 12.2  # Textual's SVG puts cells 12.2 units apart
CELL_PX = 13  # ... and a PNG cell is 13 pixels (about 1600 pixels for 120 columns)


@contextlib.contextmanager
def working_dir(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


async def settle(pilot: Pilot) -> None:
    with contextlib.suppress(Exception):  # a failed worker is shown in the app
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    pilot.app.clear_notifications()
    await pilot.pause()


async def shoot(path: str, name: str, out: Path, *keys: str, during=None) -> Path:
    """Open the app on `path`, press `keys`, then save `name`.svg (after `during`, if given)."""
    app = ZinspectApp(path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await settle(pilot)
        if during is not None:
            await during(pilot)
        svg = Path(app.save_screenshot(f"{name}.svg", path=str(out)))
        if during is not None:
            await pilot.press("escape")  # cancel the merge: nothing is left on disk
            await settle(pilot)
    return svg


HOLD_AT = 0.35  # the merge is held at its first progress report past this fraction


def held_merge(real_merge, release: threading.Event):
    """The real merge at its real speed, held part way (between two chunks, once a progress
    report past HOLD_AT and short of the end came in) until `release` or escape: the progress
    panel shows the true rate and ETA of the moment it was held."""
    def merge(*args, progress, should_stop, **kwargs):
        state = {"fraction": 0.0}

        def noting_progress(done: int, total: int, name: str) -> None:
            state["fraction"] = done / total if total else 0.0
            progress(done, total, name)

        def holding_stop() -> bool:
            while HOLD_AT < state["fraction"] < 1 and not should_stop() and \
                    not release.wait(0.05):
                pass  # held: escape (the shot's end) cancels it
            return should_stop()
        return real_merge(*args, progress=noting_progress, should_stop=holding_stop, **kwargs)
    return merge


async def merge_midway(pilot: Pilot) -> None:
    """Start the merge and wait until the bar is part way (held there)."""
    screen = pilot.app.screen
    await pilot.click("#merge-start")
    bar = screen.query_one(ProgressBar)
    while not (bar.total and HOLD_AT < bar.progress / bar.total < 1):
        await pilot.pause(0.05)
    await pilot.pause(0.3)  # the stats line drawn for that progress


async def make_all(out: Path, merge_from: Path | None = None) -> list[Path]:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with working_dir(PACKAGE_PARENT):
        shots.append(await shoot(SAMPLE, "overview", out))
        shots.append(await shoot(SAMPLE, "tree", out, "2", "down", "enter", "down", "down",
                                 "enter", "down", "enter", "f", "down"))
        shots.append(await shoot(SAMPLE, "param_detail", out, "slash", *"embed", "enter", "enter"))
        shots.append(await shoot(SAMPLE, "ranks", out, "3"))
        # the optimizer state chosen with the keys (tab to it, right, space): the plan says it
        shots.append(await shoot(SAMPLE, "merge_form", out, "m", "tab", "tab", "tab", "tab",
                                 "right", "space"))
        shots.append(await shoot(TP_FIXTURE, "ranks_grid", out, "3"))
    with tempfile.TemporaryDirectory() as tmp, working_dir(Path(tmp)):
        shutil.copytree(PACKAGE_PARENT / SAMPLE, "damaged_sample")
        next(Path("damaged_sample/global_step2").glob("*rank_2_*optim_states.pt")).unlink()
        shots.append(await shoot("damaged_sample", "findings", out, "4", "down"))
    real_merge = merge_screen.merge
    release = threading.Event()
    merge_screen.merge = held_merge(real_merge, release)
    try:
        source = merge_from.resolve() if merge_from else PACKAGE_PARENT / SAMPLE
        with tempfile.TemporaryDirectory() as tmp, working_dir(Path(tmp)):
            # shown as its name, not its path; the merge is cancelled: it leaves nothing
            os.symlink(source, source.name)
            shots.append(await shoot(source.name, "merge_progress", out, "m",
                                     during=merge_midway))
    finally:
        release.set()
        merge_screen.merge = real_merge
    return shots


def svg_to_png(svg: Path) -> Path:
    """cairo rounds each glyph's advance to whole device pixels: at a scale where a cell is not
    a whole number of pixels, a long run of text (a border, a table row) ends short of where the
    next segment is placed (the broken right border of merge_progress.png). So the PNG is
    scaled to CELL_PX pixels a cell, which DejaVu's 0.602 em advance rounds to exactly."""
    import cairosvg

    text = svg.read_text().replace("Fira Code", "DejaVu Sans Mono")
    width = float(re.search(r'viewBox="0 0 ([\d.]+) ', text).group(1))
    png = svg.with_suffix(".png")
    cairosvg.svg2png(bytestring=text.encode(), write_to=str(png),
                     output_width=round(width * CELL_PX / CELL))
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="screenshots", type=Path)
    ap.add_argument("--merge-from", type=Path, help="the checkpoint merge_progress merges")
    args = ap.parse_args()
    for svg in asyncio.run(make_all(args.out, args.merge_from)):
        print(svg_to_png(svg))


if __name__ == "__main__":
    main()
