"""Pickled ints wider than `unpickle.MAX_INT_BYTES` (review2, "found but not fixed" 3): a
10**5000 as `dp_world_size` (every CRC valid) made every `validate`, `info` and `info --json` an
internal error (exit 3: Python's 4300-digit int-to-str limit). Now the parse layer refuses such
an int, binary (LONG1/LONG4) or text (INT/LONG), with the same verdict on the C unpickler's path
(whose scan declines any LONG1 beyond 8 bytes, LONG4 and text ints) and the bounded reader's;
the file is an unreadable-file finding naming it.
"""

from __future__ import annotations

import json
import struct

import damage as D
import pytest
import torch
from conftest import run_zinspect
from test_trust_bulk import _forged_ranks, _global_steps
from test_trust_fastpath import _key, outcomes
from torchload import torch_load

from zinspect.core.fastpickle import _opcode_runs, prepare_for_c


def _holding(op: bytes) -> bytes:
    """A pickle {"n": the int `op` pushes}."""
    return b"\x80\x02}(" + _key("n") + op + b"u."


def _long1(value: int, width: int) -> bytes:
    return b"\x8a" + bytes([width]) + value.to_bytes(width, "little", signed=True)


def _long4(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(data)) + data


def _refused(bits: int) -> str:
    return (f"unreadable f.pt: its pickle is corrupt (UnpicklingError: an int of {bits:,} bits "
            f"(at most 127 are accepted))")


WIDE = {  # the int op -> what both paths say
    "LONG1 of 17 bytes": (_long1(2**128, 17), _refused(129)),
    "LONG1 of 17 bytes, negative": (_long1(-(2**128) - 1, 17), _refused(129)),
    "LONG4 of 10**5000": (_long4(10**5000), _refused(16610)),
    "LONG4 of 17 bytes": (_long4(2**128), _refused(129)),
    "INT text of 40 digits": (b"I" + b"9" * 40 + b"\n", _refused(133)),
    "LONG text of 40 digits": (b"L-" + b"9" * 40 + b"L\n", _refused(133)),
    "INT text of 5000 digits": (b"I" + b"9" * 5000 + b"\n",  # Python's own limit refuses first
                                "unreadable f.pt: its pickle is corrupt (ValueError: Exceeds the "
                                "limit (4300 digits) for integer string conversion: value has 5000 "
                                "digits; use sys.set_int_max_str_digits() to increase the limit)"),
}


@pytest.mark.skipif(_opcode_runs(16) is None, reason="the fast path needs Python 3.11")
@pytest.mark.parametrize("what", list(WIDE))
def test_an_int_wider_than_16_bytes_is_refused_alike_on_both_paths(what):
    op, said = WIDE[what]
    raw = _holding(op)
    assert prepare_for_c(raw) is None  # the scan declines: the bounded reader gives the verdict
    assert outcomes(raw) == {"fast": [said], "slow": [said]}


@pytest.mark.skipif(_opcode_runs(16) is None, reason="the fast path needs Python 3.11")
def test_ints_up_to_16_bytes_still_read_alike_on_both_paths():
    raws = [_holding(_long1(-(2**63), 8)), _holding(_long1(2**127 - 1, 16)),
            _holding(_long4(-(2**127) + 1)), _holding(b"I" + b"9" * 38 + b"\n")]
    assert prepare_for_c(raws[0]) is not None  # an 8-byte LONG1 stays on the C unpickler's path
    read = [f"ok [] {{'n': {v}}}" for v in (-(2**63), 2**127 - 1, -(2**127) + 1, 10**38 - 1)]
    assert outcomes(*raws) == {"fast": read, "slow": read}


def test_a_dp_world_size_of_10_to_5000_is_an_unreadable_file_not_an_internal_error(tmp_path):
    root = D.copy_root(tmp_path, "s2_w2_bf16")
    [path] = root.glob("*/" + D.MODEL)
    state = torch_load(path)
    state["dp_world_size"] = 10**5000
    torch.save(state, path)
    r = run_zinspect("validate", "--json", root)
    assert r.returncode == 1, r.stderr[-2000:]
    unreadable = [f for f in json.loads(r.stdout)["findings"] if f["code"] == "unreadable-file"]
    assert [(f["file"], f["message"]) for f in unreadable] == [
        (D.MODEL, f"{D.MODEL} cannot be read: its pickle is corrupt (UnpicklingError: an int of "
                  f"16,610 bits (at most 127 are accepted))")]
    for args in (["info", "--json"], ["info"]):
        r = run_zinspect(*args, root)
        assert r.returncode in (0, 1) and "internal error" not in r.stderr, r.stderr[-2000:]


def test_a_global_step_of_10_to_400_makes_that_file_unreadable(tmp_path):
    """Flipped from test_trust_bulk (10**400 was read and shown as "2**1328+"): now refused."""
    ckpt = _global_steps(tmp_path, {"mp_rank_01_model_states.pt": 10**400})
    assert [f.file for f in ckpt.findings if f.code == "unreadable-file"] == [
        "mp_rank_01_model_states.pt"]


def test_a_partition_count_of_10_to_400_makes_those_files_unreadable(tmp_path):
    """Flipped from test_trust_bulk's forged majority of 10**400: both files refused."""
    ckpt = _forged_ranks(tmp_path, {0: 10**400, 1: 10**400})
    assert sorted(f.rank for f in ckpt.findings if f.code == "unreadable-file") == [0, 1]
