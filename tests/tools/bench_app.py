"""How soon the app is usable on a real checkpoint (headless, Textual's pilot).

    python tests/tools/bench_app.py CKPT [--filter layers.3299.] [--profile] [--gc]

Prints, from the app's start: when the tabs are shown (wall and process CPU, all threads) and
when the findings are in (the load worker validates once the tabs are drawn), the Parameters
tab until its tree lists the top modules, each key of a filter typed into `/` until the table
shows that key's rows (and the UI thread's CPU meanwhile: its lag), opening the largest module of
the tree, and the peak RSS; with --gc, each full pass of the garbage collector and the thread it
stopped (on the UI thread, a pause of the app). No number
here is asserted anywhere: the tests check behaviour, this script the speed (issue 9: params
listed and filter typing without lag within 3 s at 297k names).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import resource
import threading
import time

from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.main import Inspector
from zinspect.tui.widgets.param_tree import ParamTree
from zinspect.tui.widgets.params_pane import ParamsPane


async def until(pilot, done, limit: float = 60.0) -> None:
    end = time.perf_counter() + limit
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError("the app did not get there")
        await pilot.pause(0.005)


async def bench(path: str, typed: str, profile: cProfile.Profile | None) -> None:
    t0, c0 = time.perf_counter(), time.process_time()

    def stamp(what: str, since: float) -> None:
        print(f"{what:28s} {time.perf_counter() - since:7.3f} s wall")

    app = ZinspectApp(path)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: bool(app.screen.query(Inspector)))
        await pilot.pause()
        print(f"{'tabs shown':28s} {time.perf_counter() - t0:7.3f} s wall, "
              f"{time.process_time() - c0:.3f} s CPU")
        if profile is not None:
            profile.enable()
        t = time.perf_counter()
        await pilot.press("2")
        tree = app.screen.query_one(ParamTree)
        await until(pilot, lambda: bool(tree.root.children))
        await pilot.pause()
        stamp("params tab, tree listed", t)
        await until(pilot, lambda: app.view.validated)
        print(f"{'findings in':28s} {time.perf_counter() - t0:7.3f} s wall, "
              f"{time.process_time() - c0:.3f} s CPU (from the start)")
        pane = app.screen.query_one(ParamsPane)
        await pilot.press("slash")
        await pilot.pause()
        for i, key in enumerate(typed):
            t, ui = time.perf_counter(), time.thread_time()
            await pilot.press(key)
            await until(pilot, lambda: not getattr(pane, "searching", False))
            rows = pane.query_one("ParamTable").row_count
            print(f"{f'  key {i + 1} {key!r} ({rows} rows)':28s} {time.perf_counter() - t:7.3f} "
                  f"s wall, UI thread {time.thread_time() - ui:.3f} s CPU")
        t = time.perf_counter()
        await pilot.press("escape")
        await until(pilot, lambda: not getattr(pane, "searching", False))
        stamp("clear the filter", t)
        tree.focus()
        biggest = max(tree.root.children, key=lambda n: n.data.count)
        while biggest.allow_expand:
            t = time.perf_counter()
            tree.move_cursor(biggest)
            await pilot.press("enter")
            await pilot.pause()
            stamp(f"open {biggest.data.path} ({len(biggest.children)})", t)
            if len(biggest.children) > 1000:
                break
            biggest = max(biggest.children, key=lambda n: n.data.count)
        if profile is not None:
            profile.disable()
    print(f"{'total':28s} {time.perf_counter() - t0:7.3f} s wall, "
          f"{time.process_time() - c0:.3f} s CPU, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def full_collections():
    started: dict[str, float] = {}

    def note(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started["at"] = time.perf_counter()
        else:
            print(f"  (full collection {time.perf_counter() - started['at']:.3f} s on "
                  f"{threading.current_thread().name})", flush=True)
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--filter", default="layers.3299.", help="the keys typed after /")
    parser.add_argument("--profile", action="store_true",
                        help="profile the UI thread after the tabs are shown")
    parser.add_argument("--gc", action="store_true", help="print each full collection's pause")
    args = parser.parse_args()
    if args.gc:
        gc.callbacks.append(full_collections())
    profile = cProfile.Profile() if args.profile else None
    asyncio.run(bench(args.checkpoint, args.filter, profile))
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumtime").print_stats(30)


if __name__ == "__main__":
    main()
