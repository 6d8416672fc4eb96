"""Pipeline × tensor parallel (Megatron-DeepSpeed / BLOOM): PipelineModule stages on the
PipeModelDataParallelTopology, each stage's layers split over tp ranks (parallel-layouts.md §2).

Files: `layer_XX-model_TT-model_states.pt` (tp rank TT's shards of layer XX, 16-bit, by dp rank
0); `mp_rank_SS_model_states.pt` per (stage, tp rank), SS = stage * tp + tp rank, each with the
stage's `param_shapes` (its shards' shapes) and the `universal_checkpoint_info` Megatron-
DeepSpeed saves as client state; `[bf16_]zero_pp_rank_D_mp_rank_SS_optim_states.pt` per (dp rank,
SS): ZeRO-1 (or BF16_Optimizer) of that slice's shards.

So the pipeline's stage logic (`pipeline._Pipeline`: names from the layer files and the stages'
flat groups, tied params and their copies, the one-save checks) runs on tp rank 0's files, each
(stage, tp rank) slice gets the ZeRO geometry over its dp ranks with its fragments indexing that
tp rank's shard, and each param is placed from its tp ranks' shard shapes by the split rules
(`tensor_parallel.place`), as in a tensor-parallel checkpoint. ZeRO-0 with TP keeps its masters
in the model states: named, not merged.
"""

from __future__ import annotations

from collections import defaultdict

from zinspect.core.layouts import pipeline, tensor_parallel
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.gaps import missing_files
from zinspect.core.layouts.pickled import get, located
from zinspect.core.layouts.tp_checks import REPLACE
from zinspect.core.model import Coords, RankFile, Topology
from zinspect.core.torchzip import TensorRef


def tp_degree(ctx: LoadContext) -> int:
    """The declared tp degree; else (no checkpoint_parallel_dimensions) the tp ranks the layer
    files are named for."""
    dims = get(ctx.model_state, "checkpoint_parallel_dimensions", "tp_degree")
    if type(dims) is int and dims > 0:
        return dims
    return len({f.mp_rank or 0 for f in ctx.ckpt.files_of("layer")}) or 1


def recognise(ctx: LoadContext) -> bool:
    return pipeline.recognise(ctx) and tp_degree(ctx) > 1


class _PipelineTP(pipeline._Pipeline):  # noqa: SLF001 (the stage logic this layout extends)
    def __init__(self, ctx: LoadContext) -> None:
        super().__init__(ctx)
        self.tp = tp_degree(ctx)
        self.slice_files: dict[tuple[int, int], RankFile] = {}  # (stage, tp) -> model states
        self.slice_optim: dict[tuple[int, int], dict[int, RankFile]] = defaultdict(dict)
        self.layer_files: dict[tuple[int, int], RankFile] = {}  # (layer, tp) -> layer file
        if not get(ctx.model_state, "checkpoint_parallel_dimensions", "pp_degree"):
            self.pp = max(1, len({f.mp_rank for f in self.c.files_of("model") if f.rank is None})
                          // self.tp)

    # ------------------------------------------------------------------ files
    def sort_files(self) -> None:
        """Each file at its (dp, stage, tp) coordinate; a stage's names come from its lowest
        readable tp rank; missing and stale files located."""
        ctx, tp = self.ctx, self.tp
        for rf in self.c.files:
            if rf.kind == "layer":
                t = rf.mp_rank or 0
                rf.coords = Coords(tp=t, layer=rf.coords.layer)
                if not self.layer_beyond(rf):
                    self.layer_files[(rf.coords.layer, t)] = rf
            elif rf.kind in ("model", "optim") and rf.mp_rank is not None:
                s, t = divmod(rf.mp_rank, tp)
                rf.coords = Coords(dp=rf.rank or 0, pp=s, tp=t)
                if s >= self.pp or (rf.rank or 0) >= self.dp:
                    if rf.kind == "optim" or rf.rank is not None:
                        self.slice_beyond(rf)
                elif rf.kind == "model" and rf.rank is None:
                    self.slice_files[(s, t)] = rf
                elif rf.kind == "optim" and ctx.torch_file(rf) is not None:
                    self.slice_optim[(s, t)][rf.rank] = rf
        self.layers = {layer: rf for (layer, _), rf in sorted(self.layer_files.items(), reverse=True)}
        for (s, _), rf in sorted(self.slice_files.items(), reverse=True):
            if ctx.torch_file(rf) is not None or s not in self.stage_files:
                self.stage_files[s] = rf  # names: the lowest readable tp rank's
        self.optim = defaultdict(dict)
        for (s, _), files in sorted(self.slice_optim.items(), reverse=True):
            self.optim[s] = files
        self._missing_slices()
        self.stages = sorted(s for s in {*self.stage_files, *self.optim} if s < self.pp)
        self.c.topology = Topology(dp=self.dp, tp=tp, pp=self.pp, files=self.c.files)

    def _missing_slices(self) -> None:
        tp = self.tp
        missing_files(self.ctx.find, [("pp", self.pp), ("tp", tp)], set(self.slice_files),
                      "missing-tp-rank", "model-states files",
                      lambda s, t: f"mp_rank_{s * tp + t:02d}_model_states.pt",
                      "the shapes of its shards are unknown", REPLACE)

    def _missing_layers(self, trainable: set[str]) -> None:
        """Every tp rank has the file of each layer tp rank 0 (or the optimizer) names."""
        super()._missing_layers(trainable)
        ranks: dict[int, set[tuple[int]]] = defaultdict(set)
        for layer, t in self.layer_files:
            ranks[layer].add((t,))
        for layer, present in sorted(ranks.items()):
            missing_files(self.ctx.find, [("tp", self.tp)], present, "missing-layer-file",
                          f"tp ranks' files of layer {layer}",
                          lambda t, layer=layer: f"layer_{layer:02d}-model_{t:02d}-model_states.pt",
                          f"its shards of layer {layer} (16-bit weights, frozen params, buffers) "
                          "are gone", "copy it from the run")

    def slice_files_in_grid(self) -> list[RankFile]:
        return [rf for _, rf in sorted(self.slice_files.items())]

    def optim_files(self) -> list[RankFile]:
        return [rf for files in self.slice_optim.values() for rf in files.values()]

    # ------------------------------------------------------------------ geometry
    def state_of(self, s: int, t: int) -> dict:
        tf = self.ctx.torch_file(self.slice_files.get((s, t)))
        return tf.obj if tf is not None and isinstance(tf.obj, dict) else {}

    def _stage_geometry(self, s: int, flat: list) -> None:
        """Each tp rank's slice of stage s over its dp ranks, its fragments indexing its shard."""
        with self.copies_of(s, flat):
            for t in range(self.tp):
                files = self.slice_optim.get((s, t), {})
                self.attach_slice(files, self.slice_groups(self.state_of(s, t), files),
                                  Coords(pp=s, tp=t), shard=t)

    def layer_fragment(self, name: str, source: str) -> None:
        """A frozen param's value: each tp rank's shard, whole in its layer file."""
        layer, key = self.names[name]
        p = self.c.params[name]
        for t in range(self.tp):
            rf = self.layer_files.get((layer, t))
            tensor = dict(pipeline._entries(self.ctx, rf)).get(key)  # noqa: SLF001
            if isinstance(tensor, TensorRef):
                at = located(self.ctx.torch_file(rf), rf.name, 0, tensor)
                p.fragments.append(at.fragment(None, 0, 0, tensor.numel, source=source, shard=t))

    def place(self) -> None:
        """Each param's full shape and tp shards from its tp ranks' shard shapes (the stages'
        param_shapes, the layer files) and the split rules; a param that cannot be placed keeps
        no fragments (the merge leaves it out; the reason is a finding)."""
        ctx, c = self.ctx, self.c
        named = {at: n for n, at in self.names.items()}
        shards: dict[str, dict[int, tuple]] = defaultdict(dict)
        for (layer, t), rf in self.layer_files.items():
            for key, tensor in pipeline._entries(ctx, rf):  # noqa: SLF001
                name = named.get((layer, key))
                if name is not None and isinstance(tensor, TensorRef):
                    shards[name][t] = tensor.shape
        for s, t in self.slice_files:
            for g in self.slice_groups(self.state_of(s, t), {}):
                for name, shp in g:
                    if shp is not None:
                        shards[name].setdefault(t, shp)
        info = self._split_info()
        unread = {t for t in range(self.tp)
                  if any((s, t) not in self.slice_files or not self.state_of(s, t)
                         for s in range(self.pp))}
        for p in c.owners():
            if info is None or not tensor_parallel.place(ctx, p, info, shards.get(p.name, {}),
                                                         self.tp, unread):
                p.fragments, p.copies = [], {}

    def describe_zero0(self) -> None:
        """ZeRO-0 without optimizer files (fp32): no file names the params, so the vocabulary
        and split patterns cannot be matched to them (the tied embedding would be joined with
        its padding rows): refused by name (its params are shown, nothing is merged). ZeRO-0
        bf16 saves BF16_Optimizer files and is read as ZeRO-1."""
        self.ctx.find("unsupported-layout", f"a ZeRO-0 pipeline with tensor parallelism and no "
                      f"optimizer files (pp {self.pp} × tp {self.tp}): no file names its params, "
                      "so how their tp shards join cannot be matched to them",
                      "load it with DeepSpeed at its own topology and save a ZeRO-1 checkpoint "
                      "(DeepSpeed's ds_to_universal.py needs the optimizer files too)")
        for p in self.c.params.values():
            p.fragments, p.copies = [], {}

    def _split_info(self) -> dict | None:
        """The first slice's universal_checkpoint_info; a slice whose differs is located."""
        infos = [(rf, get(self.state_of(s, t), "universal_checkpoint_info"))
                 for (s, t), rf in sorted(self.slice_files.items()) if self.state_of(s, t)]
        ref = next((i for _, i in infos if isinstance(i, dict)), None)
        for rf, info in infos:
            if info != ref:
                self.ctx.find("tp-info-mismatch", f"{rf.name}'s universal_checkpoint_info differs "
                              "from the first stage's: the slices describe their splits "
                              "differently", "the files come from different runs or versions; "
                              "the first slice's is used", file=rf.name)
        if ref is None and infos:
            self.ctx.find("tp-split-unknown", "the model states carry no universal_checkpoint_"
                          "info: how the tp shards join cannot be known", "zinspect does not "
                          "guess splits; Megatron-DeepSpeed writes it as client state. Nothing "
                          "can be merged", file=infos[0][0].name)
        return ref


def describe(ctx: LoadContext) -> None:
    pipe = _PipelineTP(ctx)
    if not tensor_parallel.beyond_any_run(ctx, pp=pipe.pp, tp=pipe.tp, dp=pipe.dp):
        pipe.describe()


LAYOUT = Layout("pipeline_tp", recognise, describe)
