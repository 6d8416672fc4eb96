"""Checks of each rank file on its own (before any cross-file consistency): files that are not
checkpoint files, stray files of another layout, truncated or recovered zips, the legacy format,
pickles naming code that torch.load would run."""

from __future__ import annotations

from zinspect.core import codes
from zinspect.core.layouts.gaps import stale
from zinspect.core.model import Checkpoint, Finding

_STRAY = {"layer": ("pipeline", "a pipeline layer file"), "expert": ("moe", "an MoE expert file"),
          "expert_optim": ("moe", "an MoE expert optimizer file")}
#: modules whose globals in a pickle mean code execution on torch.load(weights_only=False)
_UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "socket",
    "importlib", "runpy", "pty", "code", "ctypes", "pickle", "marshal", "webbrowser", "commands",
})


def file_findings(ckpt: Checkpoint) -> list[Finding]:
    """What each file is on its own: extra, stray, truncated, recovered, legacy, unsafe."""
    out: list[Finding] = []

    def add(code: str, message: str, hint: str = "", **where) -> None:
        out.append(codes.finding(code, message, hint, **where))

    for f in ckpt.files:
        if f.kind == "other":
            add("extra-file", f"{f.name} is not a checkpoint file; it is ignored",
                file=f.name)
            continue
        stray = _STRAY.get(f.kind)
        if stray and not ckpt.layout.startswith(stray[0]):  # pipeline_tp has layer files too
            stale(add, f, f"it is {stray[1]}, and this is not a {stray[0]} run")
        missing = [(s.key, s.nbytes, s.present) for s in f.storages if s.present < s.nbytes]
        if missing:
            have = sum(p for _, _, p in missing)
            want = sum(n for _, n, _ in missing)
            add("truncated-file",
                f"{f.name} is truncated: {len(missing)} tensor record(s) hold "
                f"{have:,} of {want:,} bytes (file is {f.size:,} bytes)",
                "the save was interrupted or the copy is incomplete; copy the file again",
                file=f.name, rank=f.rank)
        elif f.recovered:
            add("no-zip-directory", f"{f.name} has lost its zip directory "
                "but every tensor record is present", "copy the file again",
                file=f.name, rank=f.rank)
        if f.format == "legacy":
            add("legacy-format", f"{f.name} uses torch's legacy (non-zip) format; "
                "DeepSpeed's converter cannot mmap it, zinspect reads it", file=f.name)
        unsafe = unsafe_pickle_finding(f.name, f.rank, f.unknown_globals)
        if unsafe:
            out.append(unsafe)
        other = [g for g in f.unknown_globals if not _is_unsafe(g)]
        if other:
            add("unknown-classes", f"{f.name} pickles classes zinspect does not "
                f"know ({', '.join(other[:5])}); they were recorded, "
                "never imported or run", file=f.name, rank=f.rank)
    return out


def unsafe_pickle_finding(name: str, rank: int | None, globals_: list[str]) -> Finding | None:
    """The error for a rank file whose pickle names code that torch.load would run."""
    unsafe = [g for g in globals_ if _is_unsafe(g)]
    if not unsafe:
        return None
    return codes.finding("unsafe-pickle", f"{name} names {', '.join(unsafe[:5])} in its pickle: "
                         "torch.load(weights_only=False), as DeepSpeed and zero_to_fp32.py load it, "
                         "would run that code; zinspect did not",
                         "do not load this file with torch or DeepSpeed: it was tampered with or "
                         "is not a checkpoint; get the checkpoint again from a source you trust",
                         file=name, rank=rank)


def _is_unsafe(qualname: str) -> bool:
    return qualname.split(".", 1)[0] in _UNSAFE_MODULES
