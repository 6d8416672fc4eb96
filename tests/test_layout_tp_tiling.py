"""How the tp shards are checked to tile a param (tp_rules.tiling_problem) and placed once per
split rule and shard shapes (tensor_parallel._by_rule): the fast paths give exactly what the
plain walks give. The interval proof (`_intervals_apart`) must never pass pieces that overlap,
must be the path every pattern-made split takes (else a 70B pipeline x tp checkpoint pays
n^2 pairs per param), and on any doubt the pairwise walk names the same pair as before."""

from __future__ import annotations

import random
from unittest import mock

import pytest

from zinspect.core.layouts import tensor_parallel as T
from zinspect.core.layouts import tp_rules as R


def pairwise_problem(geo: R.Geometry, shards: dict) -> str | None:
    """tiling_problem as it was before the interval proof: every pair of pieces compared."""
    with mock.patch.object(R, "_intervals_apart", return_value=False):
        return R.tiling_problem(geo, shards)


def random_geometry(rng: random.Random) -> tuple[R.Geometry, dict]:
    """Pieces of a small tensor, most whole on every dim but the first (as the rules cut them),
    some anywhere, some empty; every piece fits its full tensor and its shard."""
    dims = rng.randint(1, 3)
    shape = tuple(rng.randint(1, 6) for _ in range(dims))
    pieces: dict[int, list] = {}
    for t in range(rng.randint(1, 4)):
        pieces[t] = []
        for _ in range(rng.randint(0, 3)):
            at, sizes = [], []
            for d in range(dims):
                if d and rng.random() < 0.8:
                    at.append(0)
                    sizes.append(shape[d])
                else:
                    o = rng.randint(0, shape[d])
                    at.append(o)
                    sizes.append(rng.randint(0, shape[d] - o))
            pieces[t].append(((0,) * dims, tuple(at), tuple(sizes)))
    shards = {t: tuple(max([p[2][d] for p in ps] or [0]) for d in range(dims)) for t, ps in pieces.items()}
    return R.Geometry(shape, pieces, replicated=rng.random() < 0.1), shards


def test_tiling_problem_says_what_the_pairwise_walk_says_on_random_pieces():
    rng = random.Random(20261205)
    tiled = 0
    for _ in range(20000):
        geo, shards = random_geometry(rng)
        want = pairwise_problem(geo, shards)
        assert R.tiling_problem(geo, shards) == want, (geo, shards)
        tiled += want is None
    assert tiled > 500  # the exact tilings, the path that must be fast, are well represented


@pytest.mark.parametrize("rule", [R.Rule(R.COLUMN, 0), R.Rule(R.ROW, 1), R.Rule(R.TWO_SUB_PARAMS, 0),
                                  R.Rule(R.SUB_PARAMS, 0, sub_sizes=(24, 8, 8), widths=((6,) * 4, (2,) * 4,
                                                                                       (2,) * 4)),
                                  R.Rule(R.COLUMN, 0, vocab_size=30)])
def test_every_split_the_patterns_make_is_proven_by_intervals(rule):
    shards = {t: (10, 4) for t in range(4)}
    geo = R.geometry_from_rule(rule, shards)
    ps = [p for t in sorted(geo.pieces) for p in geo.pieces[t]]
    assert R._intervals_apart(ps, geo.shape)
    assert R.tiling_problem(geo, shards) is None


def test_a_clash_is_named_by_the_same_pair_as_before():
    geo = R.Geometry((6, 2), {0: [((0, 0), (0, 0), (3, 2))], 1: [((0, 0), (4, 0), (2, 2))],
                              2: [((0, 0), (2, 0), (2, 2))]})
    shards = {0: (3, 2), 1: (2, 2), 2: (2, 2)}
    assert R.tiling_problem(geo, shards) == pairwise_problem(geo, shards) == \
        "two pieces overlap at full offsets [0, 0] and [2, 0]"


def test_placing_by_rule_is_shared_and_equal_to_placing_afresh():
    rule, shards = R.Rule(R.TWO_SUB_PARAMS, 0), {0: (8, 3), 1: (8, 3)}
    key = tuple(sorted(shards.items()))
    geo, problem, maps = T._by_rule(rule, key)
    assert T._by_rule(rule, key)[0] is geo  # the 80 layers of a model share one
    fresh = R.geometry_from_rule(rule, shards)
    assert (geo.shape, geo.pieces) == (fresh.shape, fresh.pieces) and problem is None
    assert maps == {t: tuple((T.Box(a, n), T.Box(b, n)) for a, b, n in ps) for t, ps in fresh.pieces.items()}
