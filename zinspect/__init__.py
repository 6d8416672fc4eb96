"""zinspect: look inside DeepSpeed ZeRO checkpoints; browse, validate and merge them to fp32.

The public API is loaded on first use, so `import zinspect` stays cheap and imports neither
torch, textual nor rich:

    import zinspect
    ckpt = zinspect.open_checkpoint("checkpoints/")          # metadata only, validated
    state = zinspect.get_fp32_state_dict("checkpoints/")     # {name: fp32 tensor} (needs torch)
    zinspect.load_into(model, "checkpoints/")
    zinspect.merge("checkpoints/", "merged/")
    zinspect.reshard("checkpoints/", "ckpt_ws8/", world_size=8)
"""

from __future__ import annotations

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_LAZY = {
    "open_checkpoint": "zinspect.core",
    "get_fp32_state_dict": "zinspect.api",
    "load_into": "zinspect.api",
    "merge": "zinspect.api",
    "reshard": "zinspect.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zinspect' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
