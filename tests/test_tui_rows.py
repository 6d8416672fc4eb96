"""The flat table's rows carry each name's place among the view's names, and a row is drawn from
the columns read at the open, not from a Param looked up by name (at 297k names that look-up's
index is made after the findings: the first filter key's rows waited for it). Same cells as the
Params' own values, in every sort order and filter."""

from __future__ import annotations

import pytest
from test_tui_app import FIXTURES, SIZE, settle

from zinspect.core import open_checkpoint
from zinspect.core.model import Buffer
from zinspect.core.tree import SORT_KEYS
from zinspect.tui.app import ZinspectApp
from zinspect.tui.inspection import OUTPUT_ITEMSIZE, Inspection
from zinspect.tui.widgets.param_table import ParamTable

#: frozen, tied and buffers; tied across ZeRO-3 ranks; a LoRA run's frozen base; the usual
#: ZeRO-3 columns (core/params.ParamTable)
CHECKPOINTS = ("s2_w2_bf16", "hf_llama_tied_s3_w4_fp32", "hf_mistral_lora_s3_w2_bf16",
               "s3_w2_bf16_plain")


class LookUps(dict):
    """A checkpoint's params that note every look-up by name (iterating is not one)."""

    looked_up: list[str]

    def __getitem__(self, name):
        self.looked_up.append(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.looked_up.append(name)
        return super().get(name, default)

    def __contains__(self, name) -> bool:
        self.looked_up.append(name)
        return super().__contains__(name)


def expected(view: Inspection, name: str) -> tuple:
    e = view.entry(name)
    nbytes = e.nbytes if isinstance(e, Buffer) else e.numel * OUTPUT_ITEMSIZE
    return (e.shape, e.dtype, e.numel, nbytes, getattr(e, "group", None),
            getattr(e, "tied_to", None))


def expected_marks(view: Inspection, name: str) -> str:
    x = "x" if name in view.excluded else " "
    if view.is_buffer(name):
        return x + "B  "
    p = view.param(name)
    return x + ("F" if p.frozen else " ") + ("T" if p.tied_to else " ") + \
        ("!" if name in view.flagged else " ")


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_rows_are_drawn_from_the_columns_with_the_params_own_values(fixture):
    view = Inspection(open_checkpoint(FIXTURES / fixture))
    view.settle()
    view.toggle(view.names[1:3])  # some excluded (x)
    assert view.param_count < len(view.names) or fixture.startswith("hf_")  # buffers too
    for sort in SORT_KEYS:
        for text in ("", "weight", "LAYERS.1 proj", "blocks.1 down", "nothing like it"):
            rows = view.orders.rows(sort, text)
            assert [view.names[at] for at in rows.at] == rows.names
            assert rows.names == [n for n in view.orders.rows(sort).names
                                  if all(w in n.lower() for w in text.lower().split())]
            for name, at in zip(*rows, strict=True):
                assert view.facts(at) == expected(view, name), name
                assert view.marks(at) == expected_marks(view, name), name
            if text:  # a key typed on: searched among the earlier key's rows, same answer
                among = view.orders.rows(sort, text.split()[0][:-1])
                assert view.orders.rows(sort, text, among) == rows


async def test_the_filters_rows_look_up_no_param_by_name():
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        await settle(app, pilot)
        params = app.view.ckpt.params = LookUps(app.view.ckpt.params)
        params.looked_up = []
        await pilot.press("slash", *"blocks.1 down")
        await settle(app, pilot)
        table = app.screen.query_one(ParamTable)
        assert table.names == ["encoder.blocks.1.mlp.down.weight",
                               "encoder.blocks.1.mlp.down.bias"]
        assert "2 of 31 match" in str(app.screen.query_one("#output-summary").content)
        assert params.looked_up == []  # drawn without one look-up by name


def test_the_filter_finds_a_name_with_capitals_whatever_the_case_typed():
    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    p = next(iter(ckpt.params.values()))
    for names, text, found in (
            (["Encoder.Blocks.1.W", "encoder.blocks.2.w", "0"], "blocks.1", ["Encoder.Blocks.1.W"]),
            (["Encoder.Blocks.1.W", "encoder.blocks.2.w", "0"], "BLOCKS", ["Encoder.Blocks.1.W",
                                                                       "encoder.blocks.2.w"]),
            (["encoder.blocks.1.w", "encoder.blocks.2.w", "0"], "0", ["0"]),
            (["encoder.blocks.1.w", "encoder.blocks.2.w"], "Blocks.2", ["encoder.blocks.2.w"])):
        ckpt.params, ckpt.buffers = dict.fromkeys(names, p), {}
        rows = Inspection(ckpt).orders.rows("model", text)
        assert rows == (found, [names.index(n) for n in found]), (names, text)
