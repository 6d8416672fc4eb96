"""ZeRO's partition arithmetic, once (load, validate and the app all ask these questions).

* ZeRO-1/2 (and BF16_Optimizer): a flat group of `numel` elements is padded to a multiple of
  2*ws and cut into ws equal partitions; flat element e lives on rank e // P at index e % P.
* ZeRO-3: each param of n elements puts ceil(n / ws) elements in every rank's partition (the last
  ranks padded), and a rank's pieces are concatenated in its flat group.
"""

from __future__ import annotations

from itertools import repeat
from operator import add, floordiv, neg


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


def zero3_shares(numels: list[int], ws: int) -> list[int]:
    """`zero3_share` of each of `numels` (at C speed: 300k params per group; for a world size,
    ceil(n / ws) is (n + ws - 1) // ws: two passes instead of three)."""
    if ws > 0:
        return list(map(floordiv, map(add, numels, repeat(ws - 1)), repeat(ws)))
    return list(map(neg, map(floordiv, map(neg, numels), repeat(ws)))) if ws else \
        [0] * len(numels)


def zero3_group_numel(numels: list[int], ws: int) -> int:
    """The elements of each rank's partition of a ZeRO-3 sub-group of params of `numels`."""
    return sum(zero3_shares(numels, ws))


def zero3_share_off(members: list[tuple[str, int]], ws: int, off: int) -> str | None:
    """Every rank's ZeRO-3 partition is `off` elements shorter (negative: longer) than the
    declared shapes of `members` [(name, numel)] need: the param whose share accounts for it
    with the smallest change of its element count, when exactly one does (else None)."""
    cost = {}
    for name, n in members:
        target = zero3_share(n, ws) - off  # the share it would need
        if target < 0:
            continue
        lo, hi = (ws * (target - 1) + 1, ws * target) if target else (0, 0)
        cost[name] = lo - n if n < lo else n - hi if n > hi else 0
    ranked = sorted(cost.values())
    if not ranked or (len(ranked) > 1 and ranked[0] == ranked[1]):
        return None
    return next(name for name, c in cost.items() if c == ranked[0])
