"""DeepSpeed's order of the params in a ZeRO-1/2 flat group and its records of where they lie."""

from __future__ import annotations

from zinspect.core.torchzip import Opaque

FRAGMENT_ADDRESS = "deepspeed.utils.tensor_fragment.fragment_address"


def round_robin(items: list, n: int) -> list:
    """DeepSpeed's `_round_robin_reorder`: items i % n == 0 first, then 1, ..."""
    return [items[i] for j in range(n) for i in range(j, len(items), n)]


def undo_round_robin(items: list, n: int) -> list:
    order = round_robin(list(range(len(items))), n)
    out = [None] * len(items)
    for pos, i in enumerate(order):
        out[i] = items[pos]
    return out


def address(numel: int, start: int) -> Opaque:
    """A `fragment_address(numel, start)` record, as DeepSpeed pickles its slice mappings."""
    cls = type("fragment_address", (Opaque,), {"qualname": FRAGMENT_ADDRESS})
    rec = cls()
    rec.state = {"numel": numel, "start": start}
    return rec
