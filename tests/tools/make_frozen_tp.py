"""A real AutoTP checkpoint with frozen params: make_ds_autotp.py (same arguments) with layer 0's
q_proj.weight (column), o_proj.weight (row) and input_layernorm.weight (replicated) frozen before
deepspeed.initialize. tests/fixtures/tp_extra/tp2_dp2_s2_toy_frozen was made with

    /work/dsvenv/bin/python tests/tools/make_frozen_tp.py --out OUT --model toy --world-size 4 \\
        --tp 2 --stage 2 --dtype fp32 --steps 2

(then latest_universal, the *_universal dir and the zero_to_*.py copies removed; DeepSpeed's
ds_to_universal.py fails on it: "Unused patterns=[...] while merging tp slices")."""
# ruff: noqa: E402
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_ds_autotp as gen

FROZEN = ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.o_proj.weight",
          "layers.0.input_layernorm.weight")
_build = gen.build_toy


def build_toy(args):
    model = _build(args)
    for name, p in model.named_parameters():
        if name.endswith(FROZEN):
            p.requires_grad_(False)
    return model


gen.build_toy = build_toy  # module level: the spawned rank processes import this file too

if __name__ == "__main__":
    gen.main()
