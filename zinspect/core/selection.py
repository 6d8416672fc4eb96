"""What a merge leaves out: names, glob patterns and "all frozen params".

Saved as a small JSON file that the app writes and `zinspect merge --selection FILE` reads:

    {"zinspect_selection": 1, "exclude": ["encoder.frozen_proj.weight"],
     "exclude_globs": ["head.*"], "exclude_frozen": false}

Globs are matched as users write them: a pattern with a dot is matched against the whole name
(`head.*`, `*.lora_A.*`); one without a dot against each dotted component too, so `lora_*`
matches `base_model.model.h.0.attn.c_attn.lora_A.default.weight`. A pattern or a name that
matches nothing is an error (`check_matches`): a typo must not silently write everything.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from itertools import chain, compress, islice, repeat
from pathlib import Path

from zinspect.core.model import Checkpoint
from zinspect.core.params import column
from zinspect.errors import UsageError

FORMAT_VERSION = 1


@dataclass
class Selection:
    exclude: set[str] = field(default_factory=set)
    exclude_globs: list[str] = field(default_factory=list)
    exclude_frozen: bool = False

    def excluded(self, ckpt: Checkpoint) -> set[str]:
        """Names (params and buffers) that the merge will leave out. Read from the params'
        columns (`core.params.column`): no Param is made for a name (300k at 300k names)."""
        params, buffers = ckpt.params, ckpt.buffers
        out = {n for n in self.exclude if n in params or n in buffers}
        if not self.exclude_globs and not self.exclude_frozen:  # names only: no pass over all
            return out
        names = column(params, "name")
        if self.exclude_frozen:
            out.update(compress(names, column(params, "frozen")))
        everything = names + list(buffers)
        for g in self.exclude_globs:
            out.update(matching(g, everything))
        return out

    def unmatched(self, ckpt: Checkpoint) -> list[str]:
        """The names and patterns that match no param or buffer of `ckpt`."""
        names = column(ckpt.params, "name") + list(ckpt.buffers)
        known = set(names)
        missing = [n for n in sorted(self.exclude) if n not in known]
        return missing + [g for g in self.exclude_globs if not matching(g, names, first=True)]

    def check_matches(self, ckpt: Checkpoint) -> None:
        """Raises UsageError naming every name or pattern that matches nothing."""
        missing = self.unmatched(ckpt)
        if missing:
            shown = ", ".join(repr(m)[:80] for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UsageError(f"{ckpt.path}: {len(missing)} exclusion(s) match no param or buffer: "
                             f"{shown}", "run `zinspect info PATH --json` to see the names; a "
                             "pattern without a dot matches any part of a name (lora_*), one "
                             "with a dot the whole name (*.lora_A.*)")

    def to_json(self) -> dict:
        return {"zinspect_selection": FORMAT_VERSION, "exclude": sorted(self.exclude),
                "exclude_globs": list(self.exclude_globs), "exclude_frozen": self.exclude_frozen}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temp file beside it, then a rename). Raises OSError."""
        path = Path(path)
        if not path.name or path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory; give a file name", str(path))
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"{path}: cannot read the selection file ({e.strerror or e})",
                             "check the path") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not a JSON selection file ({e})"[:300], _EXPECTED) from e
        if not isinstance(data, dict):
            raise UsageError(f"{path}: not a zinspect selection file", _EXPECTED)
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise UsageError(f"{path}: unknown key(s) {', '.join(repr(k)[:40] for k in unknown[:5])}"
                             " in the selection file", _EXPECTED)
        if data.get("zinspect_selection", FORMAT_VERSION) != FORMAT_VERSION:
            raise UsageError(f"{path}: selection format {data['zinspect_selection']!r:.20} is not "
                             f"{FORMAT_VERSION}", "save the selection again with this zinspect")
        exclude, globs = data.get("exclude", []), data.get("exclude_globs", [])
        frozen = data.get("exclude_frozen", False)
        for key, value in (("exclude", exclude), ("exclude_globs", globs)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{path}: {key!r} must be a list of strings", _EXPECTED)
        if not isinstance(frozen, bool):
            raise UsageError(f"{path}: 'exclude_frozen' must be true or false", _EXPECTED)
        return cls(set(exclude), globs, frozen)


def matching(pattern: str, names: list[str], first: bool = False) -> list[str]:
    """The names `pattern` matches (`first`: the first one only): against the whole name, and,
    for a pattern without a dot, each dotted component (each distinct one matched once: 300k
    names hold a few thousand)."""
    whole = re.compile(fnmatch.translate(pattern)).match  # what fnmatch.fnmatchcase runs
    if "." in pattern:
        hits = filter(whole, names)
    else:  # (split twice, each list freed at once: 300k lists kept would wake the collector)
        found = set(filter(whole, set(chain.from_iterable(map(str.split, names, repeat("."))))))
        hits = (n for n in names if whole(n) or not found.isdisjoint(n.split(".")))
    return list(islice(hits, 1) if first else hits)


_KEYS = {"zinspect_selection", "exclude", "exclude_globs", "exclude_frozen"}
_EXPECTED = ('save a selection from the app (key s) or write {"exclude": ["name", ...], '
             '"exclude_globs": ["pattern", ...], "exclude_frozen": false}')
