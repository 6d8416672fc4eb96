"""`zinspect reshard`: the checkpoint at another data-parallel world size, for DeepSpeed itself."""

from __future__ import annotations

import sys

from zinspect.cli.common import Bar, Stop, cancelled, open_checkpoint, print_json, readable_at_all, unreadable

NAME = "reshard"
SUMMARY = "rewrite the checkpoint for another number of GPUs (data-parallel ranks)"
DESCRIPTION = "Reshard a ZeRO checkpoint to another world size (tp, pp and ep kept, dp changed)."
EPILOG = """\
Writes OUT_DIR/<tag>/ and OUT_DIR/latest: the checkpoint DeepSpeed itself would have saved had
the run used N ranks (same ZeRO stage, the same partitioning, padding, alignment and ZeRO-3
sub-groups DeepSpeed uses at N). N counts every rank, as DeepSpeed's world size does: with
tensor parallelism (tp) or a pipeline (pp) the data-parallel size becomes N / (tp * pp), so N
must be a multiple of tp * pp; with native MoE, of the expert-parallel size ep (the expert
groups are partitioned over N / ep ranks). The fp32 master weights, Adam's exp_avg and
exp_avg_sq are moved to their new partitions; the step, the hyper-parameters, the loss scaler,
ds_config and the 16-bit model weights are kept. A stock DeepSpeed engine at world size N
resumes from it with plain engine.load_checkpoint(OUT_DIR) and trains on.

Every source byte is read once and CRC-checked (in whatever order the new layout needs it),
planning holds one rank's files at a time, no temporary files are written beside the output,
and the files appear under their names only when all are complete (`latest` last, as DeepSpeed
writes it); a failed or cancelled run leaves nothing.

Plain ZeRO-1/2/3 and BF16_Optimizer checkpoints, tensor-parallel (AutoTP) ZeRO-1/2/3, pipeline
ZeRO-1 (also with tensor parallelism) and native MoE ZeRO-1/2 checkpoints, with Adam/AdamW
states: each tp rank's / stage's files are resharded over dp as a plain ZeRO checkpoint; a
pipeline's layer files and the MoE expert files are copied byte for byte. Changing the ZeRO
stage, the tp, pp or ep degree is refused (for a tp or pp change, write a universal checkpoint:
`zinspect merge PATH OUT --format universal`, and load it with "checkpoint": {"load_universal":
true}); so are a pipeline's bf16 ZeRO-0 files. ZeRO-0 needs no reshard.

examples:
  zinspect reshard ./checkpoints ./ckpt_ws8 --world-size 8
  zinspect reshard ./checkpoints/global_step1000 ./ckpt_ws2 --world-size 2 --json
  zinspect reshard ./tp2_dp4 ./tp2_dp2 --world-size 4      # tp 2 kept: 2 data-parallel ranks

exit codes:
  0    written
  1    the checkpoint cannot be resharded correctly (damaged, or a layout not supported)
  2    PATH is not a checkpoint, OUT_DIR is unusable (holds a checkpoint: use --force), bad usage
       (N not a multiple of tp * pp or ep)
  130  cancelled with Ctrl-C; nothing was written
"""


def add_arguments(p) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the new checkpoint into")
    p.add_argument("--world-size", type=int, required=True, metavar="N",
                   help="ranks the new checkpoint is for, every rank as DeepSpeed counts them "
                        "(dp x tp x pp)")
    p.add_argument("--force", action="store_true",
                   help="write into OUT_DIR even if it already holds `latest` or the tag dir")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the result")


def run(args) -> int:
    from zinspect.core import fmt
    from zinspect.core.reshard import check_reshardable, reshard

    ckpt = open_checkpoint(args)
    if not readable_at_all(ckpt):
        return unreadable(ckpt)
    check_reshardable(ckpt, args.world_size)
    err = sys.stderr

    def announce() -> None:
        print(f"zinspect: resharding {fmt.shown(str(ckpt.path))} (ZeRO-{ckpt.stage}, "
              f"{ckpt.world_size} ranks{_degrees(ckpt)}) for {args.world_size} ranks into "
              f"{fmt.shown(str(args.out_dir))}", file=err)
        err.flush()

    with Stop() as stop, Bar("resharding", 0) as bar:
        try:
            result = reshard(ckpt, args.out_dir, args.world_size, force=args.force,
                             progress=bar.update, should_stop=stop, ready=announce,
                             notice=lambda text: print(f"zinspect: {text}", file=err))
        except KeyboardInterrupt:
            raise cancelled("the reshard") from None
    if args.json:
        print_json(result.to_json())
    print(f"zinspect: wrote {len(result.files)} files ({fmt.size(result.bytes)}) for "
          f"{result.world_size} ranks to {fmt.shown(str(result.out_dir / result.tag))} and "
          f"{fmt.shown(str(result.out_dir / 'latest'))} in {fmt.duration(result.seconds)}; "
          f"{result.verified} source records CRC-checked", file=err)
    for note in result.notes:
        print(f"  note: {fmt.shown(note, 400)}", file=err)
    for rec in result.unverified:
        print(f"  not read whole (not CRC-checked): {fmt.shown(rec, 200)}", file=err)
    return 0


def _degrees(ckpt) -> str:
    """", tp 2 x pp 1 kept" for the degrees a reshard keeps, when there are any."""
    kept = [f"{k} {v}" for k, v in ckpt.topology.sizes.items() if k != "dp" and v > 1]
    return f", {' x '.join(kept)} kept" if kept else ""
