"""Regenerate screenshots/*.svg and *.png from the real app on the bundled sample.

    .venv/bin/python tests/tools/screenshots.py [OUT_DIR]      (default: ./screenshots)

PNGs need cairosvg (the `dev` extra). Textual's SVG asks for the web font "Fira Code"; cairosvg
would fall back to a proportional font, so it is rewritten to DejaVu Sans Mono first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import ProgressBar

from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens import merge as merge_screen

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the repo: tests/tools/ is two below
SAMPLE = "zinspect/sample"  # relative to PACKAGE_PARENT: what the screenshots show as the path
SIZE = (120, 34)
PNG_WIDTH = 1600


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


def held_merge(real_merge, release: threading.Event):
    """The real merge at its real speed, held part way (between two chunks) until `release` or
    escape:
    the progress panel shows the true rate and ETA of the moment it was held."""
    def merge(*args, progress, should_stop, **kwargs):
        state = {"fraction": 0.0}

        def noting_progress(done: int, total: int, name: str) -> None:
            state["fraction"] = done / total if total else 0.0
            progress(done, total, name)

        def holding_stop() -> bool:
            while state["fraction"] > 0.3 and not should_stop() and not release.wait(0.05):
                pass  # held: escape (the shot's end) cancels it
            return should_stop()
        return real_merge(*args, progress=noting_progress, should_stop=holding_stop, **kwargs)
    return merge


async def merge_midway(pilot: Pilot) -> None:
    """Start a sharded merge and wait until the bar is part way."""
    screen = pilot.app.screen
    screen.query_one("#merge-shard").value = "3KB"
    await pilot.click("#merge-start")
    bar = screen.query_one(ProgressBar)
    while not (bar.total and bar.progress / bar.total > 0.3):
        await pilot.pause(0.05)
    await pilot.pause(0.2)  # the stats line drawn for that progress


async def make_all(out: Path) -> list[Path]:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with working_dir(PACKAGE_PARENT):
        shots.append(await shoot(SAMPLE, "overview", out))
        shots.append(await shoot(SAMPLE, "tree", out, "2", "down", "enter", "down", "down",
                                 "enter", "down", "enter", "f", "down"))
        shots.append(await shoot(SAMPLE, "param_detail", out, "slash", *"embed", "enter", "enter"))
        shots.append(await shoot(SAMPLE, "ranks", out, "3"))
    with tempfile.TemporaryDirectory() as tmp, working_dir(Path(tmp)):
        shutil.copytree(PACKAGE_PARENT / SAMPLE, "damaged_sample")
        next(Path("damaged_sample/global_step2").glob("*rank_2_*optim_states.pt")).unlink()
        shots.append(await shoot("damaged_sample", "findings", out, "4", "down"))
    real_merge = merge_screen.merge
    release = threading.Event()
    merge_screen.merge = held_merge(real_merge, release)
    try:
        with working_dir(PACKAGE_PARENT):  # the merge is cancelled: it leaves nothing here
            shots.append(await shoot(SAMPLE, "merge_progress", out, "f", "m",
                                     during=merge_midway))
    finally:
        release.set()
        merge_screen.merge = real_merge
    return shots


def svg_to_png(svg: Path) -> Path:
    import cairosvg

    text = svg.read_text().replace("Fira Code", "DejaVu Sans Mono")
    png = svg.with_suffix(".png")
    cairosvg.svg2png(bytestring=text.encode(), write_to=str(png), output_width=PNG_WIDTH)
    return png


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")
    for svg in asyncio.run(make_all(out)):
        print(svg_to_png(svg))


if __name__ == "__main__":
    main()
