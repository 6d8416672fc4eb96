"""`ckpt.params` of the usual ZeRO-3 model states is a `ParamTable` (columns, a Param made for
a name when first asked for): every consumer must see the Params, groups, findings and output
the name-by-name path (a dict of Params) gives, whatever it asks first."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
from conftest import FIXTURES

from zinspect.core import open_checkpoint
from zinspect.core.layouts import common
from zinspect.core.model import Param
from zinspect.core.params import FIELDS, ParamTable, column, made, numels_of, outside_groups
from zinspect.core.plan import plan_merge
from zinspect.report_json import info_json, write_info_json

PLAIN = FIXTURES / "s3_w2_bf16_plain"  # a real ZeRO-3 run, no frozen or tied names


def _as_dict(monkeypatch):
    """The checkpoint opened name by name (no ParamTable)."""
    with monkeypatch.context() as m:
        m.setattr(common, "_usual_zero3", lambda names: None)
        ckpt = open_checkpoint(PLAIN)
    assert type(ckpt.params) is dict
    return ckpt


def _frags(ckpt):
    return {n: list(p.fragments) for n, p in ckpt.params.items()}


def test_the_table_is_the_dict(monkeypatch):
    table, plain = open_checkpoint(PLAIN), _as_dict(monkeypatch)
    assert type(table.params) is ParamTable
    assert table.groups == plain.groups and table.findings == plain.findings
    assert [column(table.params, f) for f in FIELDS] == [column(plain.params, f) for f in FIELDS]
    assert table.params.pristine  # nothing above made a Param
    out = io.StringIO()
    write_info_json(table, out)
    assert out.getvalue() == json.dumps(info_json(plain), default=str)
    assert list(table.params.items()) == list(plain.params.items())
    assert _frags(table) == _frags(plain)
    assert plan_merge(table).total_bytes == plan_merge(plain).total_bytes


@pytest.mark.parametrize("first", ["get", "values", "contains", "column"])
def test_any_first_access_gives_the_same_params(monkeypatch, first):
    plain = _as_dict(monkeypatch)
    table = open_checkpoint(PLAIN).params
    name = list(plain.params)[5]
    if first == "get":
        one = table.get(name)
        assert one == plain.params[name] and table.get(name) is one and not table.pristine
        assert list(table.values())[5] is one  # the Param handed out stays the one
    elif first == "values":
        assert list(table.values()) == list(plain.params.values())
    elif first == "contains":
        assert name in table and "no.such.param" not in table and table.pristine
    else:
        assert column(table, "sub_group") == column(plain.params, "sub_group")
    assert list(table) == list(plain.params) and len(table) == len(plain.params)
    assert dict(table.items()) == plain.params


def test_a_param_made_and_changed_is_what_the_columns_say():
    """A Param handed out may be changed (the app, a layout): the columns follow it, the
    validate walk visits it, and `made` lists it."""
    ckpt = open_checkpoint(PLAIN)
    table = ckpt.params
    name = list(table)[3]
    p = table[name]
    p.frozen, p.dtype = True, "float16"
    assert column(table, "frozen")[3] is True and column(table, "dtype")[3] == "float16"
    assert list(made(table)) == [p]
    whole = {g.index for g in ckpt.groups}
    assert outside_groups(table, whole) == [p]  # every other param: in a whole group
    assert [q.name for q in outside_groups(table, set())] == list(table)


def test_added_and_deleted_names():
    table = open_checkpoint(PLAIN).params
    first, n = next(iter(table)), len(table)
    extra = Param("extra.weight", (2, 2), "float32", frozen=True)
    table.setdefault("extra.weight", extra)
    assert list(table)[-1] == "extra.weight" and len(table) == n + 1
    assert table["extra.weight"] is extra and list(made(table)) == [extra]
    assert column(table, "frozen")[-1] is True and column(table, "numel")[-1] == 4
    del table[first]
    assert first not in table and len(table) == n and table.get(first) is None
    with pytest.raises(KeyError):
        table[first]


def _toy(in_order: bool, order_given: bool = False, joined: int = 2) -> ParamTable:
    """Two flat groups of a, b / c over 2 ranks; module order a, b, c or c, a, b (each name's
    place in the groups given, as `_usual_zero3` gives it, or found by the table); the first
    `joined` groups joined."""
    shapes = {"a": (3,), "b": (2, 2), "c": (5,)}
    names = ["a", "b", "c"] if in_order else ["c", "a", "b"]
    groups = [["a", "b"], ["c"]]
    dtypes = {"a": "float32", "b": "", "c": "bfloat16"}
    order = ([] if in_order else [2, 0, 1]) if order_given else None
    t = ParamTable(names, [shapes[n] for n in names], [dtypes[n] for n in names], groups, order)
    for gi, g in enumerate(groups[:joined]):
        numels = [math.prod(shapes[n]) for n in g]
        assert t.join(gi, 7 + gi, g, numels, [-(-x // 2) for x in numels],
                      lambda o, n, P: [(o, n, P)])
    assert not t.join(0, 7, groups[0], [3, 4], [2, 2], lambda o, n, P: [])  # joined once
    return t


@pytest.mark.parametrize("order_given", [False, True])
@pytest.mark.parametrize("in_order", [True, False])
def test_columns_and_params_of_joined_groups(in_order, order_given):
    t = _toy(in_order, order_given)
    t.fill_dtype("float16")
    order = ["a", "b", "c"] if in_order else ["c", "a", "b"]
    want = {"a": (7, 0, "float32", [(0, 3, 2)]), "b": (7, 0, "float16", [(2, 4, 2)]),
            "c": (8, 1, "bfloat16", [(0, 5, 3)])}
    assert column(t, "group") == [want[n][0] for n in order]
    assert column(t, "sub_group") == [want[n][1] for n in order]
    assert column(t, "dtype") == [want[n][2] for n in order]
    assert numels_of(t, t._groups[0]) == [3, 4]
    assert t.pristine
    b = t["b"]
    assert (b.group, b.sub_group, b.dtype, b.fragments) == (7, 0, "float16", [(2, 4, 2)])
    assert {n: (p.group, p.sub_group, p.dtype, p.fragments) for n, p in t.items()} == want
    assert list(t) == order


@pytest.mark.parametrize("order_given", [False, True])
def test_a_group_not_joined_has_no_group_in_the_columns(order_given):
    t = _toy(False, order_given, joined=1)
    assert column(t, "group") == [None, 7, 7]
    assert column(t, "sub_group") == [None, 0, 0]


def test_a_name_in_no_group_has_no_group_in_the_columns():
    t = ParamTable(["x", "a"], [(1,), (2,)], ["", ""], [["a"]])
    assert t.join(0, 3, t._groups[0], [2], [1], lambda o, n, P: [])
    assert column(t, "group") == [None, 3]
    assert column(t, "sub_group") == [None, 0]


def test_the_usual_path_takes_no_model_of_another_kind():
    """A table is made only at ZeRO-3 from empty params: a layout that filled some first (or
    any other stage) gets the dict."""
    for name in ("s2_w2_bf16", "s3_w2_fp32", "hf_llama_tied_s3_w4_fp32"):
        assert type(open_checkpoint(FIXTURES / name).params) is dict


def _ask(table: ParamTable, names: list[str], k: int) -> list[Param]:
    return list(table.values()) if k % 2 else [table[n] for n in names]


def test_threads_get_one_param_a_name():
    """The app reads params from worker threads while the main thread lists them: a name gives
    one Param, whoever asks first, and making them all meanwhile loses none."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave every few bytecodes
    try:
        for _ in range(20):
            table = open_checkpoint(PLAIN).params
            names = list(table)
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(partial(_ask, table, names), range(4)))
            assert all(len(g) == len(names) for g in got)
            assert all(a is b for g in got[1:] for a, b in zip(got[0], g, strict=True))
    finally:
        sys.setswitchinterval(switch)
