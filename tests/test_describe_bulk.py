"""`params.places`: each module name's place in the flat groups' names, found without a dict of
every name when the module interleaves the groups (each group's names in its own order), by a
dict otherwise; the same answer as the plain definition for any names and groups, forged ones
included (a name twice, in no group, missing, a group's names out of order)."""

from __future__ import annotations

import random
from itertools import chain, count

import pytest

from zinspect.core.params import places


def _plain(names: list, groups: list[list]) -> list[int] | None:
    """The definition: each name's place in the groups' names, when they are the same names,
    each once ([] when `names` is that list)."""
    flat = list(chain.from_iterable(groups))
    at = dict(zip(flat, count()))
    order = [at.get(n) for n in names]
    if len(names) != len(flat) or len(at) != len(flat) or None in order:
        return None
    return [] if names == flat else order


def _interleaved(rng: random.Random, groups: list[list]) -> list:
    """The groups' names merged in a random interleaving, each group's in its own order."""
    turns = [iter(g) for g in groups]
    picks = list(chain.from_iterable([i] * len(g) for i, g in enumerate(groups)))
    rng.shuffle(picks)
    return [next(turns[i]) for i in picks]


def _forged(rng: random.Random, names: list, groups: list[list], how: str):
    groups = [list(g) for g in groups]
    names = list(names)
    g = rng.choice([g for g in groups if g])
    if how == "swap in a group" and len(g) > 1:
        i, j = rng.sample(range(len(g)), 2)
        g[i], g[j] = g[j], g[i]
    elif how == "shuffled":
        rng.shuffle(names)
    elif how == "a name in two groups":
        rng.choice(groups).append(rng.choice(names))
        names.append("extra.weight")
    elif how == "a name twice in a group":
        g.insert(rng.randrange(len(g) + 1), rng.choice(g))
        names.append("extra.weight")
    elif how == "a name in no group":
        names[rng.randrange(len(names))] = "stray.weight"
    elif how == "a group name not in the module":
        g[rng.randrange(len(g))] = "ghost.weight"
    elif how == "one name fewer":
        names.pop(rng.randrange(len(names)))
    elif how == "an int name":
        names[rng.randrange(len(names))] = 7
    elif how == "equal, not the same strings":
        names = ["".join(n) for n in names]
    return names, groups


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_places_is_the_plain_definition(k):
    rng = random.Random(k)
    hows = ["", "swap in a group", "shuffled", "a name in two groups", "a name twice in a group",
            "a name in no group", "a group name not in the module", "one name fewer",
            "an int name", "equal, not the same strings"]
    seen = set()
    for trial in range(300):
        sizes = [rng.randrange(0 if k > 1 else 1, 9) for _ in range(k)]
        it = count()
        groups = [[f"layer.{next(it)}.w" for _ in range(n)] for n in sizes]
        names = _interleaved(rng, groups) if trial % 4 else list(chain.from_iterable(groups))
        if not names:
            continue
        names, groups = _forged(rng, names, groups, hows[trial % len(hows)])
        if len(set(names)) != len(names):
            continue  # (names are a dict's keys)
        got, want = places(names, groups), _plain(names, groups)
        assert got == want, (names, groups)
        seen.add("none" if want is None else "in order" if not want else "placed")
    assert seen == {"none", "in order", "placed"}


def test_a_group_out_of_the_module_order_is_placed_by_the_dict():
    groups = [["a", "b", "c"], ["x", "y"]]
    assert places(["x", "c", "a", "y", "b"], groups) == [3, 2, 0, 4, 1]
    assert places(["a", "x", "b", "y", "c"], groups) == [0, 3, 1, 4, 2]  # interleaved
    assert places(["a", "b", "c", "x", "y"], groups) == []
    assert places(["a", "x", "b", "y", "q"], groups) is None
    assert places(["a", "x", "b", "y"], groups) is None


def test_zero3_shares_are_zero3_share_of_each():
    """`partition.zero3_shares` (two C passes for a world size) against `zero3_share` one by
    one: sizes around multiples of the world size, 0, large ones, and forged world sizes."""
    from zinspect.core.partition import zero3_share, zero3_shares

    rng = random.Random(3)
    numels = [0, 1, 2**48, 2**48 - 1, *range(40), *(rng.randrange(2**40) for _ in range(200))]
    for ws in (1, 2, 3, 7, 8, 64, 512, 0, -1, -8):
        assert zero3_shares(numels, ws) == [zero3_share(n, ws) for n in numels], ws


def test_validate_takes_the_shares_the_layout_cut():
    """A ZeRO-3 group's shares, cut by `zero3.attach_columns` over the world size, are what
    validate sums (`params.shares_of`), the same as cut again from the numels; another world
    size, a dict of Params or a Param made of the group: none (validate cuts them itself)."""
    from conftest import FIXTURES

    from zinspect.core import open_checkpoint
    from zinspect.core.params import ParamTable, numels_of, shares_of
    from zinspect.core.partition import zero3_shares

    ckpt = open_checkpoint(FIXTURES / "s3_w2_bf16_plain")
    params, ws = ckpt.params, ckpt.world_size
    assert type(params) is ParamTable and ckpt.groups
    for g in ckpt.groups:
        got = shares_of(params, g.params, ws)
        assert got is not None and got == zero3_shares(numels_of(params, g.params), ws)
        assert shares_of(params, g.params, ws + 1) is None
    first, last = ckpt.groups[0].params, ckpt.groups[-1].params
    params[first[0]]  # a Param made: it may be changed, the columns not
    assert shares_of(params, first, ws) is None
    assert len(ckpt.groups) > 1 and shares_of(params, last, ws) is not None
    assert shares_of(dict(params.items()), last, ws) is None


@pytest.mark.parametrize("layout", ["interleaved", "in order", "out of order"])
def test_numel_and_group_columns_from_the_joined_groups(layout):
    """A table's numel column is its joined groups' numels put in model order (the group and
    sub-group columns likewise), the same as each shape's product; a group not joined: from
    the shapes, and no group for its names."""
    import math

    from zinspect.core.params import ParamTable, column

    shapes = {"a": (3,), "b": (2, 2), "c": (5, 7), "d": (1,), "e": (4, 4, 2)}
    groups = [["a", "b", "c"], ["d", "e"]]
    names = {"interleaved": ["a", "d", "b", "c", "e"], "in order": ["a", "b", "c", "d", "e"],
             "out of order": ["e", "c", "a", "d", "b"]}[layout]
    for joined in (2, 1):
        t = ParamTable(names, [shapes[n] for n in names], [""] * 5, groups)
        for gi, g in enumerate(groups[:joined]):
            numels = [math.prod(shapes[n]) for n in g]
            assert t.join(gi, 10 + gi, g, numels, [-(-x // 2) for x in numels],
                          lambda o, n, P: [], 2)
        assert column(t, "numel") == [math.prod(shapes[n]) for n in names]
        want = {n: gi for gi, g in enumerate(groups[:joined]) for n in g}
        assert column(t, "sub_group") == [want.get(n) for n in names]
        assert column(t, "group") == [None if n not in want else 10 + want[n] for n in names]
        assert t.pristine
