"""`unpickle.check_tree` measures each container once: its verdicts are those of the walk it
replaced (every reference followed, a shared object counted each time it is reached), on
random trees and shared graphs, while a memo bomb costs one measurement per level (the walk
took a minute per forged 5.7 MB file, three times per file: found by review) and a cycle is
refused as nesting without end."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from zinspect.core import unpickle
from zinspect.core.unpickle import (
    _ATOMS,
    _SIZED,
    PickleBudgetExceeded,
    _non_leaves,
    check_tree,
    children,
    flat_tuples,
)


def walked(obj, max_nodes: int, max_depth: int, leaves=_ATOMS, settled=None) -> str:
    """The definition: the walk check_tree replaced (kept here as the reference)."""
    stack, nodes = [(obj, 0)], 1
    while stack:
        item, depth = stack.pop()
        if not children(item):
            continue
        if depth >= max_depth:
            return "deep"
        inner = _non_leaves(item, leaves)
        nodes += len(item) * (2 if isinstance(item, dict) else 1) if isinstance(item, _SIZED) \
            else len(inner) + 2
        flat = flat_tuples(inner, leaves)
        if flat is None:
            stack.extend([(kid, depth + 1) for kid in inner])
        elif flat and depth + 1 >= max_depth:
            return "deep"
        else:
            nodes += flat
        if settled is not None and (flat is not None or not inner):
            settled.add(id(item))
        if nodes > max_nodes:
            return "nodes"
    return "ok"


def measured(obj, max_nodes: int, max_depth: int, settled=None) -> str:
    try:
        check_tree(obj, max_nodes, max_depth, settled=settled)
    except PickleBudgetExceeded as e:
        return "deep" if "nests deeper" in str(e) else "nodes"
    return "ok"


def _graph(rng: random.Random, shared: bool):
    """A random pickle-like graph: lists, tuples, dicts and OrderedDicts of ints, strs, shapes
    and each other; with `shared`, containers made earlier are reused (references again)."""
    made: list = []

    def make(depth: int):
        if depth > 7 or rng.random() < 0.25:
            return rng.choice([1, "a", (2, 3), (), 2.5, None])
        if shared and made and rng.random() < 0.3:
            return rng.choice(made)
        kind = rng.choice(["list", "tuple", "dict", "odict", "shapes"])
        n = rng.randint(0, 4)
        if kind == "shapes":
            out = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]
        elif kind in ("list", "tuple"):
            out = [make(depth + 1) for _ in range(n)]
            out = tuple(out) if kind == "tuple" else out
        else:
            out = (dict if kind == "dict" else OrderedDict)(
                (f"k{i}", make(depth + 1)) for i in range(n))
        made.append(out)
        return out
    return [make(0) for _ in range(3)]


@pytest.mark.parametrize("shared", [False, True])
def test_its_verdicts_and_settled_containers_are_the_walks(shared):
    rng = random.Random(9)
    seen = set()
    for _ in range(400):
        obj = _graph(rng, shared)
        full = walked(obj, 1 << 40, 1 << 20)
        assert full == "ok" and measured(obj, 1 << 40, 1 << 20) == "ok"
        a, b = set(), set()
        walked(obj, 1 << 40, 1 << 20, settled=a)
        check_tree(obj, 1 << 40, 1 << 20, settled=b)
        assert a == b
        for max_nodes, max_depth in ((rng.randint(1, 60), 1 << 20), (1 << 40, rng.randint(0, 9)),
                                     (rng.randint(1, 60), rng.randint(0, 9))):
            want, got = walked(obj, max_nodes, max_depth), measured(obj, max_nodes, max_depth)
            if want == "ok" or max_nodes == 1 << 40 or max_depth == 1 << 20:
                assert got == want, (obj, max_nodes, max_depth)
            else:  # both budgets can be passed: either may be named, never none
                assert got != "ok"
            seen.add(want)
    assert seen == {"ok", "nodes", "deep"}


def _bomb(levels: int):
    x: list = []
    for _ in range(levels):
        x = [x, x]  # 2**levels references to the first list
    return x


def test_a_memo_bomb_is_measured_once_per_level(monkeypatch):
    calls = []
    walk = unpickle._non_leaves
    monkeypatch.setattr(unpickle, "_non_leaves", lambda *a: calls.append(1) or walk(*a))
    with pytest.raises(PickleBudgetExceeded, match="holds more than 1,000,000 objects"):
        check_tree({"bomb": _bomb(60)}, 1_000_000)
    assert len(calls) <= 61
    calls.clear()
    check_tree({"small": _bomb(10)}, 1_000_000)  # 2**11 nodes: within the budget
    assert len(calls) == 11  # (the dict, then one list per level: the empty one has none)


def test_a_cycle_nests_without_end():
    a: list = [1]
    b = [a]
    a.append(b)
    for obj in (a, {"x": [a]}, OrderedDict(y=(b,))):
        with pytest.raises(PickleBudgetExceeded, match="nests deeper than 100 levels"):
            check_tree(obj, 1 << 40)
        assert walked(obj, 1 << 40, 100) == "deep"
