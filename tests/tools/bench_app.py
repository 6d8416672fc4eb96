"""How soon the app is usable on a real checkpoint (headless, Textual's pilot).

    python tests/tools/bench_app.py CKPT [--filter layers.3299.] [--profile] [--gc]
    python tests/tools/bench_app.py CKPT --pty [--size 160x48] [--ahead]

Prints, from the app's start: when the tabs are shown (wall and process CPU, all threads) and
when the findings are in (the load worker validates once the tabs are drawn), the Parameters
tab until its tree lists the top modules, each key of a filter typed into `/` until the table
shows that key's rows (and the UI thread's CPU meanwhile: its lag), opening the largest module of
the tree, and the peak RSS; with --gc, each full pass of the garbage collector and the thread it
stopped (on the UI thread, a pause of the app).

With --pty, the real app (`python -m zinspect CKPT` of this tree) on a pseudo-terminal read by a
terminal emulator, polled every 5 ms: when the tabs, the Parameters tab's tree (after `2`) and
the findings are on screen (wall, and the app's CPU from /proc), then each filter key typed one
at a time: when the filter box shows it (echo) and when the summary gives its rows (answer);
then the whole filter typed at once until its answer. With --ahead, instead: `2`, `/` and the
filter typed while the checkpoint is read (half a second after the start), until the tabs and
then the filter's answer are on screen (the keys wait for the tabs). No number
here is asserted anywhere: the tests check behaviour, this script the speed (issue 9: params
listed and filter typing without lag within 3 s at 297k names).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import re
import resource
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this tree's zinspect, and the pty driver

from zinspect.tui.app import ZinspectApp  # noqa: E402
from zinspect.tui.screens.main import Inspector  # noqa: E402
from zinspect.tui.widgets.param_tree import ParamTree  # noqa: E402
from zinspect.tui.widgets.params_pane import ParamsPane  # noqa: E402


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


def pty_bench(path: str, typed: str, size: tuple[int, int], ahead: bool) -> None:
    from test_tui_pty_flows import ESCAPE, PtyApp

    app = PtyApp([path], cwd=Path.cwd(), size=size)
    t0 = time.perf_counter()

    def cpu() -> float:
        fields = Path(f"/proc/{app.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def until(done, since: float) -> float:
        while not done(app.shown()):
            if time.perf_counter() - since > 120 or app.proc.poll() is not None:
                raise TimeoutError(f"the app did not get there; the screen:\n{app.shown()}")
            time.sleep(0.005)
        return time.perf_counter() - since

    def answered(text: str, before: str = ""):
        """The filter shows `text` and its rows are counted. With `before` (the screen before
        the key): only once the count differs from it or "searching" was shown meanwhile (a
        frame can show the new text beside the previous key's count)."""
        counted = re.compile(r"[\d,]+ of [\d,]+ match|No param")
        seen = {"searching": not before}
        old = counted.search(before)

        def done(shown: str) -> bool:
            seen["searching"] = seen["searching"] or "searching" in shown
            count = counted.search(shown)
            return bool((f"▊ {text}" in shown or f"▊  {text}" in shown) and
                        "searching" not in shown and count and
                        (seen["searching"] or old is None or count[0] != old[0]))
        return done

    try:
        if ahead:
            time.sleep(0.5)
            app.press(f"2/{typed}")
            print(f"{'typed ahead at':28s} {time.perf_counter() - t0:7.3f} s")
            wall = until(lambda s: "Overview" in s, t0)
            print(f"{'tabs shown':28s} {wall:7.3f} s wall, app CPU {cpu():.2f} s")
            wall = until(answered(typed), t0)
            print(f"{'filter answered':28s} {wall:7.3f} s wall, app CPU {cpu():.2f} s")
            app.press(ESCAPE)
            until(lambda s: "filter: words" not in s and "match" not in s, time.perf_counter())
            print(f"{'exit':28s} {app.quit():7d}")
            return
        wall = until(lambda s: "Overview" in s, t0)
        print(f"{'tabs shown':28s} {wall:7.3f} s wall, app CPU {cpu():.2f} s")
        app.press("2")
        wall = until(lambda s: re.search(r"▶ \S+  [\d,]+ params? ", s), t0)
        print(f"{'params listed (after 2)':28s} {wall:7.3f} s wall, app CPU {cpu():.2f} s")
        wall = until(lambda s: re.search(r"Findings \(\d", s), t0)
        print(f"{'findings in':28s} {wall:7.3f} s wall, app CPU {cpu():.2f} s")
        for attempt in ("one at a time", "all at once"):
            app.press("/")
            until(lambda s: "filter: words" in s, time.perf_counter())
            if attempt == "all at once":
                t = time.perf_counter()
                app.press(typed)
                print(f"{'typed at once, answered':28s} {until(answered(typed), t):7.3f} s")
            for i, key in enumerate(typed if attempt == "one at a time" else ""):
                before = app.shown()
                t = time.perf_counter()
                app.press(key)
                echo = until(lambda s, i=i: f"▊ {typed[:i + 1]}" in s or
                             f"▊  {typed[:i + 1]}" in s, t)
                answer = until(answered(typed[:i + 1], before), t)
                print(f"{f'  key {i + 1} {key!r}':28s} echo {echo * 1000:5.0f} ms, "
                      f"answer {answer * 1000:5.0f} ms")
            app.press(ESCAPE)
            until(lambda s: "filter: words" not in s and "match" not in s, time.perf_counter())
        print(f"{'app CPU in all':28s} {cpu():7.2f} s; exit {app.quit()}")
        # the emulator's parsing competes with the app for the cores: a frame of 160x48 costs
        # it about what the app spends drawing it
        print(f"{'this driver CPU (emulator)':28s} {time.process_time():7.2f} s")
    finally:
        app.close()


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
    parser.add_argument("--pty", action="store_true",
                        help="the real app on a pseudo-terminal (times as the screen shows them)")
    parser.add_argument("--size", default="160x48", help="the terminal's COLSxLINES with --pty")
    parser.add_argument("--ahead", action="store_true",
                        help="with --pty: the filter typed while the checkpoint is read")
    args = parser.parse_args()
    if args.pty:
        cols, lines = map(int, args.size.split("x"))
        pty_bench(args.checkpoint, args.filter, (cols, lines), args.ahead)
        return
    if args.gc:
        gc.callbacks.append(full_collections())
    profile = cProfile.Profile(time.thread_time) if args.profile else None
    asyncio.run(bench(args.checkpoint, args.filter, profile))
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumtime").print_stats(30)


if __name__ == "__main__":
    main()
