"""What a merge leaves out: names, glob patterns and "all frozen params".

Saved as a small JSON file that the app writes and `zinspect merge --selection FILE` reads:

    {"zinspect_selection": 1, "exclude": ["encoder.frozen_proj.weight"],
     "exclude_globs": ["head.*"], "exclude_frozen": false}
"""

from __future__ import annotations

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

    def toggle(self, names: list[str]) -> bool:
        """Exclude all of `names`, or include them all again when all are excluded already.
        Returns True when they end up excluded."""
        if all(n in self.exclude for n in names):
            self.exclude.difference_update(names)
            return False
        self.exclude.update(names)
        return True

    def to_json(self) -> dict:
        return {"zinspect_selection": FORMAT_VERSION, "exclude": sorted(self.exclude),
                "exclude_globs": list(self.exclude_globs), "exclude_frozen": self.exclude_frozen}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"{path}: cannot read the selection file ({e.strerror})",
                             "check the path") from e
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not a JSON selection file ({e})",
                             "save a selection from the app (key s) or write "
                             '{"exclude": ["name", ...]}') from e
        if not isinstance(data, dict) or not isinstance(data.get("exclude", []), list):
            raise UsageError(f"{path}: not a zinspect selection file",
                             'expected {"exclude": ["name", ...]}')
        return cls(set(map(str, data.get("exclude", []))),
                   [str(g) for g in data.get("exclude_globs", [])],
                   bool(data.get("exclude_frozen", False)))
