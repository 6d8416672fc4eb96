#!/usr/bin/env python3
"""Regenerate the real DeepSpeed checkpoint fixtures in tests/fixtures/.

Each fixture is written by one of the generators beside this script, which train a toy model for
a few steps with real DeepSpeed on CPU processes and save the checkpoint:

    make_ds_checkpoints.py   plain ZeRO 1/2/3                     -> tests/fixtures/NAME
    make_ds_pipeline.py      PipelineModule pp x dp, ZeRO 0/1     -> tests/fixtures/parallel/NAME
    make_ds_moe.py           native MoE, expert parallel, ZeRO 0-2
    make_ds_autotp.py        AutoTP tensor parallel, ZeRO 0-3
    make_ds_variants.py      ZeRO-0, CPU offload, ZeRO++ hpZ
    make_ds_pptp.py          pipeline x tensor parallel (Megatron-DeepSpeed / BLOOM), ZeRO 1

The layouts zinspect cannot merge yet live one level down, in tests/fixtures/parallel/, so the
tests that run over every fixture (conftest.fixture_names globs tests/fixtures/*/manifest.json)
do not pick them up before their layout is implemented. Every fixture directory holds:

    latest, <tag>/...      the checkpoint exactly as DeepSpeed wrote it
    reference_fp32.pt      the true consolidated fp32 state ({name: tensor})
    manifest.json          params, groups, frozen/tied, buffers, versions, zero_to_fp32 check

DeepSpeed also copies its zero_to_fp32.py and zero_to_torch.py next to `latest`. This script
deletes them (we do not commit DeepSpeed source) and drops them from the manifest's `files`; so
too the universal checkpoint make_ds_autotp.py writes for its ds_to_universal check.

Setup: DeepSpeed must live in its own CPU-only virtualenv (zinspect itself does not need it):

    python3 -m venv dsvenv
    dsvenv/bin/pip install torch==2.13.0       # FIRST, so pip installs the CPU wheel
    dsvenv/bin/pip install wheel
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu dsvenv/bin/pip install --no-build-isolation deepspeed==0.19.8
    dsvenv/bin/pip install huggingface_hub transformers   # the zero_to_fp32 CLI; the AutoTP Llama

Usage:

    dsvenv/bin/python tests/tools/make_fixtures.py                 # all fixtures
    python3 tests/tools/make_fixtures.py --python dsvenv/bin/python --only s3_w4_bf16
    dsvenv/bin/python tests/tools/make_fixtures.py --parallel      # only tests/fixtures/parallel/
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
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEEPSPEED_COPIES = ("zero_to_fp32.py", "zero_to_torch.py")
SAMPLE_FIXTURE = "s3_w4_bf16"
PARALLEL_DIR = "parallel"  # sub-dir of the fixture dir for the layouts that are not merged yet


@dataclass(frozen=True)
class Generator:
    script: str
    common: tuple[str, ...]  # options before the fixture's own (argparse keeps the last)
    verdict: str  # the marker of the line where the script prints its checks' verdict


ZERO = Generator("make_ds_checkpoints.py", ("--size", "tiny", "--steps", "2"), "zero_to_fp32 check:")
PIPELINE = Generator("make_ds_pipeline.py", ("--steps", "2"), " checks: ")
MOE = Generator("make_ds_moe.py", ("--steps", "2"), " checks: ")
AUTOTP = Generator("make_ds_autotp.py", ("--steps", "2"), " checks: ")
VARIANTS = Generator("make_ds_variants.py", ("--steps", "2"), " checks: ")
PPTP = Generator("make_ds_pptp.py", ("--steps", "2", "--universal"), " checks: ")

#: name -> (generator, its options); plain ZeRO fixtures, in tests/fixtures/NAME
FIXTURES = {
    "s1_w2_fp32": (ZERO, ["--stage", "1", "--world-size", "2", "--dtype", "fp32"]),
    "s1_w4_bf16": (ZERO, ["--stage", "1", "--world-size", "4", "--dtype", "bf16"]),
    # bf16 + stage 1 + fp32 grad accumulation: BF16_Optimizer layout, not the ZeRO optimizer
    "s1_w2_bf16_bf16opt": (ZERO, ["--stage", "1", "--world-size", "2", "--dtype", "bf16",
                                  "--grad-accum-dtype", "fp32"]),
    "s2_w1_fp32": (ZERO, ["--stage", "2", "--world-size", "1", "--dtype", "fp32"]),
    "s2_w2_bf16": (ZERO, ["--stage", "2", "--world-size", "2", "--dtype", "bf16"]),
    "s2_w4_fp16": (ZERO, ["--stage", "2", "--world-size", "4", "--dtype", "fp16"]),
    "s2_w3_fp32_rr": (ZERO, ["--stage", "2", "--world-size", "3", "--dtype", "fp32", "--round-robin"]),
    "s2_w2_fp32_plain": (ZERO, ["--stage", "2", "--world-size", "2", "--dtype", "fp32",
                                "--no-frozen", "--no-tied"]),
    "s3_w2_fp32": (ZERO, ["--stage", "3", "--world-size", "2", "--dtype", "fp32"]),
    "s3_w4_bf16": (ZERO, ["--stage", "3", "--world-size", "4", "--dtype", "bf16"]),
    # no frozen or tied names: the usual ZeRO-3 model states, whose params are built in bulk
    "s3_w2_bf16_plain": (ZERO, ["--stage", "3", "--world-size", "2", "--dtype", "bf16",
                                "--no-frozen", "--no-tied"]),
    # 2,651 params (runs of alike entries past a SETITEMS batch: read by pickle_runs when its
    # pickle is read as a large one, tests/test_deferred_checkpoint.py), buffers around them
    "s3_w2_bf16_many": (ZERO, ["--stage", "3", "--world-size", "2", "--dtype", "bf16",
                               "--width", "2", "--layers", "330", "--vocab", "8", "--steps", "1",
                               "--seq", "4", "--batch", "1", "--no-frozen", "--no-tied"]),
    # several fp32 sub-groups per param group
    "s3_w3_fp16_sub": (ZERO, ["--stage", "3", "--world-size", "3", "--dtype", "fp16",
                              "--sub-group-size", "200"]),
    "s3_w5_bf16_small": (ZERO, ["--stage", "3", "--world-size", "5", "--dtype", "bf16", "--size", "small"]),
}

#: name -> (generator, its options); pipeline / tensor / expert parallel, ZeRO-0, offload and hpZ,
#: in tests/fixtures/parallel/NAME
PARALLEL_FIXTURES = {
    # Megatron-style layer list: parameterless layers (index gaps), a tied embedding reused as the head
    "pp2_dp2_s1_fp32": (PIPELINE, ["--pp", "2", "--dp", "2", "--stage", "1"]),
    # BLOOM style: bf16 + fp32 grad accumulation (BF16_Optimizer), layer_XX-model_TT file names
    "pp2_dp2_s1_bf16_pmd": (PIPELINE, ["--pp", "2", "--dp", "2", "--stage", "1", "--dtype", "bf16",
                                       "--grad-accum-dtype", "fp32", "--topology", "pipe-model-data"]),
    # DeepSpeed cannot reload it itself (a known gap the manifest records)
    "pp2_dp1_s0_bf16": (PIPELINE, ["--pp", "2", "--dp", "1", "--stage", "0", "--dtype", "bf16"]),
    "pp3_dp1_s0_fp32": (PIPELINE, ["--pp", "3", "--dp", "1", "--stage", "0", "--blocks", "6"]),
    # FP16_UnfusedOptimizer per stage (fp32_groups in mp_rank_SS); no frozen param: a frozen norm
    # bias beside its norm weight makes the masters' order undecidable (tests forge that case)
    "pp2_dp1_s0_fp16": (PIPELINE, ["--pp", "2", "--dp", "1", "--stage", "0", "--dtype", "fp16",
                                   "--no-frozen"]),
    "moe_ep2_w4_s2_fp32": (MOE, ["--world-size", "4", "--ep-size", "2", "--num-experts", "4",
                                 "--stage", "2"]),
    "moe_ep2_w4_s1_top2_res": (MOE, ["--world-size", "4", "--ep-size", "2", "--num-experts", "4",
                                     "--stage", "1", "--top-k", "2", "--use-residual"]),
    # ZeRO-0: no partitions; expp_rank_X_mp_rank_00_optim_states.pt per ep rank
    "moe_ep2_w4_s0_fp32": (MOE, ["--world-size", "4", "--ep-size", "2", "--num-experts", "4",
                                 "--stage", "0"]),
    # 16-bit: FP16_UnfusedOptimizer masters (fp32_groups) in mp_rank_00 and per ep rank in expp_rank_X
    "moe_ep2_w2_s0_bf16": (MOE, ["--world-size", "2", "--ep-size", "2", "--num-experts", "4",
                                 "--stage", "0", "--dtype", "bf16", "--width", "8", "--vocab", "32"]),
    # Megatron-DeepSpeed / BLOOM: PipeModelDataParallelTopology, vocab-parallel tied embedding,
    # column/row-parallel and swiglu 2-sub-param layers; BF16_Optimizer / ZeRO-1 over dp 2
    "pp2_tp2_dp1_s1_bf16": (PPTP, ["--pp", "2", "--tp", "2", "--dp", "1", "--dtype", "bf16",
                                   "--grad-accum-dtype", "fp32"]),
    "pp2_tp2_dp2_s1_fp32": (PPTP, ["--pp", "2", "--tp", "2", "--dp", "2"]),
    # ZeRO-0: bf16 saves BF16_Optimizer files (DeepSpeed cannot reload them: a known gap the
    # manifest records); fp32 saves none (its masters are the layer files, by position: refused)
    "pp2_tp2_dp1_s0_bf16": (PPTP, ["--pp", "2", "--tp", "2", "--dp", "1", "--stage", "0",
                                   "--dtype", "bf16"]),
    "pp2_tp2_dp1_s0_fp32": (PPTP, ["--pp", "2", "--tp", "2", "--dp", "1", "--stage", "0"]),
    "tp2_dp2_s1_toy": (AUTOTP, ["--model", "toy", "--world-size", "4", "--tp", "2", "--stage", "1"]),
    # (--vocab-parallel-head fails in training: the column-split head's logits are not gathered)
    "tp2_dp2_s2_toy": (AUTOTP, ["--model", "toy", "--world-size", "4", "--tp", "2", "--stage", "2"]),
    "tp2_dp2_s3_toy": (AUTOTP, ["--model", "toy", "--world-size", "4", "--tp", "2", "--stage", "3"]),
    # a tiny transformers LlamaForCausalLM, tied: AutoTP makes the embedding vocab-parallel
    "tp2_dp2_s2_llama_bf16_tied": (AUTOTP, ["--model", "llama", "--world-size", "4", "--tp", "2",
                                            "--stage", "2", "--dtype", "bf16", "--tied"]),
    "z0_fp32": (VARIANTS, ["--stage", "0", "--dtype", "fp32"]),
    "z0_bf16": (VARIANTS, ["--stage", "0", "--dtype", "bf16"]),
    # fp16 on CPU needs AVX512-FP16/AMX ("Type fp16 is not supported" elsewhere)
    "z0_fp16": (VARIANTS, ["--stage", "0", "--dtype", "fp16"]),
    # --compare-plain: the manifest's checks.layout_vs_plain diffs the files against a plain run
    "offload_s3_w2": (VARIANTS, ["--stage", "3", "--world-size", "2", "--offload", "both",
                                 "--compare-plain"]),
    "hpz_s3_w4": (VARIANTS, ["--stage", "3", "--world-size", "4", "--hpz", "2", "--compare-plain"]),
}


def fixture_out(out_dir, name):
    """Where fixture `name` lives under the fixture dir."""
    if name in PARALLEL_FIXTURES:
        return os.path.join(out_dir, PARALLEL_DIR, name)
    return os.path.join(out_dir, name)


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


def strip_generator_extras(out):
    """Delete what is not the checkpoint DeepSpeed saved, and keep manifest.json's file list in
    step with the disk: DeepSpeed's script copies (we do not commit DeepSpeed source) and the
    universal checkpoint make_ds_autotp.py converts to as one of its checks (`latest_universal`,
    `<tag>_universal/`: a layout of its own, not what these fixtures are for)."""
    doomed = [name for name in (*DEEPSPEED_COPIES, "latest_universal")
              if os.path.isfile(os.path.join(out, name))]
    doomed_dirs = [name for name in os.listdir(out) if name.endswith("_universal")
                   and os.path.isdir(os.path.join(out, name))]
    for name in doomed:
        os.remove(os.path.join(out, name))
    for name in doomed_dirs:
        shutil.rmtree(os.path.join(out, name))
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
        files = {k: v for k, v in manifest.get("files", {}).items()
                 if k not in doomed and k.split("/")[0] not in doomed_dirs}
        manifest["files"] = files
        manifest["total_bytes"] = sum(files.values())
        universal = [n for n in doomed if n not in DEEPSPEED_COPIES] + [f"{n}/" for n in doomed_dirs]
        if universal:
            manifest["removed_by_make_fixtures"] = universal
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)


def make_fixture(python, name, out):
    """Run the generator for one fixture. Returns (exit code, its verdict line, seconds)."""
    if os.path.exists(out):
        shutil.rmtree(out)  # the generators refuse a non-empty directory
    generator, options = FIXTURES.get(name) or PARALLEL_FIXTURES[name]
    cmd = [python, os.path.join(HERE, generator.script), "--out", out, *generator.common, *options]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - t0
    verdict = next((line for line in proc.stdout.splitlines() if generator.verdict in line), None)
    if proc.returncode != 0 or verdict is None:
        print(proc.stdout[-4000:], flush=True)  # the tail holds the traceback
    else:
        print(verdict, flush=True)
    if os.path.isdir(out):
        strip_generator_extras(out)
    return proc.returncode, verdict, seconds


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
    ap.add_argument("--only", metavar="NAME", action="append", choices=[*FIXTURES, *PARALLEL_FIXTURES],
                    help="regenerate only this fixture (repeatable)")
    ap.add_argument("--parallel", action="store_true",
                    help=f"regenerate only the fixtures in {PARALLEL_DIR}/ "
                         "(parallel layouts, ZeRO-0, offload, hpZ)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "fixtures"),
                    help="where fixture dirs go (default: tests/fixtures)")
    ap.add_argument("--update-sample", action="store_true",
                    help=f"also copy {SAMPLE_FIXTURE} (latest + tag dir) into zinspect/sample/")
    ap.add_argument("--list", action="store_true", help="print the fixture names and options, then exit")
    args = ap.parse_args(argv)

    if args.list:
        for name, (generator, opts) in {**FIXTURES, **PARALLEL_FIXTURES}.items():
            print(f"{name:26s} {generator.script} {' '.join([*generator.common, *opts])}")
        return 0

    names = args.only or (list(PARALLEL_FIXTURES) if args.parallel else [*FIXTURES, *PARALLEL_FIXTURES])
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for name in names:
        out = fixture_out(args.out_dir, name)
        rc, check, seconds = make_fixture(args.python, name, out)
        size = dir_bytes(out) if os.path.isdir(out) else 0
        results.append((name, rc, check, seconds, size))

    print(f"\n{'fixture':26s} rc   time    size")
    for name, rc, _check, seconds, size in results:
        print(f"{name:26s} {rc:3d} {seconds:5.1f}s {human(size):>9s}")
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
