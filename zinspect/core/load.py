"""Build the `Checkpoint` model from a tag dir, reading only pickles and zip directories.

The layouts (see the project README, "How it works"):

* ZeRO-1/2: per optimizer param group i, the params of `param_shapes[i]` are flattened in order,
  padded at the end to a multiple of 2*ws and cut into ws equal partitions of P elements. Rank r
  saves its partition as `single_partition_of_fp32_groups[i]` with the padding stripped
  (`group_paddings[i]` says how much); BF16_Optimizer keeps the padding. So flat element e lives
  on rank e // P at index e % P.
* ZeRO-3: each param of sub-group k is cut into ceil(n/ws) elements per rank (the last ranks
  padded), and rank r's pieces are concatenated, padding included, in `fp32_flat_groups[k]`.
* Frozen params: full 16-bit tensors in the model file at stage 2, per-rank 16-bit partitions at
  stage 3, and only the 16-bit module weights at stage 1 (DeepSpeed saves no fragments there).
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from zinspect.core.discover import NamedFile, classify, file_kind, locate
from zinspect.core.model import (
    ERROR,
    INFO,
    WARNING,
    Buffer,
    Checkpoint,
    Finding,
    Fragment,
    Fragments,
    Param,
    ParamGroup,
    RankFile,
    Storage,
)
from zinspect.core.torchzip import (
    MAX_NUMEL,
    PickleMemo,
    TensorRef,
    TorchFile,
    pickle_is_intact,
    read_torch_file,
    zip_is_complete,
)
from zinspect.errors import UnreadableFile

#: layouts that are recognised but cannot be merged (yet): name -> explanation
UNSUPPORTED = {
    "tensor_parallel": "tensor-parallel checkpoint (several mp_rank_XX sets)",
    "pipeline": "pipeline-parallel checkpoint (layer_* files)",
    "moe": "mixture-of-experts checkpoint (expert files)",
    "zero0": "ZeRO-0 checkpoint (no ZeRO optimizer partitions)",
    "universal": "universal checkpoint folder (ds_to_universal.py output)",
    "nvme_offload": "ZeRO-3 NVMe-offload checkpoint (masters in offloaded_tensors/)",
}


def load_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> Checkpoint:
    """Read a checkpoint's metadata into the model. Findings from reading are attached;
    `zinspect.core.validate.validate` adds the consistency checks.

    `progress(files_done, files_total, file_name)` is called (from reader threads) as each
    rank file is read."""
    loc = locate(path, tag)
    ckpt = Checkpoint(path=loc.tag_dir, tag=loc.tag, root=loc.root, tags=loc.tags)
    try:
        entries = sorted(loc.tag_dir.iterdir())
    except OSError as e:
        raise UnreadableFile(f"{loc.tag_dir}: cannot list ({e.strerror})",
                             "check the directory's permissions") from e
    named = [classify(p) for p in entries]
    # only regular files are opened: a FIFO would block forever, a device never ends
    special = {n.path: file_kind(n.path) for n in named if n.kind != "other"}
    wanted = [n for n in named if n.kind != "other" and special[n.path] is None]
    # ZeRO-3 model states of ranks > 0 hold only their frozen-param fragments (and copies of
    # what rank 0 says): at 512 ranks unpickling them all is most of the time to open. They are
    # checked whole here and unpickled when a frozen param's fragments are first needed.
    later = [n for n in wanted if n.kind == "model" and n.rank not in (None, 0)]
    tick = _Ticker(len(wanted), progress)
    parsed = _parse_files([n for n in wanted if n.kind != "model" or n.rank in (None, 0)], tick)
    rank0 = next((tf for rf, tf in parsed.values() if rf.kind == "model" and rf.rank == 0), None)
    if rank0 is None:  # the names come from the next model states: read them all
        parsed.update(_parse_files(later, tick))
    else:  # with frozen params their pickles will be read: check those now
        frozen = isinstance(rank0.obj, dict) and rank0.obj.get("frozen_param_shapes")
        parsed.update(_check_files(later, tick, pickle_is_intact if frozen else zip_is_complete))
    torch_files: dict[int, TorchFile] = {}
    for n in named:
        rf, tf = parsed.get(n.path, (None, None))
        if rf is None:
            rf = RankFile(n.path, n.kind, n.rank, n.mp_rank, n.prefix, size=_size(n.path))
            if special.get(n.path):
                rf.error = f"it is {special[n.path]}, not a regular file (it was not opened)"
                rf.error_hint = "put the real file back under this name (restore it from a copy)"
        elif n.kind != "other" and n.path.is_symlink():
            ckpt.findings.append(Finding(
                INFO, "symlinked-file", f"{n.path.name} is a symbolic link to "
                f"{os.path.realpath(n.path)}; it was followed", file=n.path.name, rank=n.rank))
        ckpt.files.append(rf)
        if tf is not None:
            torch_files[id(rf)] = tf
    _Builder(ckpt, torch_files).build()
    if tag is None and loc.root is not None and \
            Path(path).expanduser().resolve() != loc.tag_dir.resolve() and \
            not (loc.root / "latest").is_file():
        ckpt.findings.append(Finding(
            INFO, "no-latest", f"{loc.root} has no `latest` file; its only tag dir, "
            f"{loc.tag}, was used", "DeepSpeed writes `latest` last: if the save or the copy "
            "was cut short, check that this tag is complete (zinspect validate --deep)"))
    return ckpt


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Ticker:
    """Counts files done for a progress callback that reader threads share."""

    def __init__(self, total: int, progress: Callable[[int, int, str], None] | None) -> None:
        self.total, self.progress, self.done = total, progress, 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        if self.progress is not None:
            with self._lock:
                self.done += 1
                self.progress(self.done, self.total, name)


def _parse_files(named: list[NamedFile],
                 tick: _Ticker) -> dict[Path, tuple[RankFile, TorchFile | None]]:
    """Parse every rank file's metadata; threads overlap the cold reads of many small pickles."""
    memo = PickleMemo()

    def one(n: NamedFile) -> tuple[RankFile, TorchFile | None]:
        try:
            return _parse_one(n)
        finally:
            tick(n.path.name)

    def _parse_one(n: NamedFile) -> tuple[RankFile, TorchFile | None]:
        rf = RankFile(n.path, n.kind, n.rank, n.mp_rank, n.prefix, size=_size(n.path))
        try:
            tf = read_torch_file(n.path, memo)
        except UnreadableFile as e:
            rf.error = e.message.removeprefix(f"{n.path}: ")
            rf.error_hint = e.hint or None
            rf.unknown_globals = sorted(e.unknown_globals)
            return rf, None
        rf.format, rf.recovered = tf.format, tf.recovered
        rf.unknown_globals = sorted(tf.unknown_globals)
        for key, st in tf.storages.items():
            rec = tf.records.get(key)
            # a record cut by the end of the file is truncated even where its tensor's bytes
            # are all there: count the record's own size
            nbytes = st.nbytes if rec is None or rec.present >= rec.size else \
                max(st.nbytes, rec.size)
            rf.storages.append(Storage(key, st.dtype, st.numel, nbytes,
                                       0 if rec is None else min(rec.present, nbytes),
                                       None if rec is None else rec.data_offset))
        return rf, tf

    return {rf.path: (rf, tf) for rf, tf in _each(one, named)}


def _each(fn, items: list) -> list:
    """fn over items, in threads when there are several: the reads are small and many, and on
    a cold cache (or a network file system) their latencies overlap; crc32 releases the GIL."""
    if len(items) <= 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


def _check_files(named: list[NamedFile], tick: _Ticker,
                 whole: Callable[[Path], bool]) -> dict[Path, tuple[RankFile, TorchFile | None]]:
    """Files whose pickle is not needed yet: check that they are `whole`, and parse only
    those that are not, so the findings can say what is wrong."""
    def check(n: NamedFile) -> bool:
        ok = whole(n.path)
        if ok:
            tick(n.path.name)
        return ok

    out, broken = {}, []
    for n, ok in zip(named, _each(check, named), strict=True):
        if ok:
            out[n.path] = (RankFile(n.path, n.kind, n.rank, n.mp_rank, n.prefix,
                                    size=_size(n.path), format="zip", shallow=True), None)
        else:
            broken.append(n)
    out.update(_parse_files(broken, tick))
    return out


def _get(obj, *keys, default=None):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return obj


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # shapes come through _shape: tuples of ints


def _shape(value) -> tuple[int, ...] | None:
    """A shape from the pickle, or None unless it has at most 64 non-negative int dims and
    at most MAX_NUMEL elements (a dim of 10**18 balanced by a negative one sums to little)."""
    if isinstance(value, (tuple, list)) and len(value) <= 64 and \
            all(type(s) is int and 0 <= s <= MAX_NUMEL for s in value) and \
            math.prod(value) <= MAX_NUMEL:
        return tuple(value)
    return None


def _as_group_list(shapes) -> list[dict]:
    """`param_shapes`: a list of per-group OrderedDicts (a single dict before DeepSpeed 0.5.4)."""
    if isinstance(shapes, dict):
        return [shapes]
    if isinstance(shapes, list):
        return [g for g in shapes if isinstance(g, dict)]
    return []


class _Builder:
    def __init__(self, ckpt: Checkpoint, tfs: dict[int, TorchFile]) -> None:
        self.c = ckpt
        self.tfs = tfs  # id(RankFile) -> its parsed TorchFile
        self.model_file: RankFile | None = None
        self.model_state: dict | None = None
        self.ref_osd: dict | None = None

    def find(self, severity, code, message, hint="", **where) -> None:
        self.c.findings.append(Finding(severity, code, message, hint, **where))

    def tf(self, rf: RankFile) -> TorchFile | None:
        return self.tfs.get(id(rf))

    # ------------------------------------------------------------------ top level
    def build(self) -> None:
        c = self.c
        for rf in c.files:
            if rf.error:
                self.find(ERROR, "unreadable-file", f"{rf.name} cannot be read: {rf.error}",
                          rf.error_hint or "restore this file from a copy, or re-save the "
                          "checkpoint",
                          file=rf.name, rank=rf.rank)
        optim = [f for f in c.files_of("optim") if f.mp_rank in (0, None)]
        self.optim_by_rank = self._by_rank(optim)
        for rf in optim:
            self._read_optim_header(rf)
        self.model_files = [f for f in c.files_of("model") if f.mp_rank in (0, None)]
        for rf in self.model_files:
            obj = self.tf(rf).obj if self.tf(rf) else None
            if isinstance(obj, dict):
                rf.ds_version = _str(obj.get("ds_version"))
                dp = obj.get("dp_world_size")
                rf.dp_world_size = dp if isinstance(dp, int) else None
        self.model_state = self._pick_model_state()
        self._detect_layout(optim)
        if self.model_state is None:
            if c.files and not c.files_of("model"):
                self.find(ERROR, "no-model-states", "no *_model_states.pt file in the tag dir",
                          "the parameter names and shapes live there; copy it from the run")
            return
        ms = self.model_state
        c.ds_version = c.ds_version or _str(ms.get("ds_version"))
        c.ds_config = ms.get("ds_config") if c.ds_config is None else c.ds_config
        if c.world_size is None and isinstance(ms.get("dp_world_size"), int):
            c.world_size = ms["dp_world_size"]
        self._build_params()
        if c.layout in ("zero", "bf16_optimizer"):
            if c.stage == 3:
                self._build_zero3()
            else:
                self._build_zero12()
        self._build_frozen()
        self._build_buffers()
        self._settle_dtypes()
        for p in c.params.values():  # a tied alias lives where its owner lives
            owner = c.params.get(p.tied_to) if p.tied_to else None
            if owner is not None:
                p.group, p.sub_group = owner.group, owner.sub_group

    def _by_rank(self, files: list[RankFile]) -> dict[int, RankFile]:
        out: dict[int, RankFile] = {}
        for rf in sorted(files, key=lambda f: (f.rank, f.name)):
            if rf.rank in out:
                self.find(ERROR, "duplicate-rank",
                          f"rank {rf.rank} has two optimizer files: {out[rf.rank].name} and {rf.name}",
                          "a stale file from another run is mixed in (bf16_/fp16_ prefix); "
                          "remove the one that does not belong to this run",
                          file=rf.name, rank=rf.rank)
                continue
            out[rf.rank] = rf
        return out

    def _read_optim_header(self, rf: RankFile) -> None:
        tf = self.tf(rf)
        if tf is None:
            return
        osd = _get(tf.obj, "optimizer_state_dict")
        if not isinstance(osd, dict):
            rf.error = "no optimizer_state_dict in it: not a DeepSpeed optimizer file"
            self.find(ERROR, "not-optimizer-file", f"{rf.name} has no optimizer_state_dict",
                      "this is not a DeepSpeed ZeRO optimizer file; move it out of the tag dir",
                      file=rf.name, rank=rf.rank)
            self.tfs.pop(id(rf), None)
            return
        stage = osd.get("zero_stage")
        if isinstance(stage, int):
            rf.stage = int(stage)
        elif "single_partition_of_fp32_groups" in osd:
            rf.stage = 1  # BF16_Optimizer: no zero_stage key, ZeRO-1 partitioning
        pc = osd.get("partition_count")
        rf.partition_count = [int(pc)] if isinstance(pc, int) else [
            int(x) for x in pc if isinstance(x, int)] if isinstance(pc, list) else []
        rf.ds_version = _str(osd.get("ds_version")) or _str(_get(tf.obj, "ds_version"))
        rf.step = self._optimizer_step(tf, osd)

    @staticmethod
    def _optimizer_step(tf: TorchFile, osd: dict) -> float | int | None:
        """Adam's `step` of the lowest-numbered param state: every rank steps together, so a rank
        file with another value was saved at another time (a stale file with the right shapes)."""
        base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
        state = _get(base, "state")
        if not isinstance(state, dict) or not state:
            return None
        step = _get(state.get(min(state, key=str)), "step")
        if isinstance(step, TensorRef):
            return tf.read_scalar(step)
        return step if isinstance(step, (int, float)) else None

    def _pick_model_state(self) -> dict | None:
        """The model-states pickle to take names/shapes from: the rank-0 file (it alone has
        `shared_params` at stage 3), else the lowest rank that can be read."""
        candidates = sorted(self.model_files, key=lambda f: (f.rank or 0, f.name))
        for rf in candidates:
            tf = self.tf(rf)
            if tf is not None:
                if not isinstance(tf.obj, dict) or \
                        ("buffer_names" not in tf.obj and "param_shapes" not in tf.obj):
                    rf.error = "not a model-states file (no buffer_names/param_shapes)"
                    self.find(ERROR, "not-model-states", f"{rf.name} is not a model-states file",
                              "move it out of the tag dir", file=rf.name, rank=rf.rank)
                    continue
                self.model_file = rf
                if rf.rank not in (0, None):
                    self.find(WARNING, "rank0-model-missing",
                              f"the rank-0 model-states file is missing or unreadable; "
                              f"names are read from {rf.name}",
                              "tied-parameter links (shared_params) are only saved by rank 0; "
                              "restore zero_pp_rank_0_mp_rank_00_model_states.pt",
                              file=rf.name, rank=rf.rank)
                return tf.obj
        return None

    # ------------------------------------------------------------------ layout
    def _detect_layout(self, optim: list[RankFile]) -> None:
        c = self.c
        stages = Counter(f.stage for f in optim if f.stage is not None)
        if stages:
            c.stage = stages.most_common(1)[0][0]
        # the lowest rank that can be read: an unreadable rank 0 is reported once, as itself
        ref = next((rf for _, rf in sorted(self.optim_by_rank.items()) if self.tf(rf)),
                   self.optim_by_rank.get(0))
        ref_tf = self.tf(ref) if ref else None
        osd = _get(ref_tf.obj, "optimizer_state_dict") if ref_tf else None
        if isinstance(osd, dict):
            c.layout = "zero" if "zero_stage" in osd else (
                "bf16_optimizer" if "single_partition_of_fp32_groups" in osd else "unknown")
            counts = [pc for f in optim for pc in f.partition_count[:1]]
            if ref.partition_count:
                c.world_size = max(ref.partition_count)
            elif counts:
                c.world_size = Counter(counts).most_common(1)[0][0]
            c.ds_version = ref.ds_version
            c.ds_config = _get(ref_tf.obj, "ds_config")
            self.ref_osd = osd
        else:
            self.ref_osd = None
        # layouts zero_to_fp32 cannot merge, named from what is on disk
        mp = {f.mp_rank for f in c.files if f.kind in ("optim", "model") and f.mp_rank is not None}
        kinds = {f.kind for f in c.files}
        unsupported = None
        if "universal" in kinds:
            unsupported = "universal"
        elif len(mp) > 1:
            unsupported = "tensor_parallel"
        elif "layer" in kinds:
            unsupported = "pipeline"
        elif kinds & {"expert", "expert_optim"}:
            unsupported = "moe"
        elif "offload" in kinds:
            unsupported = "nvme_offload"
        elif not optim and self.model_state is not None and \
                self.model_state.get("optimizer") is not None:
            unsupported = "zero0"
            c.stage = 0
        if unsupported:
            c.layout = unsupported
            self.find(ERROR, "unsupported-layout",
                      f"{UNSUPPORTED[unsupported]}: zinspect can show it but not merge it yet",
                      "for now use DeepSpeed's ds_to_universal.py for this layout")
        if c.layout == "bf16_optimizer":
            self.find(INFO, "bf16-optimizer",
                      "BF16_Optimizer layout (bf16 + ZeRO-1 + fp32 grad accumulation): "
                      "DeepSpeed's zero_to_fp32.py refuses it, zinspect merges it")

    # ------------------------------------------------------------------ params
    def _build_params(self) -> None:
        c, ms = self.c, self.model_state
        module = ms.get("module") if isinstance(ms.get("module"), dict) else {}
        buffer_names = [b for b in ms.get("buffer_names") or [] if isinstance(b, str)]
        self.buffer_names = buffer_names
        self.module = module
        shapes = _as_group_list(ms.get("param_shapes"))
        if not shapes and self.ref_osd is not None:  # DeepSpeed < 0.6 kept them in optim files
            shapes = _as_group_list(_get(self.tf(self.optim_by_rank.get(0) or
                                                 next(iter(self.optim_by_rank.values()))).obj,
                                         "param_shapes"))
        self.flat_groups = [[(str(n), _shape(s)) for n, s in g.items()] for g in shapes]
        self._check_flat_groups(shapes)
        frozen = ms.get("frozen_param_shapes")
        self.frozen_shapes = {str(n): _shape(s) for n, s in frozen.items()} \
            if isinstance(frozen, dict) else {}
        shared = ms.get("shared_params") if isinstance(ms.get("shared_params"), dict) else {}
        trainable = {n: s for g in self.flat_groups for n, s in g}
        bufset = set(buffer_names)
        names = [n for n in module if isinstance(n, str) and n not in bufset]
        for n in list(trainable) + list(self.frozen_shapes):
            if n not in module:
                names.append(n)  # module missing or stripped: the shapes lists still name them
        untied: list[str] = []
        for name in names:
            t = module.get(name)
            dtype = t.dtype if isinstance(t, TensorRef) else None
            shape = trainable.get(name) or self.frozen_shapes.get(name)
            if shape is None and isinstance(t, TensorRef) and c.stage != 3:
                shape = t.shape
            p = Param(name, shape or (), dtype or "")
            if name in trainable and shape is not None and isinstance(t, TensorRef) and \
                    c.stage != 3 and t.shape != shape:  # stage 1/2 modules hold full weights
                self.find(ERROR, "shape-mismatch", f"{name}: param_shapes says "
                          f"{_short(shape)}, its 16-bit weight in the module is {_short(t.shape)}",
                          "the model-states file is damaged or forged; restore it from the run",
                          param=name, file=self.model_file.name)
            src = shared.get(name)
            if isinstance(src, str) and src != name and name not in trainable:
                p.tied_to = src
            elif name in trainable:
                pass
            elif name in self.frozen_shapes or (isinstance(t, TensorRef) and c.stage != 3):
                p.frozen = True  # ZeRO-1 keeps frozen params only in `module`
            elif self.model_file.rank not in (0, None) and not shared:
                untied.append(name)  # a tied alias: only rank 0 saves the links
                continue
            else:
                self.find(ERROR, "param-unaccounted",
                          f"{name} is in the module state but in no param group, frozen list "
                          "or tied-params map", "the model-states file is inconsistent",
                          param=name, file=self.model_file.name)
            c.params[name] = p
        if untied:  # folded under the missing rank-0 file: one cause, one finding
            i, f = next((i, f) for i, f in enumerate(c.findings)
                        if f.code == "rank0-model-missing")
            c.findings[i] = Finding(f.severity, f.code, f"{f.message}; {len(untied)} tied "
                                    f"alias(es) cannot be linked and are left out "
                                    f"({', '.join(untied[:3])}{', ...' if len(untied) > 3 else ''})",
                                    f.hint, f.file, f.rank)
        if not c.params:
            self.find(ERROR, "no-params", f"{self.model_file.name} names no parameters: its "
                      "module and param_shapes are missing or malformed",
                      "the model-states file is damaged or was replaced; restore it from the run",
                      file=self.model_file.name, rank=self.model_file.rank)
        for p in c.params.values():
            if p.tied_to:
                src = c.params.get(p.tied_to)
                if src is None:
                    continue  # validate reports it
                if p.shape and src.shape and p.shape != src.shape:
                    # zero-numel params share a data_ptr with their neighbour at stage 1/2
                    p.tied_to = None
                    p.frozen = True
                    continue
                p.shape, p.frozen = src.shape, src.frozen
                p.dtype = p.dtype or src.dtype

    def _check_flat_groups(self, shapes: list[dict]) -> None:
        """Every trainable param once, with a valid shape: otherwise its group cannot add up."""
        seen: dict[str, int] = {}
        for gi, (members, raw) in enumerate(zip(self.flat_groups, shapes, strict=True)):
            for (name, shape), value in zip(members, raw.values(), strict=True):
                if shape is None:
                    self.find(ERROR, "param-shape", f"{name}: param_shapes gives it no valid "
                              f"shape ({type(value).__name__} {_short(value)})",
                              "the model-states file is damaged or forged; restore it from the "
                              "run", param=name, group=gi, file=self.model_file.name)
                if name in seen:
                    self.find(ERROR, "duplicate-param", f"{name} is in param group {seen[name]} "
                              f"and in group {gi}", "the model-states file is damaged or "
                              "forged; restore it from the run", param=name, group=gi,
                              file=self.model_file.name)
                seen.setdefault(name, gi)

    # ------------------------------------------------------------------ ZeRO-1/2
    def _build_zero12(self) -> None:
        c = self.c
        ws = c.world_size or len(self.optim_by_rank)
        bf16_opt = c.layout == "bf16_optimizer"
        group_of = self._param_group_map()
        for gi, members in enumerate(self.flat_groups):
            orig = sum(_numel(s or ()) for _, s in members)
            g = ParamGroup(gi, group_of.get(gi, gi), [n for n, _ in members], orig)
            c.groups.append(g)
            parts: dict[int, tuple[RankFile, TensorRef, int]] = {}
            for r, rf in self.optim_by_rank.items():
                osd = _get(self.tf(rf).obj, "optimizer_state_dict") if self.tf(rf) else None
                flat = _get(osd, "single_partition_of_fp32_groups")
                pads = _get(osd, "group_paddings")
                if not isinstance(flat, list) or gi >= len(flat) or \
                        not isinstance(flat[gi], TensorRef):
                    if self.tf(rf) is not None:
                        self.find(ERROR, "group-missing",
                                  f"{rf.name} has no fp32 partition for group {gi}",
                                  "this rank file does not belong to this checkpoint",
                                  file=rf.name, rank=r, group=gi)
                    continue
                pad = pads[gi] if isinstance(pads, list) and gi < len(pads) and \
                    isinstance(pads[gi], int) else 0
                t = flat[gi]
                g.dtype = g.dtype or t.dtype
                g.partition_numel[r], g.padding[r] = t.numel, pad
                parts[r] = (rf, t, pad)
            # P: the partition size. Stripped layout: saved + padding; BF16_Optimizer: saved.
            sizes = Counter((t.numel if bf16_opt else t.numel + pad) for _, t, pad in parts.values())
            if not sizes:
                continue
            P = sizes.most_common(1)[0][0]
            if len(sizes) > 1:
                for r, (rf, t, pad) in parts.items():
                    if (t.numel if bf16_opt else t.numel + pad) != P:
                        self.find(ERROR, "partition-size",
                                  f"group {gi}: rank {r} holds a partition of "
                                  f"{t.numel if bf16_opt else t.numel + pad} elements, the other "
                                  f"ranks {P}", "this rank file comes from another run or world "
                                  "size; replace it with the one saved with the others",
                                  file=rf.name, rank=r, group=gi)
            real = {r: (t.numel - pad if bf16_opt else t.numel) for r, (_, t, pad) in parts.items()}
            located = {r: self._partition(rf, r, t) for r, (rf, t, _) in parts.items()}
            start = 0
            for name, shape in members:
                n = _numel(shape or ())
                p = c.params.get(name)
                if p is not None:
                    p.group, p.sub_group = g.param_group, gi
                    if not p.shape and shape:
                        p.shape = shape
                if n and P:
                    for r in range(start // P, min((start + n - 1) // P, ws - 1) + 1):
                        if r not in parts:
                            continue
                        lo = max(start, r * P)
                        hi = min(start + n, r * P + real[r])
                        if hi > lo and p is not None:
                            p.fragments.append(located[r].fragment(gi, lo - r * P, lo - start,
                                                                   hi - lo))
                start += n
            self._check_slice_mappings(g, parts)

    def _check_slice_mappings(self, g: ParamGroup, parts: dict) -> None:
        """Cross-check the fragments against the optimizer's own `param_slice_mappings`
        (name -> where it lies in this rank's partition). With round_robin_gradients those
        follow the original param order and disagree by design, so they are skipped."""
        zo = _get(self.c.ds_config, "zero_optimization")
        if isinstance(zo, dict) and zo.get("round_robin_gradients"):
            return
        for r, (rf, _, _) in parts.items():
            maps = _get(self.tf(rf).obj, "optimizer_state_dict", "param_slice_mappings")
            if not isinstance(maps, list) or g.index >= len(maps) or \
                    not isinstance(maps[g.index], dict):
                continue
            for name, addr in maps[g.index].items():
                p = self.c.params.get(name)
                frag = next((f for f in p.fragments if f.rank == r), None) if p else None
                want = (getattr(addr, "get", lambda k: None)("start"),
                        getattr(addr, "get", lambda k: None)("numel"))
                if frag is None or want != (frag.group_offset, frag.numel):
                    self.find(WARNING, "slice-mapping-mismatch",
                              f"{name}: rank {r}'s optimizer places it at {want[0]} (+{want[1]}) "
                              f"in group {g.index}, its param_shapes order at "
                              f"{frag.group_offset if frag else '-'} (+{frag.numel if frag else 0})",
                              "the optimizer and model-states files disagree: check they come "
                              "from the same save", file=rf.name, rank=r, group=g.index,
                              param=name)
                    return

    def _param_group_map(self) -> dict[int, int]:
        """flat group (ZeRO-3 sub-group) index -> optimizer param group index, from the torch
        optimizer's saved param_groups (each lists the flat tensors it owns)."""
        osd = self.ref_osd or {}
        base = osd.get("base_optimizer_state") if self.c.stage != 3 else \
            osd.get("optimizer_state_dict")
        groups = _get(base, "param_groups")
        out: dict[int, int] = {}
        if isinstance(groups, list):
            for gi, g in enumerate(groups):
                for idx in _get(g, "params", default=[]) or []:
                    if isinstance(idx, int):
                        out[idx] = gi
        return out

    # ------------------------------------------------------------------ ZeRO-3
    def _build_zero3(self) -> None:
        c = self.c
        ws = c.world_size or len(self.optim_by_rank)
        group_of = self._param_group_map()
        flats: dict[int, list] = {}
        for r, rf in self.optim_by_rank.items():
            tf = self.tf(rf)
            fl = _get(tf.obj, "optimizer_state_dict", "fp32_flat_groups") if tf else None
            if isinstance(fl, list):
                flats[r] = [self._partition(rf, r, t) if isinstance(t, TensorRef) else None
                            for t in fl]
        for gi, members in enumerate(self.flat_groups):
            orig = sum(_numel(s or ()) for _, s in members)
            g = ParamGroup(gi, group_of.get(gi, 0 if not group_of else gi), [n for n, _ in members],
                           orig)
            c.groups.append(g)
            parts = {r: fl[gi] for r, fl in flats.items() if gi < len(fl) and fl[gi] is not None}
            for r, part in parts.items():
                g.partition_numel[r], g.padding[r] = part.numel, 0
                g.dtype = g.dtype or part.dtype
            o = 0
            for name, shape in members:
                n = _numel(shape or ())
                P = -(-n // ws) if ws else 0
                if P:
                    for r in range(n // P, ws):  # only the last ranks hold padding
                        if r in parts:
                            g.padding[r] += P - _clamp(n - r * P, P)
                p = c.params.get(name)
                if p is not None:
                    p.group, p.sub_group = g.param_group, gi
                    if not p.shape and shape:
                        p.shape = shape
                    if P:
                        p.fragments = Fragments(make=partial(_zero3_fragments, parts, gi, o, n,
                                                             P, "master"))
                o += P

    def _partition(self, rf: RankFile, rank: int, t: TensorRef) -> _Partition:
        return _partition_of(self.tf(rf), rf.name, rank, t)

    # ------------------------------------------------------------------ frozen + buffers
    def _build_frozen(self) -> None:
        c = self.c
        frozen = [p for p in c.params.values() if p.frozen and not p.tied_to]
        if not frozen:
            return
        ws = c.world_size or 1
        if c.stage == 3:
            source = _FrozenFragments(self, ws)
            for p in frozen:
                p.fragments = Fragments(make=partial(source.fragments, p.name, p.numel))
            return
        tf = self.tf(self.model_file)
        fragments = self.model_state.get("frozen_param_fragments")
        for p in frozen:
            t = fragments.get(p.name) if isinstance(fragments, dict) else None
            source = "frozen"
            if not isinstance(t, TensorRef):
                t, source = self.module.get(p.name), "module"
            if isinstance(t, TensorRef) and tf is not None:
                part = self._partition(self.model_file, 0, t)
                p.fragments.append(part.fragment(None, 0, 0, min(t.numel, p.numel),
                                                 source=source))

    def _build_buffers(self) -> None:
        tf = self.tf(self.model_file)
        for name in self.buffer_names:
            t = self.module.get(name)
            if isinstance(t, TensorRef):
                offset = tf.tensor_offset(t) if tf else None
                rec = tf.records.get(t.storage.key) if tf else None
                intact = offset is not None and t.is_contiguous() and rec is not None and \
                    rec.present >= (t.offset * t.itemsize + t.nbytes)
                self.c.buffers[name] = Buffer(name, t.shape, t.dtype, self.model_file.name,
                                              offset, intact)
            else:
                self.c.buffers[name] = Buffer(name, (), "", intact=False)

    def _settle_dtypes(self) -> None:
        c = self.c
        masters = Counter(g.dtype for g in c.groups if g.dtype)
        c.master_dtype = masters.most_common(1)[0][0] if masters else None
        cfg = c.ds_config if isinstance(c.ds_config, dict) else {}
        if _get(cfg, "bf16", "enabled") is True:
            c.dtype = "bfloat16"
        elif _get(cfg, "fp16", "enabled") is True:
            c.dtype = "float16"
        else:
            dts = Counter(p.dtype for p in c.params.values() if p.dtype)
            c.dtype = dts.most_common(1)[0][0] if dts else c.master_dtype
        for p in c.params.values():
            if not p.dtype:
                p.dtype = c.dtype or ""


class _FrozenFragments:
    """ZeRO-3 frozen params: each rank's model states hold its ceil(n/ws) elements. The files
    of ranks > 0 are unpickled on first use, all at once, in threads."""

    def __init__(self, builder: _Builder, ws: int) -> None:
        self.ws = ws
        self.files = {f.rank: f for f in builder.model_files if f.rank is not None}
        self.parsed = {r: builder.tf(f) for r, f in self.files.items() if builder.tf(f)}
        self._lock = threading.Lock()
        self._loaded = False

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            shallow = [f for f in self.files.values() if f.shallow]
            named = [NamedFile(f.path, f.kind, f.rank, f.mp_rank) for f in shallow]
            for rf, tf in _parse_files(named, _Ticker(len(named), None)).values():
                if tf is not None:
                    self.parsed[rf.rank] = tf
            self._loaded = True

    def fragments(self, name: str, n: int) -> list[Fragment]:
        self._load()
        P = -(-n // self.ws)
        parts = {}
        for r, tf in sorted(self.parsed.items()):
            t = _get(tf.obj, "frozen_param_fragments", name)
            if isinstance(t, TensorRef):
                parts[r] = _partition_of(tf, self.files[r].name, r, t)
        return _zero3_fragments(parts, None, 0, n, P, "frozen") if P else []


@dataclass(frozen=True, slots=True)
class _Partition:
    rank: int
    file: str
    base: int | None  # byte offset of element 0 in the file
    itemsize: int
    dtype: str
    numel: int
    whole: int  # elements from 0 that are really in the file

    def fragment(self, group: int | None, elem: int, start: int, numel: int, padding: int = 0,
                 source: str = "master") -> Fragment:
        """Param elements [start, start+numel) held at element `elem` of this tensor."""
        return Fragment(self.rank, self.file, group, start, numel,
                        None if self.base is None else self.base + elem * self.itemsize,
                        self.dtype, padding, source, elem,
                        self.base is not None and elem + numel <= self.whole)


def _partition_of(tf: TorchFile, file: str, rank: int, t: TensorRef) -> _Partition:
    """A rank's tensor, resolved once: where its element 0 is and how many of its elements are
    really in the file."""
    base = tf.tensor_offset(t)
    rec = tf.records.get(t.storage.key)
    whole = 0 if base is None or rec is None or not t.is_contiguous() else \
        max(0, min(rec.present, rec.size) // t.itemsize - t.offset)
    return _Partition(rank, file, base, t.itemsize, t.dtype, t.numel, min(whole, t.numel))


def _zero3_fragments(parts: dict[int, _Partition], group: int | None, offset: int, n: int,
                     P: int, source: str) -> list[Fragment]:
    """A ZeRO-3 param of n elements at element `offset` of each rank's partition: rank r holds
    elements [r*P, r*P + held) followed by P - held padding elements."""
    out = []
    for r, part in parts.items():
        if offset + P > part.numel:
            continue  # partition too short: validate reports the group size
        held = _clamp(n - r * P, P)
        out.append(part.fragment(group, offset, r * P, held, P - held, source))
    return out


def _clamp(x: int, hi: int) -> int:
    return max(0, min(x, hi))


def _short(value) -> str:
    """A bounded, printable glimpse of a value from a pickle (its ints only: never a repr)."""
    if isinstance(value, (tuple, list)):
        dims = ", ".join(str(x) if type(x) is int and abs(x) < 10**30 else "?"
                         for x in value[:8])
        return f"({dims}{', ...' if len(value) > 8 else ''})"
    return ""


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


