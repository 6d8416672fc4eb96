"""Consistency checks over the metadata model. Each finding names where and what to do.

Codes are stable (tests and `--json` users rely on them); severities:
error = a merge would be wrong or incomplete; warning = it works but something is off;
info = worth knowing (what DeepSpeed's converter would have done differently, for instance).
"""

from __future__ import annotations

from collections import Counter

from zinspect.core.layouts.topology import grid_findings
from zinspect.core.model import ERROR, INFO, WARNING, Checkpoint, Finding, Param

_REPLACE = "replace it with the file saved by the same run as the others"
_STALE = "move it out of the tag dir: it is a leftover of an older run"
#: modules whose globals in a pickle mean code execution on torch.load(weights_only=False)
_UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "socket",
    "importlib", "runpy", "pty", "code", "ctypes", "pickle", "marshal", "webbrowser", "commands",
})


def validate(ckpt: Checkpoint) -> list[Finding]:
    """Append the consistency findings to `ckpt.findings` and return them all."""
    checks = _Checks(ckpt)
    checks.run()
    ckpt.findings.extend(checks.out)
    return ckpt.findings


class _Checks:
    def __init__(self, ckpt: Checkpoint) -> None:
        self.c = ckpt
        self.out: list[Finding] = []

    def add(self, severity, code, message, hint="", **where) -> None:
        self.out.append(Finding(severity, code, message, hint, **where))

    def run(self) -> None:
        c = self.c
        if not c.files:
            self.add(ERROR, "empty-tag-dir", f"the tag dir {c.path} holds no files",
                     "the save never happened or the files were moved; check the path")
            return
        self.files()
        if c.layout == "tensor_parallel":  # its own checks per tp rank's shards
            from zinspect.core.layouts import tensor_parallel
            self.out.extend(tensor_parallel.validate(c))
        if c.layout not in ("zero", "bf16_optimizer"):
            if c.layout == "unknown" and any(f.readable for f in c.files_of("optim")):
                self.add(ERROR, "unknown-layout", "the optimizer files hold neither fp32 "
                         "partitions nor a zero_stage", "these are not ZeRO optimizer files")
            return
        self.ranks()
        self.consistency()
        self.groups()
        self.params()
        self.dtypes()

    # -------------------------------------------------------------- files
    def files(self) -> None:
        for f in self.c.files:
            if f.kind == "other":
                self.add(INFO, "extra-file", f"{f.name} is not a checkpoint file; it is ignored",
                         file=f.name)
                continue
            missing = [(s.key, s.nbytes, s.present) for s in f.storages if s.present < s.nbytes]
            if missing:
                have = sum(p for _, _, p in missing)
                want = sum(n for _, n, _ in missing)
                self.add(ERROR, "truncated-file",
                         f"{f.name} is truncated: {len(missing)} tensor record(s) hold "
                         f"{have:,} of {want:,} bytes (file is {f.size:,} bytes)",
                         "the save was interrupted or the copy is incomplete; copy the file again",
                         file=f.name, rank=f.rank)
            elif f.recovered:
                self.add(WARNING, "no-zip-directory", f"{f.name} has lost its zip directory "
                         "but every tensor record is present", "copy the file again",
                         file=f.name, rank=f.rank)
            if f.format == "legacy":
                self.add(INFO, "legacy-format", f"{f.name} uses torch's legacy (non-zip) format; "
                         "DeepSpeed's converter cannot mmap it, zinspect reads it", file=f.name)
            unsafe = unsafe_pickle_finding(f.name, f.rank, f.unknown_globals)
            if unsafe:
                self.out.append(unsafe)
            other = [g for g in f.unknown_globals if not _is_unsafe(g)]
            if other:
                self.add(INFO, "unknown-classes", f"{f.name} pickles classes zinspect does not "
                         f"know ({', '.join(other[:5])}); they were recorded, "
                         "never imported or run", file=f.name, rank=f.rank)

    # -------------------------------------------------------------- rank sets
    def ranks(self) -> None:
        c = self.c
        ws = c.world_size
        optim = [f for f in c.files_of("optim") if f.mp_rank in (0, None)]
        if ws is None:
            self.add(ERROR, "world-size-unknown", "no readable optimizer file says the world size",
                     "every optimizer file is unreadable; restore them")
            return
        self._rank_set("optimizer", optim, ws)
        if c.stage == 3:
            self._rank_set("model-states", [f for f in c.files_of("model") if f.rank is not None],
                           ws)
        prefixes = Counter(f.prefix for f in optim)
        if len(prefixes) > 1:
            main = prefixes.most_common(1)[0][0]
            for f in optim:
                if f.prefix != main:
                    self.add(ERROR, "mixed-prefix", f"{f.name} has prefix {f.prefix or 'none'!r}, "
                             f"the other optimizer files {main or 'none'!r}: two runs are mixed",
                             _STALE, file=f.name, rank=f.rank)
        for f in optim:
            if not f.name.endswith("_optim_states.pt"):
                self.add(WARNING, "legacy-file-name", f"{f.name} uses the pre-0.10 name without "
                         "'_' before optim_states; DeepSpeed's converter skips it", file=f.name)

    def _rank_set(self, what: str, files, ws: int) -> None:
        self.out.extend(grid_findings(files, {"dp": ws}, what, f"missing-{what}-file",
                                      "stale-rank-file", _STALE))

    # -------------------------------------------------------------- cross-rank consistency
    def consistency(self) -> None:
        c = self.c
        optim = [f for f in c.files_of("optim") if f.readable and f.mp_rank in (0, None)]
        for f in optim:
            if f.stage is not None and f.stage != c.stage:
                self.add(ERROR, "stage-mismatch", f"{f.name} is a ZeRO-{f.stage} file, the others "
                         f"ZeRO-{c.stage}: two runs are mixed in one tag dir", _STALE,
                         file=f.name, rank=f.rank)
            elif f.partition_count and max(f.partition_count) != c.world_size:
                self.add(ERROR, "world-size-mismatch", f"{f.name} was saved with world size "
                         f"{max(f.partition_count)}, the others with {c.world_size}",
                         _REPLACE, file=f.name, rank=f.rank)
        steps = Counter(f.step for f in optim if f.step is not None)
        if len(steps) > 1:
            main = steps.most_common(1)[0][0]
            for f in optim:
                if f.step is not None and f.step != main:
                    self.add(ERROR, "step-mismatch", f"{f.name} holds the optimizer at step "
                             f"{f.step:g}, the other ranks at step {main:g}: it was saved at "
                             "another time, and its weights are not this checkpoint's",
                             "a stale file from an earlier or later save of this run; restore the "
                             "file saved with the others", file=f.name, rank=f.rank)
        versions = Counter(f.ds_version for f in optim if f.ds_version)
        if len(versions) > 1:
            main = versions.most_common(1)[0][0]
            for f in optim:
                if f.ds_version and f.ds_version != main:
                    self.add(WARNING, "ds-version-mismatch", f"{f.name} was saved by DeepSpeed "
                             f"{f.ds_version}, the others by {main}", _REPLACE,
                             file=f.name, rank=f.rank)
        dp = _dp_world_size(c)
        if dp is not None and c.world_size is not None and dp != c.world_size:
            self.add(ERROR, "world-size-mismatch", f"the model states say dp_world_size={dp}, "
                     f"the optimizer files partition_count={c.world_size}",
                     "the model-states and optimizer files come from different runs")

    # -------------------------------------------------------------- numel coverage
    def groups(self) -> None:
        c = self.c
        ws = c.world_size or 0
        for g in c.groups:
            if not g.partition_numel:
                continue
            if c.stage == 3:
                want = _zero3_rank_numel(c, g, ws)
                for r, n in sorted(g.partition_numel.items()):
                    if n != want and r < ws:
                        self.add(ERROR, "partition-size", f"group {g.index}: rank {r} holds {n:,} "
                                 f"elements, its params need exactly {want:,}", _REPLACE,
                                 rank=r, group=g.index, file=_file_of(c, r))
                continue
            # ranks >= ws are stale files, reported once by stale-rank-file
            real = {r: n - (g.padding.get(r, 0) if c.layout == "bf16_optimizer" else 0)
                    for r, n in g.partition_numel.items() if r < ws}
            held = sum(real.values())
            if len(real) == ws and held != g.numel:
                self.add(ERROR, "group-coverage", f"group {g.index}: the ranks hold {held:,} "
                         f"elements, its {len(g.params)} params need exactly {g.numel:,}",
                         "a rank file comes from another run or the param shapes do not match "
                         "the optimizer files", group=g.index)
            part = _zero12_partition(g.numel, ws)
            for r, n in sorted(real.items()):
                expect = max(0, min(part, g.numel - r * part))
                if n != expect:
                    self.add(ERROR, "partition-size", f"group {g.index}: rank {r} holds {n:,} real "
                             f"elements, expected {expect:,} for {g.numel:,} elements over "
                             f"{ws} ranks", _REPLACE, rank=r, group=g.index, file=_file_of(c, r))

    def params(self) -> None:
        c = self.c
        whole = self._whole_zero3_groups()
        frozen_whole = self._whole_zero3_model_states()
        for p in c.params.values():
            if not p.tied_to and (p.frozen and frozen_whole or
                                  not p.frozen and p.sub_group in whole):
                continue  # covered by construction; spares building millions of fragments
            if p.tied_to:
                if p.tied_to not in c.params:
                    self.add(ERROR, "tied-source-missing", f"{p.name} is tied to {p.tied_to}, "
                             "which the checkpoint does not hold", "the alias cannot be written; "
                             "exclude it or restore the rank-0 model states", param=p.name)
                continue
            if p.numel == 0:
                continue
            if not p.fragments:
                if p.frozen:
                    self.add(ERROR, "frozen-missing", f"frozen param {p.name} has no saved values "
                             "(saved with exclude_frozen_parameters?)",
                             "exclude frozen params from the merge (--exclude-frozen)", param=p.name)
                else:
                    self.add(ERROR, "param-coverage", f"{p.name}: no rank holds any of its "
                             f"{p.numel:,} elements", "restore the missing rank files", param=p.name)
                continue
            self._coverage(p)
            if p.frozen and p.fragments[0].source == "module":
                self.add(INFO, "frozen-from-module", f"frozen param {p.name} is saved only in the "
                         "16-bit module weights (ZeRO-1); zinspect recovers it, DeepSpeed's "
                         "converter drops it", param=p.name)

    def _whole_zero3_groups(self) -> set[int]:
        """ZeRO-3 sub-groups held whole by every rank: every rank's partition is present, of
        the exact size, in a file with nothing missing. Their params are fully covered."""
        c = self.c
        ws = c.world_size or 0
        if c.stage != 3 or not ws:
            return set()
        damaged = {f.rank for f in c.files_of("optim") if not f.readable or f.recovered or
                   any(s.present < s.nbytes for s in f.storages)}
        whole = set()
        for g in c.groups:
            want = _zero3_rank_numel(c, g, ws)
            if set(g.partition_numel) == set(range(ws)) and not damaged & set(g.partition_numel) \
                    and all(n == want for n in g.partition_numel.values()):
                whole.add(g.index)
        return whole

    def _whole_zero3_model_states(self) -> bool:
        """Every rank's ZeRO-3 model states present and whole: the frozen-param fragments they
        hold are then not unpickled just to be counted (the merge still checks each one)."""
        c = self.c
        files = {f.rank: f for f in c.files_of("model") if f.rank is not None}
        return c.stage == 3 and bool(c.world_size) and \
            all(r in files and files[r].readable and not files[r].recovered and
                all(s.present >= s.nbytes for s in files[r].storages)
                for r in range(c.world_size))

    def _coverage(self, p: Param) -> None:
        c = self.c
        spans = sorted((f.start, f.start + f.numel) for f in p.fragments if f.numel)
        pos, gaps = 0, []
        for lo, hi in spans:
            if lo > pos:
                gaps.append((pos, lo))
            elif lo < pos:
                self.add(ERROR, "param-overlap", f"{p.name}: elements {lo:,}..{pos:,} are held "
                         "twice", _REPLACE, param=p.name)
            pos = max(pos, hi)
        if pos < p.numel:
            gaps.append((pos, p.numel))
        if gaps:
            missing = sum(b - a for a, b in gaps)
            ranks = _ranks_for(c, p, gaps)
            self.add(ERROR, "param-coverage", f"{p.name}: {missing:,} of {p.numel:,} elements are "
                     f"held by no rank file (rank {', '.join(map(str, ranks))})"
                     if ranks else f"{p.name}: {missing:,} of {p.numel:,} elements are missing",
                     "restore the missing rank files", param=p.name,
                     rank=ranks[0] if len(ranks) == 1 else None)
        bad = [f for f in p.fragments if not f.intact and f.numel]
        if bad:
            self.add(ERROR, "param-truncated", f"{p.name}: the bytes of rank "
                     f"{', '.join(str(f.rank) for f in bad)} are not all in {bad[0].file}",
                     "that file is truncated; copy it again", param=p.name, file=bad[0].file,
                     rank=bad[0].rank)

    def dtypes(self) -> None:
        c = self.c
        if c.master_dtype and c.master_dtype != "float32":
            self.add(WARNING, "master-not-fp32", f"the optimizer masters are {c.master_dtype}, "
                     "not fp32 (bf16/fp16 master weights were enabled)",
                     "the merge writes them upcast to fp32; no more precision exists")
        ints = [b.name for b in c.buffers.values() if b.dtype.startswith(("int", "uint", "bool"))]
        if ints:
            self.add(INFO, "int-buffers", f"{len(ints)} integer buffer(s) ({', '.join(ints[:3])}"
                     f"{'...' if len(ints) > 3 else ''}) keep their dtype; DeepSpeed's converter "
                     "casts them to float")
        zo = c.ds_config.get("zero_optimization") if isinstance(c.ds_config, dict) else None
        if isinstance(zo, dict) and zo.get("round_robin_gradients"):
            self.add(INFO, "round-robin", "round_robin_gradients is on: flat groups follow the "
                     "round-robin order of param_shapes (handled)")


def _dp_world_size(c: Checkpoint) -> int | None:
    for f in c.files_of("model"):
        if f.readable and f.dp_world_size is not None:
            return f.dp_world_size
    return None


def unsafe_pickle_finding(name: str, rank: int | None, globals_: list[str]) -> Finding | None:
    """The error for a rank file whose pickle names code that torch.load would run."""
    unsafe = [g for g in globals_ if _is_unsafe(g)]
    if not unsafe:
        return None
    return Finding(ERROR, "unsafe-pickle", f"{name} names {', '.join(unsafe[:5])} in its pickle: "
                   "torch.load(weights_only=False), as DeepSpeed and zero_to_fp32.py load it, "
                   "would run that code; zinspect did not",
                   "do not load this file with torch or DeepSpeed: it was tampered with or is "
                   "not a checkpoint; get the checkpoint again from a source you trust",
                   file=name, rank=rank)


def _is_unsafe(qualname: str) -> bool:
    return qualname.split(".", 1)[0] in _UNSAFE_MODULES


def _file_of(c: Checkpoint, rank: int) -> str | None:
    return next((f.name for f in c.files_of("optim") if f.rank == rank), None)


def _zero3_rank_numel(c: Checkpoint, g, ws: int) -> int:
    """ZeRO-3: each param of a sub-group puts ceil(numel / ws) elements in every rank's part."""
    return sum(-(-c.params[n].numel // ws) for n in g.params if n in c.params)


def _zero12_partition(numel: int, ws: int) -> int:
    """ZeRO-1/2: a flat group is padded to a multiple of 2*ws and cut into ws equal parts."""
    return -(-numel // (2 * ws)) * 2 if ws else 0


def _ranks_for(c: Checkpoint, p: Param, gaps: list[tuple[int, int]]) -> list[int]:
    """Ranks whose share of the param falls in the gaps (the files that would hold them)."""
    ws = c.world_size or 0
    if not ws:
        return []
    if c.stage == 3:
        part = -(-p.numel // ws)
        return sorted({r for a, b in gaps for r in range(a // part, (b - 1) // part + 1)})
    g = next((g for g in c.groups if g.index == p.sub_group), None)
    if g is None:
        return []
    part = _zero12_partition(g.numel, ws)
    start = _offset_in_group(c, g, p.name)
    return sorted({r for a, b in gaps for r in range((start + a) // part,
                                                      (start + b - 1) // part + 1) if r < ws})


def _offset_in_group(c: Checkpoint, g, name: str) -> int:
    o = 0
    for n in g.params:
        if n == name:
            return o
        o += c.params[n].numel if n in c.params else 0
    return o
