"""Consistency checks over the metadata model. Each finding names where and what to do.

Codes, their severities and meanings are registered in `zinspect.core.codes`. A knock-on of
a lost file (a param's elements held by an unreadable or missing rank file) is folded under that
file's finding (`rootcause`): one root cause, one finding in the human output.
"""

from __future__ import annotations

from collections import Counter

from zinspect.core import codes, partition, rootcause
from zinspect.core.coverage import cover
from zinspect.core.filechecks import file_findings
from zinspect.core.layouts import MERGEABLE, one_save, tp_checks
from zinspect.core.layouts.common import undescribed_groups
from zinspect.core.layouts.gaps import STALE_HINT, missing_files, outside, stale
from zinspect.core.model import ERROR, Checkpoint, Finding, Param
from zinspect.core.params import numels_of, outside_groups, shares_of

#: the layouts whose files are one data-parallel set: the rank, group and param checks below
PLAIN_ZERO = ("zero", "bf16_optimizer")
_REPLACE = "replace it with the file saved by the same run as the others"
_SALVAGE = "copy it from the run; `zinspect merge --salvage` writes the other params"


def validate(ckpt: Checkpoint) -> list[Finding]:
    """Append the consistency findings to `ckpt.findings` and return them all."""
    checks = _Checks(ckpt)
    checks.run()
    ckpt.findings.extend(checks.out)
    rootcause.fold(ckpt, checks.ranks_of)
    return ckpt.findings


class _Checks:
    def __init__(self, ckpt: Checkpoint) -> None:
        self.c = ckpt
        self.out: list[Finding] = []
        #: id(param-coverage / param-truncated finding) -> the ranks whose files would hold it
        self.ranks_of: dict[int, list[int]] = {}
        #: ZeRO-3 group -> its param_shapes partition-size finding (its params' gaps follow)
        self.shapes_off: dict[int, Finding] = {}
        self._want: dict[int, int] = {}

    def add(self, code, message, hint="", **where) -> Finding:
        found = codes.finding(code, message, hint, **where)
        self.out.append(found)
        return found

    def run(self) -> None:
        c = self.c
        if not c.files:
            self.add("empty-tag-dir", f"the tag dir {c.path} holds no files",
                     "the save never happened or the files were moved; check the path")
            return
        self.out.extend(file_findings(c))
        for check in c.later_checks:  # what the layout could not check at open
            self.out.extend(check())
        if c.layout == "tensor_parallel":  # its tp ranks' files saved at one step and stage
            optim = c.files_of("optim")
            one_save.outliers(self.add, [(f, f.step) for f in optim], "at optimizer step {}")
            one_save.outliers(self.add, [(f, f.stage) for f in optim], "with ZeRO-{}", "stage-mismatch")
        self.out.extend(tp_checks.shard_findings(c))  # every layout whose params are tp shards
        if c.layout not in PLAIN_ZERO:
            if c.layout == "unknown" and any(f.readable for f in c.files_of("optim")):
                self.add("unknown-layout", "the optimizer files hold neither fp32 "
                         "partitions nor a zero_stage", "these are not ZeRO optimizer files")
            elif c.layout == "unknown" and c.params and not c.files_of("optim"):
                # model states that name params but hold no optimizer (ZeRO-0's would), and no
                # optimizer file: the fp32 masters are missing, not a layout to merge
                self.add("no-optimizer-files", "no *_optim_states.pt file in the tag dir, and "
                         "the model states hold no optimizer: the fp32 master weights are not "
                         "here", "copy this tag's *_optim_states.pt files (one per data-parallel "
                         "rank) from the run; the model states' 16-bit weights are not the masters")
            elif c.layout in MERGEABLE and not any(f.severity == ERROR for f in
                                                   [*c.findings, *self.out]):
                # every param's elements held once (tp shards: above). Only when the layout
                # found no error: its missing-file findings already name what they take
                # down, and a gap with nothing missing (a forged or cut partition) must not
                # pass validate while the merge refuses it
                self.params(plain=False)
            return
        self.ranks()
        self.consistency()
        self.groups()
        self.params()
        self.dtypes()

    # -------------------------------------------------------------- rank sets
    def ranks(self) -> None:
        c = self.c
        ws = c.world_size
        optim = [f for f in c.files_of("optim") if f.mp_rank in (0, None)]
        if ws is None:
            self.add("world-size-unknown", "no readable optimizer file says the world size",
                     "every optimizer file is unreadable; restore them")
            return
        prefixes = Counter(f.prefix for f in optim)
        main = prefixes.most_common(1)[0][0] if prefixes else ""
        self._rank_set(optim, ws, "optimizer files", "missing-optimizer-file",
                       lambda d: f"{main}zero_pp_rank_{d}_mp_rank_00_optim_states.pt",
                       "its partition of every flat group is lost", _SALVAGE)
        if c.stage == 3:
            self._rank_set([f for f in c.files_of("model") if f.rank is not None], ws,
                           "model-states files", "missing-model-states-file",
                           lambda d: f"zero_pp_rank_{d}_mp_rank_00_model_states.pt",
                           "its partition of the frozen params is lost",
                           "copy it from the run")
        if len(prefixes) > 1:
            for f in optim:
                if f.prefix != main:
                    self.add("mixed-prefix", f"{f.name} has prefix {f.prefix or 'none'!r}, "
                             f"the other optimizer files {main or 'none'!r}: two runs are mixed",
                             STALE_HINT, file=f.name, rank=f.rank)
        for f in optim:
            if not f.name.endswith("_optim_states.pt"):
                self.add("legacy-file-name", f"{f.name} uses the pre-0.10 name without "
                         "'_' before optim_states; DeepSpeed's converter skips it", file=f.name)

    def _rank_set(self, files, ws: int, what: str, code: str, name_of, lost: str,
                  hint: str) -> None:
        """Each dp rank's file there (gaps.missing_files), none beyond the world size."""
        missing_files(self.add, [("dp", ws)], {(f.coords.dp,) for f in files}, code, what,
                      name_of, lost, hint)
        for f in files:
            if f.coords.dp >= ws:
                stale(self.add, f, outside([("dp", ws)], (f.coords.dp,)))

    # -------------------------------------------------------------- cross-rank consistency
    def consistency(self) -> None:
        c = self.c
        optim = [f for f in c.files_of("optim") if f.readable and f.mp_rank in (0, None)]
        mixed = one_save.outliers(self.add, [(f, f.stage) for f in optim], "with ZeRO-{}",
                                  "stage-mismatch", usual=c.stage) if c.stage is not None else set()
        for f in optim:
            if f.name not in mixed and f.partition_count and max(f.partition_count) != c.world_size:
                self.add("world-size-mismatch", f"{f.name} was saved with world size "
                         f"{max(f.partition_count)}, the others with {c.world_size}",
                         _REPLACE, file=f.name, rank=f.rank)
        one_save.outliers(self.add, [(f, f.step) for f in optim], "at optimizer step {}")
        versions = Counter(f.ds_version for f in optim if f.ds_version)
        if len(versions) > 1:
            main = versions.most_common(1)[0][0]
            for f in optim:
                if f.ds_version and f.ds_version != main:
                    self.add("ds-version-mismatch", f"{f.name} was saved by DeepSpeed "
                             f"{f.ds_version}, the others by {main}", _REPLACE,
                             file=f.name, rank=f.rank)
        dp = _dp_world_size(c)
        if dp is not None and c.world_size is not None and (type(dp) is not int or
                                                            dp != c.world_size):  # True == 1
            self.add("world-size-mismatch", f"the model states say dp_world_size={dp}, "
                     f"the optimizer files partition_count={c.world_size}",
                     "the model-states and optimizer files come from different runs")

    # -------------------------------------------------------------- numel coverage
    def groups(self) -> None:
        """Each rank's partition of each flat group has exactly the elements its params need
        (`partition-size`, once per rank and group; ranks >= ws are stale files, reported once by
        stale-rank-file). When every rank is off alike at ZeRO-3, the cause is param_shapes, not a
        rank file: one finding, naming the param whose share is off when one fits."""
        c = self.c
        ws = c.world_size or 0
        if c.stage in (1, 2):
            self._undescribed_groups()
        for g in c.groups:
            if not g.partition_numel:
                continue
            if c.stage == 3:
                self._zero3_group(g, ws)
                continue
            real = {r: n - (g.padding.get(r, 0) if c.layout == "bf16_optimizer" else 0)
                    for r, n in g.partition_numel.items() if r < ws}
            held = sum(real.values())
            if len(real) == ws and held != g.numel:
                self.add("group-coverage", f"group {g.index}: the ranks hold {held:,} "
                         f"elements, its {len(g.params)} params need exactly {g.numel:,}",
                         "a rank file comes from another run or the param shapes do not match "
                         "the optimizer files", group=g.index)
            for r, n in sorted(real.items()):
                expect = partition.zero12_real(g.numel, ws, r)
                if n != expect:
                    self.add("partition-size", f"group {g.index}: rank {r} holds {n:,} real "
                             f"elements, expected {expect:,} for {g.numel:,} elements over "
                             f"{ws} ranks", _REPLACE, rank=r, group=g.index, file=_file_of(c, r))

    def _undescribed_groups(self) -> None:
        """ZeRO-1/2: each flat group the optimizer files partition (a partition count each) is
        one param_shapes describes (`common.undescribed_groups`; MoE checks its own)."""
        c = self.c
        held = max((len(f.partition_count) for f in c.files_of("optim") if f.mp_rank in (0, None)),
                   default=0)
        if c.params:  # none: the model states are unreadable or name none (their own finding)
            undescribed_groups(self.add, held, len(c.groups))

    def _zero3_group(self, g, ws: int) -> None:
        c = self.c
        want = self._zero3_want(g, ws)
        held = {r: n for r, n in sorted(g.partition_numel.items()) if r < ws}
        off = {r: n for r, n in held.items() if n != want}
        if len(held) == ws > 1 and len(off) == ws and len(set(off.values())) == 1:
            n = next(iter(off.values()))
            name = partition.zero3_share_off(
                [(m, c.params[m].numel) for m in g.params if m in c.params], ws, want - n)
            model = self.c.files_of("model")
            self.shapes_off[g.index] = self.add(
                "partition-size", f"group {g.index}: every rank holds {n:,} elements, its "
                f"params need exactly {want:,} by param_shapes" +
                (f": {name}'s declared shape {_shape_of(c, name)} is off (the only param "
                 "whose share can account for it by the fewest elements)" if name else ""),
                "the model-states file's param_shapes do not match the optimizer files: "
                "restore the model states saved with them", group=g.index, param=name,
                file=model[0].name if len(model) == 1 else _model_file_of(c, 0))
            return
        for r, n in off.items():
            self.add("partition-size", f"group {g.index}: rank {r} holds {n:,} elements, its "
                     f"params need exactly {want:,}", _REPLACE, rank=r, group=g.index,
                     file=_file_of(c, r))

    def params(self, plain: bool = True) -> None:
        """Each param's elements held once, whole. For the parallel layouts (`plain=False`)
        only that: their tp-sharded params are tp_checks.shard_findings' walk, and what plain
        ZeRO's files say about frozen params is not theirs to say."""
        c = self.c
        whole = self._whole_zero3_groups()
        frozen_whole = self._whole_zero3_model_states()
        # params in whole groups are covered by construction: that spares building millions
        # of fragments (and, in one comprehension, a Python step per param)
        for p in [p for p in outside_groups(c.params, whole) if (plain or not p.shards) and (
                p.tied_to or not (p.frozen and frozen_whole or not p.frozen and p.sub_group in whole))]:
            if p.tied_to:
                if p.tied_to not in c.params:
                    self.add("tied-source-missing", f"{p.name} is tied to {p.tied_to}, "
                             "which the checkpoint does not hold", "the alias cannot be written; "
                             "exclude it or restore the rank-0 model states", param=p.name)
                continue
            if p.numel == 0:
                continue
            if not p.fragments:
                if p.frozen:
                    self.add("frozen-missing", f"frozen param {p.name} has no saved values "
                             "(saved with exclude_frozen_parameters?)",
                             "exclude frozen params from the merge (--exclude-frozen)", param=p.name)
                else:
                    ranks = _ranks_for(c, p, [(0, p.numel)])
                    found = self.add("param-coverage", f"{p.name}: no rank holds any of its "
                                     f"{p.numel:,} elements", "restore the missing rank files",
                                     param=p.name)
                    self._knock_on(p, found, ranks)
                continue
            self._coverage(p)
            if plain and p.frozen and p.fragments[0].source == "module":
                self.add("frozen-from-module", f"frozen param {p.name} is saved only in the "
                         "16-bit module weights (ZeRO-1); zinspect recovers it, DeepSpeed's "
                         "converter drops it", param=p.name)

    def _whole_zero3_groups(self) -> set[int]:
        """ZeRO-3 sub-groups held whole by every rank: every rank's partition is present, of
        the exact size, in a file with nothing missing. Their params are fully covered."""
        c = self.c
        ws = c.world_size or 0
        if c.stage != 3 or not ws:
            return set()
        damaged = {f.rank for f in c.files_of("optim") if not _whole(f)}
        whole = set()
        for g in c.groups:
            want = self._zero3_want(g, ws)
            if set(g.partition_numel) == set(range(ws)) and not damaged & set(g.partition_numel) \
                    and all(n == want for n in g.partition_numel.values()):
                whole.add(g.index)
        return whole

    def _zero3_want(self, g, ws: int) -> int:
        """The elements each rank's partition of ZeRO-3 sub-group g needs (asked twice: the
        sum over a 300k-param model is not free)."""
        if g.index not in self._want:
            shares = shares_of(self.c.params, g.params, ws)  # the layout's, when it cut them
            self._want[g.index] = sum(shares) if shares is not None else \
                partition.zero3_group_numel(numels_of(self.c.params, g.params), ws)
        return self._want[g.index]

    def _whole_zero3_model_states(self) -> bool:
        """Every rank's ZeRO-3 model states present and whole: the frozen-param fragments they
        hold are then not unpickled just to be counted (the merge still checks each one)."""
        c = self.c
        files = {f.rank: f for f in c.files_of("model") if f.rank is not None}
        return c.stage == 3 and bool(c.world_size) and \
            all(r in files and _whole(files[r]) for r in range(c.world_size))

    def _coverage(self, p: Param) -> None:
        c = self.c
        cov = cover(p.numel, p.fragments)
        for lo, hi in cov.overlaps:
            self.add("param-overlap", f"{p.name}: elements {lo:,}..{hi:,} are held twice",
                     _REPLACE, param=p.name)
        if cov.gaps:
            ranks = _ranks_for(c, p, cov.gaps)
            found = self.add("param-coverage", f"{p.name}: {cov.missing:,} of {p.numel:,} "
                             f"elements are held by no rank file (rank {', '.join(map(str, ranks))})"
                             if ranks else f"{p.name}: {cov.missing:,} of {p.numel:,} elements "
                             "are missing", "restore the missing rank files", param=p.name,
                             rank=ranks[0] if len(ranks) == 1 else None)
            self._knock_on(p, found, ranks)
        bad = [f for f in p.fragments if not f.intact and f.numel]
        if bad:
            found = self.add("param-truncated", f"{p.name}: the bytes of rank "
                             f"{', '.join(str(f.rank) for f in bad)} are not all in {bad[0].file}",
                             "that file is truncated; copy it again", param=p.name,
                             file=bad[0].file, rank=bad[0].rank)
            self.ranks_of[id(found)] = sorted({f.rank for f in bad})

    def _knock_on(self, p: Param, found: Finding, ranks: list[int]) -> None:
        """Note what a param's gap may be a knock-on of (see rootcause): its ranks' lost files,
        or its group's param_shapes that do not add up."""
        self.ranks_of[id(found)] = ranks
        root = self.shapes_off.get(p.sub_group) if not p.frozen else None
        if root is not None:
            found.cause = f"{root.code}: {root.where()}"

    def dtypes(self) -> None:
        c = self.c
        if c.master_dtype and c.master_dtype != "float32":
            self.add("master-not-fp32", f"the optimizer masters are {c.master_dtype}, "
                     "not fp32 (bf16/fp16 master weights were enabled)",
                     "the merge writes them upcast to fp32; no more precision exists")
        ints = [b.name for b in c.buffers.values() if b.dtype.startswith(("int", "uint", "bool"))]
        if ints:
            self.add("int-buffers", f"{len(ints)} integer buffer(s) ({', '.join(ints[:3])}"
                     f"{'...' if len(ints) > 3 else ''}) keep their dtype; DeepSpeed's converter "
                     "casts them to float")
        zo = c.ds_config.get("zero_optimization") if isinstance(c.ds_config, dict) else None
        if isinstance(zo, dict) and zo.get("round_robin_gradients"):
            self.add("round-robin", "round_robin_gradients is on: flat groups follow the "
                     "round-robin order of param_shapes (handled)")


def _dp_world_size(c: Checkpoint) -> int | None:
    for f in c.files_of("model"):
        if f.readable and f.dp_world_size is not None:
            return f.dp_world_size
    return None


def _file_of(c: Checkpoint, rank: int) -> str | None:
    return next((f.name for f in c.files_of("optim") if f.rank == rank), None)


def _model_file_of(c: Checkpoint, rank: int) -> str | None:
    return next((f.name for f in c.files_of("model") if f.rank == rank), None)


def _shape_of(c: Checkpoint, name: str) -> str:
    return "(" + ", ".join(map(str, c.params[name].shape)) + ")"


def _whole(f) -> bool:
    """Readable, with its zip directory and every tensor record all there."""
    return f.readable and not f.recovered and all(s.present >= s.nbytes for s in f.storages)


def _ranks_for(c: Checkpoint, p: Param, gaps: list[tuple[int, int]]) -> list[int]:
    """Ranks whose share of the param falls in the gaps (the files that would hold them)."""
    ws = c.world_size or 0
    if not ws:
        return []
    if c.stage == 3:
        share = partition.zero3_share(p.numel, ws)
        return sorted({r for a, b in gaps for r in partition.ranks_of(a, b, share, ws)})
    g = next((g for g in c.groups if g.index == p.sub_group), None)
    if g is None:
        return []
    part = partition.zero12_partition(g.numel, ws)
    start = _offset_in_group(c, g, p.name)
    return sorted({r for a, b in gaps for r in partition.ranks_of(start + a, start + b, part, ws)})


def _offset_in_group(c: Checkpoint, g, name: str) -> int:
    o = 0
    for n in g.params:
        if n == name:
            return o
        o += c.params[n].numel if n in c.params else 0
    return o
