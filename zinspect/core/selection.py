"""What a merge leaves out: names, glob patterns and "all frozen params".

Saved as a small JSON file that the app writes and `zinspect merge --selection FILE` reads:

    {"zinspect_selection": 1, "exclude": ["encoder.frozen_proj.weight"],
     "exclude_globs": ["head.*"], "exclude_frozen": false}
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.model import Checkpoint
from zinspect.errors import UsageError

FORMAT_VERSION = 1


@dataclass
class Selection:
    exclude: set[str] = field(default_factory=set)
    exclude_globs: list[str] = field(default_factory=list)
    exclude_frozen: bool = False

    def excluded(self, ckpt: Checkpoint) -> set[str]:
        """Names (params and buffers) that the merge will leave out."""
        out = set()
        for name in list(ckpt.params) + list(ckpt.buffers):
            p = ckpt.params.get(name)
            if name in self.exclude or any(fnmatch.fnmatchcase(name, g) for g in self.exclude_globs):
                out.add(name)
            elif self.exclude_frozen and p is not None and p.frozen:
                out.add(name)
        return out

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
        exclude, globs = data.get("exclude", []), data.get("exclude_globs", [])
        frozen = data.get("exclude_frozen", False)
        for key, value in (("exclude", exclude), ("exclude_globs", globs)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{path}: {key!r} must be a list of strings", _EXPECTED)
        if not isinstance(frozen, bool):
            raise UsageError(f"{path}: 'exclude_frozen' must be true or false", _EXPECTED)
        return cls(set(exclude), globs, frozen)


_EXPECTED = ('save a selection from the app (key s) or write {"exclude": ["name", ...], '
             '"exclude_globs": ["pattern", ...], "exclude_frozen": false}')
