"""`zinspect info --json` writes its params' rows from columns (report_json.write_info_json) instead of
json.dumps of a dict per param: the text must be what json.dumps(info_json(ckpt)) gives, byte for
byte, on every real fixture and on names and values that JSON escapes or that the row writer
hands back to json.dumps."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import FIXTURES, fixture_dirs

from zinspect.cli import main
from zinspect.core import open_checkpoint
from zinspect.core.model import Buffer, Param
from zinspect.report import totals
from zinspect.report_json import info_json, write_info_json

PARALLEL = sorted(p for p in (FIXTURES / "parallel").iterdir() if p.is_dir())


def written(ckpt) -> str:
    out = io.StringIO()
    write_info_json(ckpt, out)
    return out.getvalue()


def dumped(ckpt) -> str:
    return json.dumps(info_json(ckpt), default=str)


@pytest.mark.parametrize("path", fixture_dirs + PARALLEL, ids=lambda p: p.name)
def test_written_rows_are_json_dumps_of_info_json(path):
    ckpt = open_checkpoint(path)
    text = written(ckpt)
    assert text == dumped(ckpt)
    assert json.loads(text)["params"] and len(json.loads(text)["params"]) == len(ckpt.params)


def test_cli_info_json_is_the_written_text():
    path = fixture_dirs[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["info", "--json", str(path)]) == 0
    assert out.getvalue() == dumped(open_checkpoint(path)) + "\n"


def escaped_names_checkpoint():
    """A real checkpoint with params whose names JSON escapes, tied, frozen and group-less
    params, 0-dim and empty shapes, and a buffer named like a param (it replaces the param's
    bytes in the output)."""
    ckpt = open_checkpoint(fixture_dirs[0])
    owner = next(iter(ckpt.params.values()))
    odd = ['quote " and \\ backslash', "control \x00\x1f\n\t", "accents é ü 中文", "line \u2028 sep",
           "lone \ud800 surrogate", "emoji \U0001f600", ""]
    for i, name in enumerate(odd):
        ckpt.params[name] = Param(name, (i, 3) if i % 2 else (), "bfloat16" if i % 3 else "",
                                  frozen=i % 2 == 0, group=None if i == 3 else i, sub_group=i)
    ckpt.params["alias"] = Param("alias", owner.shape, owner.dtype, tied_to=owner.name)
    ckpt.params["alias.of.nothing"] = Param("alias.of.nothing", (2,), "float16", tied_to="gone")
    ckpt.buffers[odd[2]] = Buffer(odd[2], (4,), "float32")
    return ckpt


def test_escaped_names_tied_and_frozen_rows():
    ckpt = escaped_names_checkpoint()
    text = written(ckpt)
    assert text == dumped(ckpt)
    rows = {r["name"]: r for r in json.loads(text)["params"]}
    assert rows['quote " and \\ backslash']["shape"] == [] and rows["emoji \U0001f600"]["numel"] == 15
    assert rows["alias"]["group"] == ckpt.params[rows["alias"]["tied_to"]].group
    assert rows["alias.of.nothing"]["group"] is None


@pytest.mark.parametrize("odd", ["list shape", "bool dim", "int frozen", "numpy-like name"])
def test_values_the_rows_do_not_write_go_through_json_dumps(odd):
    """Anything but the usual types (tuples of ints, str names, bool frozen, int groups) is
    written by json.dumps, as before: the same text whatever the value."""
    ckpt = open_checkpoint(fixture_dirs[0])
    p = next(iter(ckpt.params.values()))
    if odd == "list shape":
        p.shape = list(p.shape)
    elif odd == "bool dim":
        p.shape = (True, 2)
    elif odd == "int frozen":
        p.frozen = 0
    else:
        class Name(str):
            pass

        p.name = Name(p.name)
    assert written(ckpt) == dumped(ckpt)


def test_totals_output_bytes_is_the_per_name_rule():
    """output_bytes: every param name at 4 bytes an element, a buffer in place of a param of
    its name, every buffer at its own dtype (what plan_merge writes)."""
    ckpt = escaped_names_checkpoint()
    per_name = {name: p.numel * 4 for name, p in ckpt.params.items()}
    per_name.update((name, b.nbytes) for name, b in ckpt.buffers.items())
    assert totals(ckpt)["output_bytes"] == sum(per_name.values())
    from zinspect.report_json import _param_columns

    assert totals(ckpt) == totals(ckpt, _param_columns(ckpt))
