"""Find the tag dir a path means, and say what each file in it is from its name alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zinspect.core.model import Coords
from zinspect.errors import CheckpointNotFound

_OPTIM = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
_Z3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_EXPERT = re.compile(r"^(?:layer_(\d+)_)?expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_OPTIM = re.compile(r"^expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")


@dataclass
class NamedFile:
    """What a file name says: its kind and, for rank files, its ranks and coordinates.

    `coords` are what the name alone says: `dp` = the zero_pp_rank / expp_rank number, `tp` =
    the mp_rank number (a pipeline layout, whose mp_rank counts stages, moves it to `pp`),
    `layer` and `expert` from layer/expert file names."""

    path: Path
    kind: str  # optim, model, expert, expert_optim, layer, offload, universal, other
    rank: int | None = None
    mp_rank: int | None = None
    prefix: str = ""
    coords: Coords = Coords()


def classify(path: Path) -> NamedFile:
    """From the name alone; a rank-file name is a rank file whatever it is on disk (a directory,
    a FIFO, a dangling link...), so that what it is can be reported (`file_kind`)."""
    name = path.name
    if name in ("offloaded_tensors", "zero") and path.is_dir():
        return NamedFile(path, "offload" if name == "offloaded_tensors" else "universal")
    if m := _OPTIM.match(name):
        return _ranked(path, "optim", int(m[2]), int(m[3]), m[1] or "")
    if m := _Z3_MODEL.match(name):
        return _ranked(path, "model", int(m[1]), int(m[2]))
    if m := _MODEL.match(name):
        return _ranked(path, "model", None, int(m[1]))
    if m := _EXPERT.match(name):
        return _ranked(path, "expert", None, int(m[3]), layer=_int(m[1]), expert=int(m[2]))
    if m := _EXPERT_OPTIM.match(name):
        return _ranked(path, "expert_optim", int(m[1]), int(m[2]))
    if m := _LAYER.match(name):
        return _ranked(path, "layer", None, _int(m[2]) or 0, layer=int(m[1]))
    return NamedFile(path, "other")


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _ranked(path: Path, kind: str, rank: int | None, mp_rank: int, prefix: str = "",
            layer: int | None = None, expert: int | None = None) -> NamedFile:
    return NamedFile(path, kind, rank, mp_rank, prefix,
                     Coords(dp=rank or 0, tp=mp_rank, layer=layer, expert=expert))


def _is_tag_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(
            e.name.endswith("_states.pt") or e.name == "zero" for e in path.iterdir())
    except OSError:
        return False


def _tag_dirs(root: Path) -> list[str]:
    try:
        return sorted((p.name for p in root.iterdir() if _is_tag_dir(p)), key=_natural)
    except OSError:
        return []


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


#: `latest` holds one dir name; anything longer is not DeepSpeed's (and is never echoed whole)
LATEST_MAX_BYTES = 255


def _bad_tag_name(raw: bytes, named: str) -> str | None:
    """Why `latest` does not name a tag dir directly inside the root, or None. It is never
    followed elsewhere: `../other`, `/abs/path` and `a/b` would validate a decoy directory."""
    if len(raw) > LATEST_MAX_BYTES:
        return f"is longer than {LATEST_MAX_BYTES} bytes"
    if "\ufffd" in named:
        return "is not UTF-8 text"
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in named):
        return "holds control characters"
    if "/" in named or "\\" in named or named in (".", ".."):
        return "does not name a directory directly inside the checkpoint dir"
    return None


def file_kind(path: Path) -> str | None:
    """None for a regular file (or a link to one); else what it is, for a rank-file name that
    must never be opened: 'a FIFO', 'a directory', 'a dangling symbolic link', ..."""
    import errno
    import stat

    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if path.is_symlink():
            return "a dangling symbolic link"
        return f"a file that cannot be examined ({e.strerror})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device"
            if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    if path.is_symlink():
        return f"a symbolic link to {what}"
    return what


@dataclass
class Location:
    tag_dir: Path
    tag: str
    root: Path | None  # dir holding `latest`/the tag dirs, if any
    tags: list[str]  # every tag dir under root


def locate(path: str | Path, tag: str | None = None) -> Location:
    """Resolve PATH (a tag dir, or the dir holding `latest`) and an optional --tag."""
    path = Path(path).expanduser()
    try:
        return _locate(path, tag)
    except OSError as e:  # e.g. a dir without read or search permission
        raise CheckpointNotFound(f"{e.filename or path}: cannot be read ({e.strerror or e})",
                                 "check the permissions (chmod +rx on directories)") from e


def _locate(path: Path, tag: str | None) -> Location:
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such file or directory",
                                 "give the checkpoint dir (holding `latest`) or a tag dir")
    if path.is_file():
        raise CheckpointNotFound(
            f"{path}: is a file, not a checkpoint directory",
            f"give the directory that holds it: {path.parent}")
    if tag is not None:
        tag_dir = path / tag
        if not tag_dir.is_dir():
            tags = _tag_dirs(path)
            raise CheckpointNotFound(
                f"{path}: has no tag dir {tag!r}",
                f"tags found: {', '.join(tags)}" if tags else "check the path and the tag")
        return Location(tag_dir, tag, path, _tag_dirs(path))
    if _is_tag_dir(path):
        root = path.parent
        return Location(path, path.name, root, _tag_dirs(root))
    tags = _tag_dirs(path)
    latest = path / "latest"
    if latest.is_file():
        try:
            with open(latest, "rb") as f:
                raw = f.read(LATEST_MAX_BYTES + 1)
        except OSError as e:
            raise CheckpointNotFound(f"{latest}: cannot be read ({e.strerror})",
                                     "check its permissions, or pass --tag") from e
        named = raw.decode("utf-8", errors="replace").strip()
        problem = _bad_tag_name(raw, named)
        if problem:
            from zinspect.core.fmt import shown

            raise CheckpointNotFound(
                f"{latest}: {problem}: it holds {shown(repr(named), 80)}; a tag dir inside "
                f"{path} was expected", f"pass --tag with one of: {', '.join(tags)}" if tags
                else "write the tag dir's name into `latest`, or open the tag dir itself")
        if named and (path / named).is_dir():
            return Location(path / named, named, path, tags)
        hint = (f"pass --tag with one of: {', '.join(tags)}" if tags
                else "the tag dirs are missing too; check that the copy is complete")
        raise CheckpointNotFound(f"{latest}: names tag {named!r}, but {path / named} does not exist",
                                 hint)
    if len(tags) == 1:
        return Location(path / tags[0], tags[0], path, tags)
    if len(tags) > 1:
        raise CheckpointNotFound(f"{path}: has no `latest` file and {len(tags)} tag dirs",
                                 f"pick one with --tag: {', '.join(tags)}")
    nested = [p.name for p in sorted(path.iterdir()) if p.is_dir() and (p / "latest").is_file()]
    if nested:
        raise CheckpointNotFound(f"{path}: holds several checkpoints, not one",
                                 f"open one of: {', '.join(nested)}")
    raise CheckpointNotFound(
        f"{path}: no DeepSpeed checkpoint here (no `latest` file, no *_states.pt files)",
        "give the dir that DeepSpeed's save_checkpoint wrote, or its global_stepN/ subdir")
