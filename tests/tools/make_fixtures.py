#!/usr/bin/env python3
"""Regenerate the real DeepSpeed ZeRO checkpoint fixtures in tests/fixtures/.

Each fixture is written by tests/tools/make_ds_checkpoints.py, which trains a toy model for a
few steps with real DeepSpeed on CPU processes and saves the checkpoint. Every fixture
directory then holds:

    latest, <tag>/...      the checkpoint exactly as DeepSpeed wrote it
    reference_fp32.pt      the true consolidated fp32 state ({name: tensor})
    manifest.json          params, groups, frozen/tied, buffers, versions, zero_to_fp32 check

DeepSpeed also copies its zero_to_fp32.py and zero_to_torch.py next to `latest`. This script
deletes them (we do not commit DeepSpeed source) and drops them from the manifest's `files`.

Setup: DeepSpeed must live in its own CPU-only virtualenv (zinspect itself does not need it):

    python3 -m venv dsvenv
    dsvenv/bin/pip install torch==2.13.0       # FIRST, so pip installs the CPU wheel
    dsvenv/bin/pip install wheel
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu dsvenv/bin/pip install --no-build-isolation deepspeed==0.19.8

Usage:

    dsvenv/bin/python tests/tools/make_fixtures.py                 # all fixtures
    python3 tests/tools/make_fixtures.py --python dsvenv/bin/python --only s3_w4_bf16
    python3 tests/tools/make_fixtures.py --list

tests/fixtures/stale/ holds two optimizer files saved one step later by the same runs
(`make_ds_checkpoints.py --out X --stage 2 --world-size 4 --dtype fp16 --steps 3`, rank 2, and
`--stage 3 --world-size 4 --dtype bf16 --steps 3`, rank 1): stale files with the right shapes.

`--update-sample` also copies the s3_w4_bf16 checkpoint (`latest` and its tag dir only) into
zinspect/sample/, the sample that ships inside the package.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GENERATOR = os.path.join(HERE, "make_ds_checkpoints.py")
DEEPSPEED_COPIES = ("zero_to_fp32.py", "zero_to_torch.py")
SAMPLE_FIXTURE = "s3_w4_bf16"

COMMON = ["--size", "tiny", "--steps", "2"]  # later options override these (argparse keeps the last)
FIXTURES = {
    "s1_w2_fp32": ["--stage", "1", "--world-size", "2", "--dtype", "fp32"],
    "s1_w4_bf16": ["--stage", "1", "--world-size", "4", "--dtype", "bf16"],
    # bf16 + stage 1 + fp32 grad accumulation: BF16_Optimizer layout, not the ZeRO optimizer
    "s1_w2_bf16_bf16opt": ["--stage", "1", "--world-size", "2", "--dtype", "bf16",
                           "--grad-accum-dtype", "fp32"],
    "s2_w1_fp32": ["--stage", "2", "--world-size", "1", "--dtype", "fp32"],
    "s2_w2_bf16": ["--stage", "2", "--world-size", "2", "--dtype", "bf16"],
    "s2_w4_fp16": ["--stage", "2", "--world-size", "4", "--dtype", "fp16"],
    "s2_w3_fp32_rr": ["--stage", "2", "--world-size", "3", "--dtype", "fp32", "--round-robin"],
    "s2_w2_fp32_plain": ["--stage", "2", "--world-size", "2", "--dtype", "fp32",
                         "--no-frozen", "--no-tied"],
    "s3_w2_fp32": ["--stage", "3", "--world-size", "2", "--dtype", "fp32"],
    "s3_w4_bf16": ["--stage", "3", "--world-size", "4", "--dtype", "bf16"],
    # several fp32 sub-groups per param group
    "s3_w3_fp16_sub": ["--stage", "3", "--world-size", "3", "--dtype", "fp16",
                       "--sub-group-size", "200"],
    "s3_w5_bf16_small": ["--stage", "3", "--world-size", "5", "--dtype", "bf16", "--size", "small"],
}


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def strip_deepspeed_copies(out):
    """Delete DeepSpeed's script copies and keep manifest.json's file list in step with the disk."""
    for name in DEEPSPEED_COPIES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
        files = {k: v for k, v in manifest.get("files", {}).items() if k not in DEEPSPEED_COPIES}
        manifest["files"] = files
        manifest["total_bytes"] = sum(files.values())
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)


def make_fixture(python, name, out):
    """Run the generator for one fixture. Returns (exit code, zero_to_fp32 check line, seconds)."""
    if os.path.exists(out):
        shutil.rmtree(out)  # the generator refuses a non-empty directory
    cmd = [python, GENERATOR, "--out", out, *COMMON, *FIXTURES[name]]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - t0
    check = next((line for line in proc.stdout.splitlines() if "zero_to_fp32 check:" in line), None)
    if proc.returncode != 0 or check is None:
        print(proc.stdout[-4000:], flush=True)  # the tail holds the traceback
    elif check:
        print(check, flush=True)
    if os.path.isdir(out):
        strip_deepspeed_copies(out)
    return proc.returncode, check, seconds


def update_sample(fixture_dir, sample_dir):
    """Copy `latest` and the tag dir it names (nothing else) into sample_dir."""
    with open(os.path.join(fixture_dir, "latest")) as f:
        tag = f.read().strip()
    old_latest = os.path.join(sample_dir, "latest")
    if os.path.exists(old_latest):  # drop the previous sample checkpoint (latest + its tag dir)
        with open(old_latest) as f:
            old_tag = f.read().strip()
        if old_tag and os.path.isdir(os.path.join(sample_dir, old_tag)):
            shutil.rmtree(os.path.join(sample_dir, old_tag))
        os.remove(old_latest)
    os.makedirs(sample_dir, exist_ok=True)
    shutil.copy2(os.path.join(fixture_dir, "latest"), os.path.join(sample_dir, "latest"))
    shutil.copytree(os.path.join(fixture_dir, tag), os.path.join(sample_dir, tag))
    print(f"sample: {sample_dir} <- {fixture_dir} ({tag}, {human(dir_bytes(sample_dir))})")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Regenerate the DeepSpeed checkpoint fixtures.")
    ap.add_argument("--python", default=sys.executable,
                    help="Python of the DeepSpeed venv (default: the one running this script)")
    ap.add_argument("--only", metavar="NAME", action="append", choices=list(FIXTURES),
                    help="regenerate only this fixture (repeatable)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "fixtures"),
                    help="where fixture dirs go (default: tests/fixtures)")
    ap.add_argument("--update-sample", action="store_true",
                    help=f"also copy {SAMPLE_FIXTURE} (latest + tag dir) into zinspect/sample/")
    ap.add_argument("--list", action="store_true", help="print the fixture names and options, then exit")
    args = ap.parse_args(argv)

    if args.list:
        for name, opts in FIXTURES.items():
            print(f"{name:20s} {' '.join(COMMON + opts)}")
        return 0

    names = args.only or list(FIXTURES)
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for name in names:
        out = os.path.join(args.out_dir, name)
        rc, check, seconds = make_fixture(args.python, name, out)
        size = dir_bytes(out) if os.path.isdir(out) else 0
        results.append((name, rc, check, seconds, size))

    print("\nfixture               rc   time    size")
    for name, rc, _check, seconds, size in results:
        print(f"{name:20s} {rc:3d} {seconds:5.1f}s {human(size):>9s}")
    print(f"total in {args.out_dir}: {human(dir_bytes(args.out_dir))}")
    failed = [r[0] for r in results if r[1] != 0 or r[2] is None]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1

    if args.update_sample:
        update_sample(os.path.join(args.out_dir, SAMPLE_FIXTURE), os.path.join(REPO, "zinspect", "sample"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
