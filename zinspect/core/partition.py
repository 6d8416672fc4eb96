"""ZeRO's partition arithmetic, once (load, validate and the app all ask these questions).

* ZeRO-1/2 (and BF16_Optimizer): a flat group of `numel` elements is padded to a multiple of
  2*ws and cut into ws equal partitions; flat element e lives on rank e // P at index e % P.
* ZeRO-3: each param of n elements puts ceil(n / ws) elements in every rank's partition (the last
  ranks padded), and a rank's pieces are concatenated in its flat group.
"""

from __future__ import annotations


def zero12_partition(numel: int, ws: int) -> int:
    """P, the elements of each rank's partition of a ZeRO-1/2 flat group (padding included)."""
    return -(-numel // (2 * ws)) * 2 if ws else 0


def zero12_real(numel: int, ws: int, rank: int) -> int:
    """The real (unpadded) elements that `rank` holds of a ZeRO-1/2 flat group."""
    part = zero12_partition(numel, ws)
    return max(0, min(part, numel - rank * part))


def zero3_share(numel: int, ws: int) -> int:
    """The elements of one ZeRO-3 param in every rank's partition: ceil(numel / ws)."""
    return -(-numel // ws) if ws else 0


def zero3_held(numel: int, ws: int, rank: int) -> int:
    """The real elements of a ZeRO-3 param on `rank` (the rest of its share is padding)."""
    share = zero3_share(numel, ws)
    return max(0, min(numel - rank * share, share))


def ranks_of(start: int, stop: int, part: int, ws: int) -> range:
    """The ranks whose partitions of `part` elements hold flat elements [start, stop)."""
    if not part or stop <= start:
        return range(0)
    return range(start // part, min((stop - 1) // part, ws - 1) + 1)
