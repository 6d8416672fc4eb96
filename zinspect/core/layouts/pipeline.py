"""Pipeline-parallel checkpoints (DeepSpeed's PipelineModule: pp stages × dp, ZeRO 0 or 1).

Files (parallel-layouts.md §2):
  * `layer_XX[-model_TT]-model_states.pt`: the state_dict of global layer XX (16-bit weights,
    buffers), written once (dp rank 0). Parameterless layers get none, so indices have gaps; a
    tied layer (TiedLayerSpec) has one file, at the stage that builds it first.
  * `mp_rank_SS_model_states.pt`, one per stage: `module` is None; `param_shapes` (ZeRO-1)
    names the stage's flat groups with PipelineModule's names — the layer's keys under its
    global index (`3.up.weight`) or under its tie key (`tied_modules.embed.weight`).
  * `[bf16_]zero_pp_rank_D_mp_rank_SS_optim_states.pt` per (dp rank, stage): the ZeRO-1 (or
    BF16_Optimizer) partitions of that stage's params. A tied param's fp32 master is in every
    stage that uses it; the lowest stage's copy is the param's, the others are kept in
    `Param.copies` for the merge to compare.
  * ZeRO-0 fp32: no optimizer files; the layer files' fp32 weights are the masters and no file
    names the params (`param_shapes` is None), so they are named `L.key`.
DeepSpeed refuses ZeRO-2/3 with pipelines, so there is nothing else to read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import replace

from zinspect.core.layouts import common, headers, one_save, pickled, pipeline_zero0, zero12
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.gaps import SALVAGE, missing_files, outside, stale
from zinspect.core.layouts.pickled import as_group_list, get, group_members, located, text
from zinspect.core.model import Buffer, Coords, Param, RankFile, Topology
from zinspect.core.torchzip import TensorRef

TIED = "tied_modules."


def recognise(ctx: LoadContext) -> bool:
    """pp > 1 recorded, or layer files beside model states without a module (PipelineEngine
    saves the module in the layer files; a stray layer file in a plain ZeRO checkpoint is not
    a pipeline)."""
    dims = get(ctx.model_state, "checkpoint_parallel_dimensions", "pp_degree")
    return (type(dims) is int and dims > 1) or \
        ("layer" in ctx.kinds and ctx.model_state is not None and
         ctx.model_state.get("module") is None)


class _Pipeline:
    """The describe step: files by coordinate, names, geometry per stage, validation."""

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx, self.c = ctx, ctx.ckpt
        ms = ctx.model_state or {}
        dims = get(ms, "checkpoint_parallel_dimensions")
        dims = dims if isinstance(dims, dict) else {}
        self.stage_files = {f.mp_rank: f for f in self.c.files_of("model") if f.rank is None}
        self.pp = pickled.size(dims.get("pp_degree")) or max(len(self.stage_files), 1)
        self.tp = pickled.size(dims.get("tp_degree")) or 1
        self.dp, self.dp_from = self.dp_size()
        self.layers: dict[int, RankFile] = {}
        self.optim: dict[int, dict[int, RankFile]] = defaultdict(dict)  # stage -> dp -> file
        self.names: dict[str, tuple[int, str]] = {}  # param name -> (layer, key)

    def dp_size(self) -> tuple[int, str]:
        """The data-parallel size and where it is read from: the `dp_world_size` most stage
        files record; on a tie, or when none records one, the optimizer files' partition count
        (a value that is no size, 0 or True, is never taken: `_one_save` names it); else 1."""
        said = Counter(pickled.size(state.get("dp_world_size")) for _, state in self.model_states())
        said.pop(None, None)
        tied = [dp for dp, n in said.items() if n == max(said.values())]  # lowest mp rank first
        pc, other = pickled.size(self.c.world_size), "as the other model-states files record"
        if pc is not None and (pc in tied or not tied):
            return pc, other if tied else "as the optimizer files are partitioned"
        return (tied[0], other) if tied else (1, "as no file records a size")

    def model_states(self, files: list[RankFile] | None = None) -> list[tuple[RankFile, dict]]:
        """(file, state) of each readable stage file (by mp rank), or of each of `files`."""
        tfs = [(rf, self.ctx.torch_file(rf)) for rf in (
            [rf for _, rf in sorted(self.stage_files.items())] if files is None else files)]
        return [(rf, tf.obj) for rf, tf in tfs if tf is not None and isinstance(tf.obj, dict)]

    # ------------------------------------------------------------------ files
    def sort_files(self) -> None:
        """Coordinates from the names; files of another topology located."""
        ctx = self.ctx
        for rf in self.c.files:
            if rf.kind == "layer":
                rf.coords = Coords(tp=rf.mp_rank or 0, layer=rf.coords.layer)
                if not self.layer_beyond(rf) and not rf.mp_rank:  # tp > 1: refused whole
                    self.layers[rf.coords.layer] = rf  # (describe); tp rank 0 named
            elif rf.kind == "model" and rf.rank is None:  # beyond pp: topology.cross_check
                rf.coords = Coords(pp=rf.mp_rank)
            elif rf.kind == "optim":
                rf.coords = Coords(dp=rf.rank, pp=rf.mp_rank)
                if not self.slice_beyond(rf) and ctx.torch_file(rf) is not None:
                    self.optim[rf.mp_rank][rf.rank] = rf
        missing_files(ctx.find, [("pp", self.pp)], {(s,) for s in self.stage_files},
                      "missing-stage-file", "stage files", lambda s: f"mp_rank_{s:02d}_model_states.pt",
                      "its param names and buffers are unknown",
                      "copy it from the run (every stage writes one)")
        #: the stages with files (the others add nothing but their missing-file findings)
        self.stages = sorted(s for s in {*self.stage_files, *self.optim} if s < self.pp)
        self.c.topology = Topology(dp=self.dp, tp=self.tp, pp=self.pp, files=self.c.files)

    def layer_beyond(self, rf: RankFile) -> bool:
        """A layer file of a tp rank beyond this pipeline's tp size is stale (located)."""
        t = rf.mp_rank or 0
        if t >= self.tp:
            stale(self.ctx.find, rf, outside([("tp", self.tp)], (t,)))
        return t >= self.tp

    def slice_beyond(self, rf: RankFile) -> bool:
        """An optimizer file (or a ZeRO-3 model-states file) outside the stages × tp ranks × dp
        ranks of this checkpoint is stale (located); mp rank SS = stage × tp + tp rank."""
        s, t = divmod(rf.mp_rank, self.tp)
        d = rf.rank or 0
        if s < self.pp and d < self.dp:
            return False
        stale(self.ctx.find, rf, outside([("pp", self.pp), ("tp", self.tp), ("dp", self.dp)], (s, t, d)))
        return True

    def stage_state(self, s: int) -> dict:
        tf = self.ctx.torch_file(self.stage_files.get(s))
        return tf.obj if tf is not None and isinstance(tf.obj, dict) else {}

    # ------------------------------------------------------------------ names
    def flat_groups(self, s: int) -> list[list[tuple[str, tuple | None]]]:
        return self.slice_groups(self.stage_state(s), self.optim.get(s, {}))

    def slice_groups(self, state: dict, files: dict[int, RankFile]
                     ) -> list[list[tuple[str, tuple | None]]]:
        """A slice's flat groups (a stage's; with TP a (stage, tp rank)'s): `param_shapes`,
        else the optimizer's `param_slice_mappings` (a ZeRO-0 BF16_Optimizer saves no
        param_shapes), else none (ZeRO-0 fp32)."""
        shapes = as_group_list(state.get("param_shapes"))
        if shapes:
            return [group_members(g) for g in shapes]
        placed: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
        for d, rf in sorted(files.items()):
            maps = get(self.ctx.torch_file(rf).obj, "optimizer_state_dict", "param_slice_mappings")
            parts = get(self.ctx.torch_file(rf).obj, "optimizer_state_dict",
                        "single_partition_of_fp32_groups")
            for gi, m in enumerate(maps if isinstance(maps, list) else []):
                size = parts[gi].numel if isinstance(parts, list) and gi < len(parts) and \
                    isinstance(parts[gi], TensorRef) else 0
                for name, addr in (m.items() if isinstance(m, dict) else ()):
                    start = getattr(addr, "get", lambda k: None)("start")
                    if type(start) is int:
                        placed[gi].setdefault(str(name), (d * size + start, d))
        return [[(n, None) for n, _ in sorted(placed[gi].items(), key=lambda kv: kv[1])]
                for gi in sorted(placed)]

    def name_layers(self, known: dict[str, tuple | None]) -> None:
        """Each layer file key's param name: `L.key`, or `tied_modules.K.key` when the stages
        name the layer's params under a tie key instead (known: name -> shape). A tie key
        belongs to one layer file — the first whose tensors have its params' shapes — so a
        later layer with a key of the same name (a final norm's `weight`) is never taken for
        it."""
        ctx = self.ctx
        tied = [n for n in known if n.startswith(TIED)]
        claimed: set[str] = set()
        for layer, rf in sorted(self.layers.items()):
            tensors = {k: t for k, t in _entries(ctx, rf) if isinstance(t, TensorRef)}
            prefix = f"{layer}."
            if tied and not any(f"{layer}.{k}" in known for k in tensors):
                fits = {n[:-len(k)] for k, t in tensors.items() for n in tied
                        if n.endswith("." + k) and known[n] in (None, t.shape)} - claimed
                if len(fits) == 1:
                    prefix = fits.pop()
                    claimed.add(prefix)
            for k in tensors:
                self.names.setdefault(prefix + k, (layer, k))

    # ------------------------------------------------------------------ describe
    def describe(self) -> None:
        ctx, c = self.ctx, self.c
        self.sort_files()
        groups = {s: self.flat_groups(s) for s in self.stages}
        buffer_names = [b for s in self.stages for b in _list(self.stage_state(s), "buffer_names")
                        if isinstance(b, str)]
        trainable = {n for gs in groups.values() for g in gs for n, _ in g}
        self.name_layers({**{n: s for gs in groups.values() for g in gs for n, s in g},
                          **dict.fromkeys(buffer_names)})
        ms = ctx.model_state or {}
        c.ds_version = c.ds_version or text(ms.get("ds_version"))
        c.ds_config = c.ds_config if c.ds_config is not None else ms.get("ds_config")
        zero = get(c.ds_config, "zero_optimization", "stage")
        c.stage = zero if type(zero) is int else (1 if self.optim else 0)
        c.world_size = self.dp * self.pp * self.tp
        self._params(groups, trainable, set(buffer_names))
        self._layer_stages(groups)
        for s in self.stages:
            self._stage_geometry(s, groups[s])
        self.place()
        if self.optim:
            self._missing_optim()
        self._one_save()
        self._buffers(buffer_names)
        self._missing_layers(trainable)
        if not self.optim:
            self.describe_zero0()
        common.finish(ctx, common.Names({}, [], [], {}))
        if not c.master_dtype and any(f.source == "master" for p in c.params.values()
                                      for f in p.fragments):
            c.master_dtype = "float32"  # ZeRO-0 fp32: the layer weights, no flat groups

    def _params(self, groups: dict, trainable: set[str], buffers: set[str]) -> None:
        """Every param once, in layer order: the layer files' (frozen when no stage's flat
        groups hold it), then any the flat groups name that no layer file holds. With a stage
        file missing, a layer no present stage names may be that stage's: its params are
        neither frozen nor located (a merge leaves them out), never guessed frozen."""
        c, ctx = self.c, self.ctx
        sure = len(self.stages) == self.pp and all(self.stage_state(s) for s in self.stages)
        named = {self.names[n][0] for n in buffers if n in self.names} | {
            self.names[n][0] for s in self.stages if self.stage_state(s)
            for g in groups[s] for n, _ in g if n in self.names}
        for name, (layer, key) in self.names.items():
            if name in buffers:
                continue
            t = dict(_entries(ctx, self.layers[layer])).get(key)
            c.params[name] = Param(name, t.shape, t.dtype, frozen=bool(self.optim or trainable)
                                   and name not in trainable and (sure or layer in named))
        for s in self.stages:
            for g in groups[s]:
                for name, shp in g:
                    p = c.params.get(name)
                    if p is None:
                        c.params[name] = Param(name, shp or (), "")
                    elif shp is not None and p.shape != shp:
                        where = self.names.get(name)
                        ctx.find("shape-mismatch", f"{name}: stage {s}'s param_shapes says "
                                 f"{shp}, {'its layer file' if where else 'another stage'} "
                                 f"holds {p.shape}", common.REPLACE_MODEL_STATES, param=name,
                                 file=self.layers[where[0]].name if where else
                                 f"mp_rank_{s:02d}_model_states.pt")
        for name, p in c.params.items():  # ZeRO-1 frozen params: the 16-bit layer weights
            if p.frozen:
                self.layer_fragment(name, "module")

    def describe_zero0(self) -> None:
        """No optimizer files: the masters are in the stages' model states (pipeline_zero0)."""
        pipeline_zero0.describe(self)

    def place(self) -> None:
        """After the geometry: the params' full shapes where a slice holds only part of one
        (pipeline_tp places the tp shards); a plain pipeline's params are whole."""

    def _layer_stages(self, groups: dict) -> None:
        """Each layer file's pp coordinate: the stage that owns the layer — the lowest whose
        flat groups or buffers name it (a tied layer's file is written by the first stage
        that builds it); a layer no stage names (frozen params only) is in the stage of the
        layer before it, as PipelineModule partitions contiguously."""
        owner: dict[int, int] = {}
        for s in sorted(groups):
            names = [n for g in groups[s] for n, _ in g] + \
                [b for b in _list(self.stage_state(s), "buffer_names") if isinstance(b, str)]
            for n in names:
                if n in self.names:
                    owner.setdefault(self.names[n][0], s)
        stage = 0
        for rf in sorted(self.c.files_of("layer"), key=lambda f: (f.coords.layer or 0, f.name)):
            stage = owner.get(rf.coords.layer, stage)
            rf.coords = replace(rf.coords, pp=stage)

    def layer_fragment(self, name: str, source: str) -> None:
        layer, key = self.names[name]
        rf = self.layers[layer]
        tf = self.ctx.torch_file(rf)
        t = dict(_entries(self.ctx, rf)).get(key)
        p = self.c.params[name]
        at = located(tf, rf.name, 0, t)
        p.fragments.append(at.fragment(None, 0, 0, min(t.numel, p.numel), source=source))

    def _stage_geometry(self, s: int, flat: list) -> None:
        """Stage s's ZeRO-1 / BF16_Optimizer partitions over its dp ranks. Params already
        placed by a lower stage (tied) get this stage's fragments as a copy."""
        with self.copies_of(s, flat):
            self.attach_slice(self.optim.get(s), flat, Coords(pp=s))

    @contextmanager
    def copies_of(self, s: int, flat: list):
        """Around attaching stage s: the params a lower stage placed (tied) keep their
        fragments; what stage s attaches to them becomes `Param.copies[s]`."""
        c = self.c
        placed = {n: c.params[n] for g in flat for n, _ in g if c.params[n].fragments}
        saved = {n: (p.fragments, p.group, p.sub_group) for n, p in placed.items()}
        for p in placed.values():
            p.fragments = []
        yield
        for n, p in placed.items():
            p.copies[s] = list(p.fragments)
            p.fragments, p.group, p.sub_group = saved[n]

    def attach_slice(self, files: dict[int, RankFile] | None, flat: list, coords: Coords,
                     shard: int | None = None) -> None:
        """One slice's (a stage's, or a (stage, tp rank)'s) partitions over its dp ranks."""
        if not files or not flat:
            return
        c = self.c
        flat = [[(n, shp or c.params[n].shape) for n, shp in g] for g in flat]
        first = next(iter(files.values()))
        bf16 = "zero_stage" not in (get(self.ctx.torch_file(first).obj, "optimizer_state_dict")
                                    or {})
        pc = get(self.ctx.torch_file(first).obj, "optimizer_state_dict", "partition_count")
        counts = [x if type(x) is int else 0 for x in pc] if isinstance(pc, list) else self.dp
        zero12.attach(self.ctx, files, flat, counts, keep_padding=bf16, shard=shard,
                      coords=coords)
        common.attach_moments(self.ctx, files)

    def slice_files_in_grid(self) -> list[RankFile]:
        """The model-states file of each stage (pipeline_tp: of each (stage, tp rank))."""
        return [rf for s, rf in sorted(self.stage_files.items()) if s < self.pp]

    def _one_save(self) -> None:
        """Every stage's files come from one save: the stage files' dp world size and global
        step, and the optimizer files' Adam step, agree; an outlier is located (a dp_world_size
        that is no size, 0 or True, as the forged field it is)."""
        ctx = self.ctx
        stages = self.model_states(self.slice_files_in_grid())
        one_save.dp_world_sizes(ctx.find, stages, self.dp, self.dp_from)
        one_save.outliers(ctx.find, [(rf, state.get("global_steps")) for rf, state in stages],
                          "at global step {}")
        optim = self.optim_files()
        for rf in optim:
            if rf.step is None:
                headers.read_optim_header(ctx, rf)  # only mp_rank 0's are read before
        one_save.outliers(ctx.find, [(rf, rf.step) for rf in optim], "at optimizer step {}")

    def optim_files(self) -> list[RankFile]:
        """Every optimizer file of the checkpoint's slices."""
        return [rf for per in self.optim.values() for rf in per.values()]

    def _missing_optim(self) -> None:
        """Every (stage, tp rank, dp rank) has its optimizer file (mp rank SS = stage × tp +
        tp rank)."""
        tp = self.tp
        optim = [rf for rf in self.c.files_of("optim") if rf.mp_rank is not None and rf.rank is not None]
        prefix = optim[0].prefix if optim else ""
        missing_files(self.ctx.find, [("pp", self.pp), ("tp", tp), ("dp", self.dp)],
                      {(*divmod(rf.mp_rank, tp), rf.rank) for rf in optim}, "missing-optimizer-file",
                      "optimizer files",
                      lambda s, t, d: f"{prefix}zero_pp_rank_{d}_mp_rank_{s * tp + t:02d}_optim_states.pt",
                      "its fp32 partition is lost", SALVAGE)

    def _buffers(self, buffer_names: list[str]) -> None:
        for name in buffer_names:
            where = self.names.get(name)
            rf = self.layers.get(where[0]) if where else None
            t = dict(_entries(self.ctx, rf)).get(where[1]) if rf else None
            if not isinstance(t, TensorRef):
                self.c.buffers[name] = Buffer(name, (), "", intact=False)
                continue
            at = located(self.ctx.torch_file(rf), rf.name, 0, t)
            self.c.buffers[name] = Buffer(name, t.shape, t.dtype, rf.name, at.base,
                                          at.whole >= t.numel)

    def _missing_layers(self, trainable: set[str]) -> None:
        """A layer whose params a stage's optimizer holds must have its file (its frozen
        params and buffers are only there); index gaps elsewhere are parameterless layers."""
        missing: dict[int, list[str]] = defaultdict(list)
        for name in trainable:
            head = name.split(".", 1)[0]
            if name not in self.names and head.isdigit():
                missing[int(head)].append(name)
        for layer, names in sorted(missing.items()):
            file = f"layer_{layer:02d}-model_states.pt" if not any(
                f.mp_rank for f in self.layers.values()) else \
                f"layer_{layer:02d}-model_00-model_states.pt"
            self.ctx.find("missing-layer-file", f"{file} is missing: the optimizer holds "
                          f"{len(names)} param(s) of layer {layer} ({', '.join(sorted(names)[:3])}"
                          f"{', ...' if len(names) > 3 else ''}), whose frozen params and "
                          "buffers were only in that file", "copy it from the run", file=file)


def _entries(ctx: LoadContext, rf: RankFile | None) -> list[tuple[str, object]]:
    tf = ctx.torch_file(rf)
    obj = tf.obj if tf is not None else None
    return [(str(k), v) for k, v in obj.items()] if isinstance(obj, dict) else []


def _list(state: dict, key: str) -> list:
    value = state.get(key)
    return value if isinstance(value, list) else []


def describe(ctx: LoadContext) -> None:
    _Pipeline(ctx).describe()


LAYOUT = Layout("pipeline", recognise, describe)
