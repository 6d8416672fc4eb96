"""pickle_runs (the ZeRO-3 placeholder entries of a model-states pickle read in bulk) gives
exactly what the other readers give, or declines: on files torch.save wrote (Llama-style names,
the real key order of DeepSpeed's model states) and on byte-level forgeries of their runs,
`read_torch_file` through the run path (its pickle read in 64 KiB chunks, as a large one is)
gives the same objects (types, values, key order, which objects are shared), storages (in
order) and unknown globals, or the same UnreadableFile message, as with the run path disabled
(`may_hold_run` False: FastMetaUnpickler) and as the bounded reader (the scan disabled too)."""

from __future__ import annotations

import functools
import operator
import zlib
from collections import OrderedDict
from pathlib import Path

import damage as D
import pickle_runs_forge as F
import pytest
import torch

from zinspect.core import pickle_runs, torchzip
from zinspect.core.pickle_bytes import PickleMemo
from zinspect.core.torchpickle import Opaque, StorageRef, TensorRef
from zinspect.core.torchzip import read_torch_file
from zinspect.core.unpickle import DeferredPairs, PairsRun, PickledDict, PickledOrderedDict
from zinspect.errors import UnreadableFile

_ATOMS = (str, bytes, int, float, bool, complex, type(None))


def assert_same(a, b, where: str = "", seen: dict | None = None) -> None:
    """`a` and `b` are the same tree: types, values, dict key order and instance attributes,
    and the same sharing (an object reached twice in `a` is one object reached twice in `b`)."""
    seen = {} if seen is None else seen
    if type(a) in _ATOMS or type(b) in _ATOMS:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"
        return
    pair = seen.get(("a", id(a))), seen.get(("b", id(b)))
    if pair != (None, None):
        assert pair == (b, a) and pair[0] is b, f"{where}: shared differently"
        return
    seen["a", id(a)], seen["b", id(b)] = b, a
    for d in (a, b):
        if type(d) is DeferredPairs:  # what it says before its pairs are inserted, then as a dict
            keys, values, n = d.keys_list(), d.values_list(), len(d)
            d.insert_deferred()
            assert type(d) is PickledOrderedDict and keys == list(dict.keys(d)) and \
                n == len(keys) == len(values) == dict.__len__(d) and \
                all(map(operator.is_, values, dict.values(d))), f"{where}: deferred pairs differ"
    if isinstance(a, Opaque):
        assert isinstance(b, Opaque) and a.qualname == b.qualname, f"{where}: {a!r} != {b!r}"
        assert_same((a.args, a.state), (b.args, b.state), f"{where}<{a.qualname}>", seen)
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert_same(list(dict.keys(a)), list(dict.keys(b)), f"{where}.keys()", seen)
        for k, va in dict.items(a):
            assert_same(va, dict.__getitem__(b, k), f"{where}[{k!r}]", seen)
        assert_same(vars(a) if hasattr(a, "__dict__") else None,
                    vars(b) if hasattr(b, "__dict__") else None, f"{where}.__dict__", seen)
    elif isinstance(a, TensorRef):
        for f in ("storage", "offset", "shape", "stride", "dtype", "requires_grad"):
            assert_same(getattr(a, f), getattr(b, f), f"{where}.{f}", seen)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", seen)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class _Spy(pickle_runs.RunUnpickler):
    """RunUnpickler, logging each load's outcome ("ok" or "raised")."""

    log: list[str] = []

    def load(self):
        try:
            obj = super().load()
        except Exception:
            self.log.append("raised")
            raise
        self.log.append("ok")
        return obj


class Spied:
    """What the run path did: RunUnpickler's loads ("ok" / "raised") and the PairsRuns it
    made, as ("tensors" or "shapes", entries)."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.runs: list[tuple[str, int]] = []

    def module_runs(self) -> list[int]:
        return [n for kind, n in self.runs if kind == "tensors"]


@pytest.fixture
def chunked(monkeypatch):
    """Pickles read as large ones are (chunks of 64 KiB, none kept by a PickleMemo), and a
    log of what the run path did."""
    monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(PickleMemo.__init__, "__defaults__", (0, 0))
    spied, init = Spied(), PairsRun.__init__

    def made(run, names, values):
        spied.runs.append(("tensors" if type(values[0]) is TensorRef else "shapes", len(names)))
        init(run, names, values)
    monkeypatch.setattr(PairsRun, "__init__", made)
    monkeypatch.setattr(_Spy, "log", spied.loads)
    monkeypatch.setattr(pickle_runs, "RunUnpickler", _Spy)
    return spied


def _read(path: Path, memo: PickleMemo | None = None):
    try:
        tf = read_torch_file(path, memo)
    except UnreadableFile as e:
        return ("unreadable", str(e), e.args[1:], sorted(e.unknown_globals))
    return ("ok", (tf.obj, list(tf.storages.items()), sorted(tf.unknown_globals)))


def three_ways(path: Path, monkeypatch) -> tuple:
    """read_torch_file's outcome through the run path, checked equal to the one with the run
    path disabled and to the bounded reader's; returned."""
    with_runs = _read(path)
    with monkeypatch.context() as m:
        m.setattr(pickle_runs, "may_hold_run", lambda head, total: False)
        without = _read(path)
        m.setattr(torchzip, "prepare_chunks_for_c", lambda next_chunk, total: None)
        bounded = _read(path)
    assert without[0] == bounded[0]
    assert_same(without, bounded, "without-runs vs bounded")
    assert with_runs[0] == bounded[0], (with_runs[:2], bounded[:2])
    assert_same(with_runs, bounded, "with-runs vs bounded")
    return with_runs


# ------------------------------------------------------------------ files torch.save wrote


def _module(names: list[str], **special) -> OrderedDict:
    return OrderedDict((n, special.get(n, F.placeholder())) for n in names)


NAMES = F.llama_names(130)  # 1172 names: a run of 1142 (MIN_ENTRIES is 1024)


NAMES_2703 = F.llama_names(300)  # batches of 1000 entries: a run cut at 2000 keeps 1970


def _tied(inside: bool) -> dict:
    m = _module(NAMES_2703)
    m["lm_head.weight"] = m["model.layers.100.mlp.up_proj.weight" if inside else
                            "model.embed_tokens.weight"]
    return {"module": m, "shared_params": {"lm_head.weight": "model.embed_tokens.weight"}}


def _tied_as_deepspeed_saves() -> dict:
    """lm_head a view of the embedding's storage (hf_llama_tied_s3_w4_fp32: its key a GET of
    the embedding's, which lies before the run)."""
    m = _module(NAMES_2703)
    m["lm_head.weight"] = m["model.embed_tokens.weight"][0:0]
    return {"module": m, "shared_params": {"lm_head.weight": "model.embed_tokens.weight"}}


def _views(where: int) -> dict:
    m = _module(NAMES)
    m[NAMES[where]] = m[NAMES[900]][0:0]  # the same storage: its key a memo GET of a run's
    return {"module": m}


def _long_names() -> dict:
    names = list(NAMES_2703)
    for i in range(100, 2300, 97):  # 255 bytes: the longest a run's names may be
        names[i] = names[i] + "." + "w" * (254 - len(names[i]))
    names[2300] = "x" * 256  # (the run ends here)
    names[2400] = "y" * 300
    assert all(len(n) == 255 for n in names[100:2300:97])
    return {"module": _module(names)}


def _non_ascii() -> dict:
    names = [n.replace("layers", "слои") if i % 3 else n.replace("mlp", "全连接")
             for i, n in enumerate(NAMES)]
    names[700] = "model.émbed.🦙.weight"
    names[701] = "model.\udce9.weight"  # a lone surrogate (pickled with surrogatepass)
    return {"module": _module(names)}


def _mixed(at: int, dtype=torch.float32, requires_grad: bool = False) -> dict:
    names = NAMES_2703
    return {"module": _module(names, **{names[at]: F.placeholder(dtype, requires_grad)})}


def _buffers() -> dict:
    m = _module(NAMES_2703)
    m["model.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    m["model.norm.num_batches_tracked"] = torch.tensor(3)
    first = OrderedDict([("model.pos_scale", torch.ones(15))])
    first.update(m)
    return {"module": first, "buffer_names": ["model.pos_scale", "model.rotary_emb.inv_freq",
                                              "model.norm.num_batches_tracked"]}


#: name -> (model_states kwargs, what the run path must do: "read" the module's run in bulk;
#: "cut": a module run of 1024+ entries up to its last batch (a SETITEMS), then an entry of
#: another kind, should be read so too; None: decline or read it, the same objects either way)
VARIANTS = {
    "plain": (lambda: {"module": _module(NAMES)}, "read"),
    "3009_names": (lambda: {"module": _module(F.llama_names(334))}, "read"),
    "names_not_shared": (lambda: {"module": _module(NAMES), "share_names": False}, "read"),
    "module_a_plain_dict": (lambda: {"module": dict(_module(NAMES))}, "read"),
    "requires_grad_all": (lambda: {"module": OrderedDict(
        (n, F.placeholder(requires_grad=True)) for n in NAMES)}, "read"),
    "fp32_module": (lambda: {"module": OrderedDict(
        (n, F.placeholder(torch.float32)) for n in NAMES)}, "read"),
    "placeholders_with_elements": (lambda: {"module": OrderedDict(  # numel 3, offset 2
        (n, torch.empty(3, dtype=torch.bfloat16)[2:2]) for n in NAMES)}, "read"),
    "frozen_params": (lambda: {"module": _module(NAMES), "frozen": NAMES[1000:1020]}, "read"),
    "non_ascii_names": (_non_ascii, "read"),
    "fp32_norm_in_the_middle_two_runs": (lambda: _mixed(1300), "read"),  # (the second run)
    "fp32_norm_after_2300": (lambda: _mixed(2300), "cut"),
    "fp16_after_2300": (lambda: _mixed(2300, torch.float16), "cut"),
    "requires_grad_one": (lambda: _mixed(2300, torch.bfloat16, True), "cut"),
    "buffers": (_buffers, "cut"),
    "tied_before_the_run": (lambda: _tied(False), "cut"),
    "tied_as_deepspeed_saves": (_tied_as_deepspeed_saves, "cut"),
    "long_names": (_long_names, "cut"),
    "tied_inside_the_run": (lambda: _tied(True), None),
    "view_inside_the_run": (lambda: _views(1000), None),  # (GETs a run's key)
    "view_after_the_run": (lambda: _views(1171), None),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> a model-states file of that variant (made once, when first asked for)."""
    root, files = tmp_path_factory.mktemp("runs"), {}

    def make(name: str) -> Path:
        if name not in files:
            files[name] = F.model_states(root / f"{name}.pt", **VARIANTS[name][0]())
        return files[name]
    return make


def test_the_plain_case_is_read_by_the_run_path_and_gives_what_the_others_do(
        made, chunked, monkeypatch):
    path = made("plain")
    raw = D.pickle_of(path)
    assert len(raw) > 64 << 10 and len(F.run_of(F.module_entries(raw), raw)) >= 1024
    outcome = three_ways(path, monkeypatch)
    assert chunked.loads == ["ok"]  # (the two other reads do not go through RunUnpickler)
    # the module's run and param_shapes' (all but their first entries) read in bulk
    assert chunked.runs == [("tensors", len(F.run_of(F.module_entries(raw), raw))),
                            ("shapes", len(NAMES) - 1)]
    obj, storages, unknown = outcome[1]
    module = obj["module"]
    assert type(module) is PickledOrderedDict and list(module) == NAMES
    assert vars(module) == {"_metadata": OrderedDict([("", {"version": 1}),
                                                       ("model", {"version": 1})])}
    assert [k for k, _ in storages] == [str(i) for i in range(len(NAMES))]
    assert all(t.storage is s and t.shape == (0,) and t.dtype == "bfloat16"
               for t, (_, s) in zip(module.values(), storages, strict=True))
    assert list(obj) == ["module", "buffer_names", "optimizer", "param_shapes",
                         "frozen_param_shapes", "shared_params", "frozen_param_fragments",
                         "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                         "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                         "checkpoint_parallel_dimensions", "ds_config", "ds_version"]
    assert obj["param_shapes"][0] == OrderedDict((n, tuple(F.shape_of(n))) for n in NAMES)
    assert unknown == []
    # a PickleMemo (which keeps no pickle of this size here) changes nothing
    assert_same(_read(path, PickleMemo()), outcome, "with a memo")
    assert chunked.loads == ["ok", "ok"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_torch_saves(variant, made, chunked, monkeypatch):
    path = made(variant)
    kind, (obj, storages, _) = three_ways(path, monkeypatch)
    assert kind == "ok"
    if VARIANTS[variant][1] == "read":
        assert chunked.loads == ["ok"] and chunked.module_runs(), \
            "the run path declined a file it should read"
    module = obj["module"]
    assert type(module) is (PickledOrderedDict if variant != "module_a_plain_dict" else dict)
    if variant == "tied_as_deepspeed_saves":
        assert module["lm_head.weight"].storage is module["model.embed_tokens.weight"].storage
    elif variant.startswith("tied"):
        assert module["lm_head.weight"] is module[
            "model.layers.100.mlp.up_proj.weight" if "inside" in variant else
            "model.embed_tokens.weight"]
    if variant.startswith("view"):
        name = NAMES[1000 if "inside" in variant else 1171]
        assert module[name].storage is module[NAMES[900]].storage
        assert len(storages) == len(module) - 1
    if variant == "frozen_params":
        frozen = obj["frozen_param_shapes"]
        assert list(frozen) == NAMES[1000:1020] and all(
            any(k is n for n in module) for k in frozen)  # the module's very strings
    if variant == "fp32_norm_in_the_middle_two_runs":
        assert module[NAMES_2703[1300]].dtype == "float32"


@pytest.mark.parametrize("variant", sorted(v for v, (_, what) in VARIANTS.items()
                                           if what == "cut"))
def test_a_module_run_ending_inside_a_batch_is_read_in_bulk_up_to_its_last_batch(
        variant, made, chunked, monkeypatch):
    """A run followed by an entry of another kind (a buffer, an fp32 norm, a tied lm_head
    whose key is a GET, a 256-byte name...) rather than by the SETITEMS of its frame: its
    entries up to the last SETITEMS in it (a batch of 1000 ends there) are a run that a
    SETITEMS closes, 1970 of them here."""
    path = made(variant)
    assert three_ways(path, monkeypatch)[0] == "ok"
    assert chunked.loads == ["ok"]
    assert chunked.module_runs(), "the module's run was not read in bulk (nor any part of it)"


@pytest.mark.parametrize("window", [3000, 65536])
@pytest.mark.parametrize("variant", ["plain", "3009_names", "fp32_norm_in_the_middle_two_runs",
                                     "buffers", "tied_as_deepspeed_saves", "long_names",
                                     "view_after_the_run"])
def test_a_run_read_a_window_at_a_time_gives_the_same(variant, window, made, chunked,
                                                     monkeypatch):
    """A run is read `_WINDOW` bytes at a time (1 MiB: ~6k entries): windows that cut its
    entries anywhere, its batches' SETITEMS too, give the same objects and the same runs
    read in bulk (the batch a run is cut back to found in an earlier window)."""
    path = made(variant)
    whole = three_ways(path, monkeypatch)
    runs = list(chunked.runs)
    chunked.runs.clear()
    monkeypatch.setattr(pickle_runs, "_WINDOW", window)
    assert_same(three_ways(path, monkeypatch), whole, f"window {window} vs whole")
    assert chunked.runs == runs


# ------------------------------------------------------------------ forged runs


@functools.lru_cache(maxsize=8)
def _entries(path: Path) -> tuple[bytes, list[F.Entry]]:
    """A file's data.pkl and its run's entries (found once per base file)."""
    raw = D.pickle_of(path)
    run = F.run_of(F.module_entries(raw), raw)
    assert len(run) >= 1024
    return raw, run


FORGERIES = {  # name -> (base variant, forge(raw, run) -> raw, what the other readers say)
    **{f"get_after_the_run_of_its_{w}": ("plain", F.get_after(w), "ok")
       for w in F.PUT_NAMES[1:]},
    "put_reuses_a_later_name_index": ("plain", F.reuse(600, "hooks", 605), "ok"),
    "put_reuses_an_earlier_name_index": ("names_not_shared", F.reuse(605, "hooks", 600), "ok"),
    "put_reuses_an_earlier_name_index_param_shapes_gets_it": (
        "plain", F.reuse(605, "hooks", 600, later_get=False), "unreadable"),
    "name_put_reuses_an_earlier_name_index": (
        "names_not_shared", F.reuse(605, "name", 600), "ok"),
    "put_reuses_an_index_from_before_the_run": ("plain", F.reuse_before("hooks"), "ok"),
    "name_put_reuses_an_index_from_before_the_run": (
        "names_not_shared", F.reuse_before("name"), "ok"),
    "name_put_on_the_location_slot": (
        "names_not_shared", lambda raw, run: F.set_put(raw, run[600].puts[0],
                                                        run[0].get("location")), "ok"),
    "name_put_beyond_the_memo_bound": (
        "names_not_shared", lambda raw, run: F.set_put(raw, run[600].puts[0], 1 << 22), "ok"),
    "hooks_put_beyond_the_memo_bound": (
        "plain", lambda raw, run: F.set_put(raw, run[600].puts[5], 1 << 22), "ok"),
    "key_repeated_inside_the_run": ("plain", F.set_key(700, lambda raw, run: run[690].key), "ok"),
    "key_repeated_from_before_the_run": ("buffers", F.set_key(700, lambda raw, run: "0"), "ok"),
    "key_repeated_from_a_placeholder_before_the_run": (
        "plain", F.set_key(700, lambda raw, run: "1"), "ok"),
    "key_of_64_characters": ("plain", F.set_key(700, lambda raw, run: "k" * 64), "ok"),
    "key_of_65_characters": ("plain", F.set_key(700, lambda raw, run: "k" * 65), "unreadable"),
    "empty_name": ("names_not_shared", F.set_name(700, lambda raw, run: ""), "ok"),
    "name_repeated_inside_the_run": ("plain", F.set_name(700, lambda raw, run: run[650].name), "ok"),
    "name_repeated_from_before_the_run": (
        "names_not_shared", F.set_name(700, lambda raw, run: NAMES[0]), "ok"),
    "slot_rebuild_an_unknown_global": ("plain", F.slot("rebuild", b"cevil\nrebuild\n"), "ok"),
    "slot_rebuild_v3": ("plain", F.slot("rebuild", b"ctorch._utils\n_rebuild_tensor_v3\n"),
                        "unreadable"),
    "slot_storage_as_bytes": ("plain", F.slot("storage", b"C\x07storage"), "ok"),
    "slot_storage_misspelt": ("plain", F.slot("storage", F.unicode("storagf")), "unreadable"),
    "slot_class_float_storage": ("plain", F.slot("class", b"ctorch\nFloatStorage\n"), "ok"),
    "slot_class_a_dtype": ("plain", F.slot("class", b"ctorch\nfloat32\n"), "unreadable"),
    "slot_location_cuda": ("plain", F.slot("location", F.unicode("cuda:0")), "ok"),
    "slot_location_too_long": ("plain", F.slot("location", F.unicode("c" * 65)), "unreadable"),
    "slot_location_an_int": ("plain", F.slot("location", b"K\x07"), "unreadable"),
    "slot_hooks_set": ("plain", F.slot("hooks", b"cbuiltins\nset\n", F.ODICT), "ok"),
    "slot_location_bytes": ("plain", F.slot("location", b"C\x03cpu"), "unreadable"),
    "slot_hooks_a_call_that_fails": ("plain", F.slot("hooks", b"ctorch\ndevice\n", F.ODICT),
                                     "unreadable"),  # (torch.device() needs its kind)
    "slot_hooks_an_unknown_global": ("plain", F.slot("hooks", b"cevil\nHooks\n", F.ODICT), "ok"),
    "slot_hooks_an_unknown_global_kept": ("plain", F.slot("hooks", b"cevil\nHooks\n"),
                                          "unreadable"),
    "frame_a_list": ("plain", F.framed(b"(", b"l"), "ok"),
    "frame_a_tuple": ("plain", F.framed(b"(", b"t"), "ok"),
    "frame_dropped": ("plain", F.framed(b"N(", b"1"), "ok"),
    "frame_a_tuple_in_an_ordered_dict": ("plain", F.framed(F.ODICT + b"(]((", b"tetR"),
                                         "unreadable"),
    "frame_a_list_in_an_ordered_dict": ("plain", F.framed(F.ODICT + b"(]((", b"letR"),
                                        "unreadable"),
    "frame_a_tuple_in_an_ordered_dict_kept": ("plain", F.framed_kept, "unreadable"),
    "frame_a_tuple_in_a_set_dropped": ("plain", F.framed(b"cbuiltins\nset\n((", b"ttR0N"),
                                       "unreadable"),  # (TensorRefs are unhashable)
    "odd_item_before_the_run": ("plain", F.insert(lambda run: run[0].start, F.unicode("odd")),
                                "unreadable"),
    "odd_items_before_and_after_the_run": ("plain", lambda raw, run: F.splice(raw, [
        (run[0].start, run[0].start, F.unicode("odd")),
        (run[-1].end, run[-1].end, F.unicode("odd2"))]), "unreadable"),
    "truncated_at_an_entry_end": ("plain", F.truncate(lambda run: run[1000].end), "unreadable"),
    "truncated_in_an_entry": ("plain", F.truncate(lambda run: run[1000].end - 7), "unreadable"),
    "truncated_in_a_name": ("plain", F.truncate(lambda run: run[1000].start + 9), "unreadable"),
    "truncated_after_the_run": ("plain", F.truncate(lambda run: run[-1].end + 1), "unreadable"),
    "shapes_tuples_miscounted": ("plain", F.shapes_miscounted, "unreadable"),
    "shapes_get_after_the_run": ("plain", F.shape_get_after, "ok"),
    "shapes_name_get_of_a_run_put": ("plain", F.shape_name_get_of_a_run_put, "ok"),
    # dict keys the other paths refuse to hash (more than MAX_KEY_NODES nodes)
    "shapes_name_a_deep_tuple": ("plain", F.shape_name(b")" + b"\x85" * 1100), "unreadable"),
    "shapes_name_a_wide_tuple": ("plain", F.shape_name(b"(" + b"K\x01" * 1100 + b"t"),
                                 "unreadable"),
    "shapes_name_a_short_tuple": ("plain", F.shape_name(b"K\x01K\x02\x86"), "ok"),
    "shapes_put_beyond_the_memo_bound": ("plain", F.shape_put_beyond_the_memo_bound, "ok"),
}


@pytest.fixture(scope="module")
def forged_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("forged")


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_runs_read_as_the_other_readers_read_them(forgery, made, forged_dir, chunked,
                                                         monkeypatch):
    base, forge, expected = FORGERIES[forgery]
    src = made(base)
    raw, run = _entries(src)
    forged = forge(raw, run)
    assert forged != raw and len(forged) > 64 << 10  # (read in chunks: the run path's way)
    path = F.rewrite(src, forged_dir / f"{forgery}.pt", forged)
    assert pickle_runs.may_hold_run(forged[:64 << 10], len(forged))  # the run path is tried
    pickle_runs.prepare_with_runs(forged)  # declines (None) or proves: never raises
    outcome = three_ways(path, monkeypatch)
    kind, what = outcome[:2]
    assert kind == expected, what
    if forgery.startswith("get_after") and not forgery.endswith("tensor"):
        assert type(what[0]["forged"]) is {"key": str, "pid": tuple, "size": tuple,
                                           "stride": tuple, "hooks": PickledOrderedDict,
                                           "args": tuple}[forgery.rsplit("_", 1)[1]]
    if "unknown_global" in forgery:  # named before the run: reported on every path
        got = what[2] if kind == "ok" else outcome[3]
        assert [g for g in got if g.startswith("evil.")] == [f"evil.{forgery.split('_')[1]}"
                                                              .replace("hooks", "Hooks")]
    if forgery == "get_after_the_run_of_its_tensor":
        assert what[0]["forged"] is what[0]["module"][run[600].name]
    if forgery.endswith("_beyond_the_memo_bound"):
        # the scan's bound on memo indices (the C memo is an array that size): not the run
        # path's either
        assert "ok" not in chunked.loads


def _flips() -> list[tuple[int, int]]:
    """(offset in a run entry, XOR mask): every opcode's byte with its low bit flipped, and
    argument bytes (a name's length and text, a key, PUT and GET indices) inverted."""
    return [(i, 1) for i in range(30)] + [(i, 0xFF) for i in ("name_len", "name", "key",
                                                              "put1", "put3", "get")]


@pytest.fixture(scope="module")
def flip_base(made):
    src = made("plain")
    raw, run = _entries(src)
    return src, raw, run[650]


@pytest.mark.parametrize("op, mask", _flips())
def test_a_flipped_byte_in_a_run_entry_crc_correct(op, mask, flip_base, forged_dir, chunked,
                                                   monkeypatch):
    src, raw, entry = flip_base
    if isinstance(op, int):
        at = entry.ops[op][0]
    else:
        at = {"name_len": entry.start + 1, "name": entry.start + 8,
              "key": entry.ops[7][0] + 5, "put1": entry.puts[3][0] + 1,
              "put3": entry.puts[6][0] + 3, "get": entry.gets[2][0] + 1}[op]
    forged = bytearray(raw)
    forged[at] ^= mask
    path = F.rewrite(src, forged_dir / f"flip_{op}_{mask}.pt", bytes(forged))
    three_ways(path, monkeypatch)


@pytest.mark.parametrize("where", ["in_the_run", "before_the_run", "after_the_run"])
def test_a_data_pkl_failing_its_crc_says_so_through_the_run_path(where, made, forged_dir,
                                                                 chunked, monkeypatch):
    src = made("plain")
    raw, run = _entries(src)
    path = forged_dir / f"crc_{where}.pt"
    path.write_bytes(src.read_bytes())
    start, size = D.zip_entry(path, "data.pkl")
    at = {"in_the_run": run[800].start + 3, "before_the_run": run[0].start - 20,
          "after_the_run": len(raw) - 40}[where]
    D.flip(path, start + at)
    assert zlib.crc32(D.pickle_of(path)) != zlib.crc32(raw)
    kind, message = three_ways(path, monkeypatch)[:2]
    assert kind == "unreadable" and message.startswith(
        f"{path}: data.pkl fails its CRC check (the bytes are damaged)")
    assert chunked.loads == []  # (refused before any reader)


def test_plain_dict_module_is_a_dict_after_the_load(made, chunked, monkeypatch):
    """The PickledDict the fast paths build is swapped for a dict (`plain`) with the run's
    entries in it, as on the bounded path."""
    obj = three_ways(made("module_a_plain_dict"), monkeypatch)[1][0]
    raw = D.pickle_of(made("module_a_plain_dict"))
    assert chunked.loads == ["ok"] and \
        chunked.module_runs() == [len(F.run_of(F.module_entries(raw), raw))]
    assert type(obj["module"]) is dict and not isinstance(obj["module"], PickledDict)
    assert list(obj["module"]) == NAMES
    assert all(type(t) is TensorRef and type(t.storage) is StorageRef
               for t in obj["module"].values())
