"""`zinspect info`: a summary of a checkpoint from its metadata."""

from __future__ import annotations

import sys

from zinspect.cli.common import open_checkpoint, print_json, readable_at_all
from zinspect.report import human_info
from zinspect.report_json import info_json, write_info_json

NAME = "info"
SUMMARY = "summary of a checkpoint (--json for scripts)"
DESCRIPTION = "Summarise a checkpoint from its metadata."
EPILOG = """\
Shows where the checkpoint is (tag, other tags), how it was trained (ZeRO stage, world size,
dtypes, DeepSpeed version, layout), its params (trainable, frozen, tied) and sizes, the files
of each rank, the optimizer param groups, the optimizer (kind, step, hyper-parameters, fp16 loss
scale) and how many findings validation has.

examples:
  zinspect info ./checkpoints
  zinspect info ./checkpoints/global_step1000 --json | jq '.params[] | .name'

--json prints one object: stage, world_size, dtype ("bf16", "fp16", "fp32"), master_dtype,
ds_version, tag, tags, layout, path, files, buffers, params (name, shape, numel, dtype, frozen,
tied_to, group), groups, findings, counts, totals, optimizer. Tied params appear under both
names. `optimizer` is read from the lowest rank's optimizer file: name (AdamW, SGD (momentum),
... or "unknown"), wrapper (ZeRO-1/2, ZeRO-3, BF16_Optimizer, ...), step, groups (the
hyper-parameters of each param group: lr, betas, eps, weight_decay, ...), state_keys (what each
param's state holds: exp_avg, exp_avg_sq, momentum_buffer, ...), adam, clip_grad, loss_scaler
(scale, dynamic, overflow, iteration, last_overflow, ...; null without one), skipped_steps and
global_steps (for a dynamic loss scale and ZeRO-0), source and note.

exit codes:
  0    the checkpoint was found and read (even if it has errors: info shows what it could read)
  2    PATH is not a checkpoint, or no file in it can be read, or bad usage
"""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args) -> int:
    ckpt = open_checkpoint(args)
    if args.json and sys.stdout.isatty():  # indented for a terminal (print_json)
        print_json(info_json(ckpt))
    elif args.json:  # compact, as print_json writes it when piped: the rows streamed
        write_info_json(ckpt, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        human_info(ckpt)
    return 0 if readable_at_all(ckpt) else 2
