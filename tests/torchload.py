"""torch.load of DeepSpeed rank files where DeepSpeed is not installed (the tests' venv): its
classes become plain objects that keep their pickled attributes (the loss scaler's
cur_scale...); the tensors load as torch tensors. The reference side of tests that check what
zinspect reads against what torch reads."""

from __future__ import annotations

import pickle

import torch


class DeepSpeedStubs:
    """A pickle module for torch.load: deepspeed.* globals become attribute-keeping stubs."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("deepspeed"):
                return type(name, (), {"__init__": lambda self, *a, **k: None})
            return super().find_class(module, name)

    load = pickle.load


def torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=DeepSpeedStubs)
