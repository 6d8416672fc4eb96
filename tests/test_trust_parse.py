"""Forged zip structures and pickles, built from the real fixture files with every CRC valid
(tests/damage.py), each with its exact verdict from `validate`, `info` and `merge`, run as a user
runs them: in a subprocess, under an address-space limit and a timeout (hang guards, not timed
assertions). No input may give exit 3, a signal, a traceback or unbounded memory, and a merge
of a forged checkpoint refuses and writes nothing (issue 8, items 2 and 3).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import damage as D
import pytest
from conftest import REPO

TIMEOUT = 120  # a hang guard only: each command takes about a second here
MEMORY = 1 << 30  # address space: the C unpickler took 2 GB RSS on huge_memo_index


@dataclass
class Case:
    build: object
    errors: set[str]  # exact set of error codes from validate (exit 1; none: exit 0)
    #: (code, file, rank, param) that must be reported, and a phrase of its message
    named: tuple = ()
    text: str = ""
    extra: set[str] = field(default_factory=set)


OPTIM1 = D.optim_name(1)
ZIP = {"unreadable-file", "param-coverage"}  # rank 1 unreadable: its share of params missing
CASES = {
    "zip_duplicate_name": Case(D.zip_duplicate_name, ZIP, ("unreadable-file", OPTIM1, 1, None),
                               "two zip records are named"),
    "zip_entry_elsewhere": Case(D.zip_entry_elsewhere, ZIP, ("unreadable-file", OPTIM1, 1, None),
                                "its local header at offset"),
    "zip_local_mismatch": Case(D.zip_local_mismatch, ZIP, ("unreadable-file", OPTIM1, 1, None),
                               "its local header at offset"),
    "zip_overlap": Case(D.zip_overlap, ZIP, ("unreadable-file", OPTIM1, 1, None), "overlap"),
    "zip_record_past_eof": Case(D.zip_record_past_eof, {"truncated-file"},
                                ("truncated-file", OPTIM1, 1, None), "is truncated"),
    "negative_storage_offset": Case(D.negative_storage_offset, ZIP,
                                    ("unreadable-file", OPTIM1, 1, None),
                                    "malformed offset, shape or stride"),
    "shape_off": Case(D.shape_off, {"shape-mismatch", "group-coverage", "partition-size",
                                    "param-coverage"},
                      ("shape-mismatch", D.MODEL, None, "encoder.blocks.0.norm.weight"),
                      "param_shapes says (17), its 16-bit weight in the module is (15)"),
    "shape_off_z3": Case(D.shape_off_z3, {"partition-size", "param-coverage"},
                         ("partition-size", D.z3_model_name(0), None,
                          "encoder.blocks.0.norm.weight"),
                         "every rank holds 72 elements, its params need exactly 73"),
    "numel_balanced": Case(D.numel_balanced, {"param-shape", "group-coverage", "partition-size",
                                              "param-coverage"},
                           ("param-shape", D.MODEL, None, "encoder.cube"),
                           "no valid shape (tuple (1000000000000000000, 5, 7))"),
    "memo_bomb": Case(D.memo_bomb, {"unreadable-file"}, ("unreadable-file", D.MODEL, None, None),
                      "parsing budget: the pickle holds more than"),
    "memo_bomb_key": Case(D.memo_bomb_key, {"unreadable-file"},
                          ("unreadable-file", D.MODEL, None, None), "malformed storage reference"),
    "deep_key": Case(D.deep_key, {"unreadable-file"}, ("unreadable-file", D.MODEL, None, None),
                     "parsing budget: a dict key or set member holds more than 1,000 objects"),
    "giant_string": Case(D.giant_string, {"unreadable-file"},
                         ("unreadable-file", D.MODEL, None, None),
                         "parsing budget: a string of 25,165,824 characters"),
    # a valid pickle over 4 MB with a PUT at index 2**32-2: read in bounded memory, all fine
    "huge_memo_index": Case(D.huge_memo_index, set()),
}


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run(*args) -> subprocess.CompletedProcess:
    """`python -m zinspect ARGS` under the memory limit; never a signal, exit 3 or traceback."""
    r = subprocess.run([sys.executable, "-m", "zinspect", *map(str, args)], capture_output=True,
                       text=True, cwd=REPO, timeout=TIMEOUT, preexec_fn=_limits)
    assert r.returncode in (0, 1, 2), (r.returncode, r.stderr[-2000:])
    for bad in ("Traceback", "RecursionError", "MemoryError", "internal error"):
        assert bad not in r.stderr, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each forged checkpoint, built once (the giant-string one is 24 MiB)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = CASES[name].build(tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_validate_names_the_forgery(built, name):
    case = CASES[name]
    r = run("validate", built(name), "--json")
    out = json.loads(r.stdout)
    errors = {f["code"] for f in out["findings"] if f["severity"] == "error"}
    assert errors == case.errors, out["findings"]
    assert r.returncode == (1 if case.errors else 0)
    if case.named:
        code, file, rank, param = case.named
        hits = [f for f in out["findings"] if f["code"] == code and f["file"] == file and
                f["rank"] == rank and f["param"] == param and case.text in f["message"]]
        assert hits, out["findings"]
        assert all(f["hint"] for f in out["findings"] if f["severity"] == "error")


@pytest.mark.parametrize("name", list(CASES))
def test_info_shows_it(built, name):
    r = run("info", built(name))
    assert r.returncode == 0, r.stderr
    errors = len(CASES[name].errors)
    assert ("error(s)" in r.stdout) == bool(errors), r.stdout[-1500:]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.errors])
def test_merge_refuses_and_writes_nothing(built, name, tmp_path):
    out_dir = tmp_path / "merged"
    r = run("merge", built(name), out_dir)
    assert r.returncode == 1, r.stderr
    assert "validation found" in r.stderr
    assert not out_dir.exists()


def test_huge_memo_index_merges(built, tmp_path):
    """The forged-but-valid pickle loads in bounded memory and the merge is whole."""
    r = run("merge", built("huge_memo_index"), tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_the_forgeries_are_live():
    """Without the checks these inputs do what the issue says: the C unpickler allocates by
    the memo index, hashing the deep key recurses, the bomb has 2**60 nodes (so a test that
    passes is the checks' doing, not a harmless input)."""
    code = (
        "import pickle, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "try:\n"
        "    pickle.loads(b'\\x80\\x02N' + b'r\\xfe\\xff\\xff\\xff' + b'.')\n"
        "except MemoryError:\n"
        "    sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code], timeout=TIMEOUT)
    assert r.returncode == 7  # 2**32 memo slots do not fit in 1 GB
    code = ("import io, pickle\n"
            "raw = b'\\x80\\x02N' + b'\\x85' * 200_000 + b'.'\n"
            "hash(pickle._Unpickler(io.BytesIO(raw)).load())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT)
    assert r.returncode != 0  # SIGSEGV or RecursionError, as the issue saw


# ------------------------------------------------------------------ one cause, one finding (14.4)
def test_corrupt_rank0_is_one_finding_with_a_restore_hint(tmp_path):
    """Rank 0 (the layout's reference) overwritten: the file is named, with a hint to restore
    it, and no knock-on unknown-layout (the layout is read from the next readable rank)."""
    r = run("validate", D.corrupt_rank0_optim(tmp_path), "--json")
    out = json.loads(r.stdout)
    assert {f["code"] for f in out["findings"] if f["severity"] == "error"} == ZIP
    bad = next(f for f in out["findings"] if f["code"] == "unreadable-file")
    assert bad["file"] == D.optim_name(0) and "restore it" in bad["hint"]
    assert "move it out" not in bad["hint"]


def test_truncated_rank0_model_states_z3_folds_the_tied_alias(tmp_path):
    """A 100-byte rank-0 model-states file at stage 3: names come from rank 1, whose module
    holds the tied alias head.weight without its link. That is said once, under the
    rank0-model-missing warning, not as param-unaccounted or 'no rank holds' errors."""
    r = run("validate", D.model_100_bytes_z3(tmp_path), "--json")
    out = json.loads(r.stdout)
    codes = [f["code"] for f in out["findings"]]
    assert "param-unaccounted" not in codes
    assert not [f for f in out["findings"] if f["param"] == "head.weight"]
    warn = next(f for f in out["findings"] if f["code"] == "rank0-model-missing")
    assert "head.weight" in warn["message"] and "tied" in warn["message"]
    assert {f["code"] for f in out["findings"] if f["severity"] == "error"} == ZIP
