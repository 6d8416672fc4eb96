"""ZeRO-3 model-states files as torch.save writes them, and byte-level forgeries of the runs of
placeholder entries in their data.pkl (tests/test_pickle_runs.py).

`model_states` mirrors the key order and structure of DeepSpeed 0.19.8's model states (the
fixture s3_w4_bf16's rank files): `module` (an OrderedDict state_dict with `_metadata`, an empty
1-D tensor per param), buffer_names, optimizer, param_shapes, frozen_param_shapes,
shared_params, frozen_param_fragments, ..., ds_config, ds_version. `module_entries` finds each
placeholder entry of a data.pkl with pickletools (where its opcodes, PUTs and GETs are), and the
small helpers below splice opcodes; `rewrite` writes a pickle back into a copy of a file with
valid CRCs (damage.rewrite_pickle)."""

from __future__ import annotations

import pickletools
import shutil
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import damage as D
import torch

PUTS = ("BINPUT", "LONG_BINPUT")
GETS = ("BINGET", "LONG_BINGET")
#: a placeholder entry as torch pickles it once its globals are memoized (None: a PUT; "bool":
#: NEWTRUE or NEWFALSE)
ENTRY = ("BINUNICODE", None, "BINGET", "MARK", "MARK", "BINGET", "BINGET", "BINUNICODE", None,
         "BINGET", "BININT1", "TUPLE", None, "BINPERSID", "BININT1", "BININT1", "TUPLE1", None,
         "BININT1", "TUPLE1", None, "bool", "BINGET", "EMPTY_TUPLE", "REDUCE", None, "TUPLE",
         None, "REDUCE", None)
#: the PUTs of an entry, in order
PUT_NAMES = ("name", "key", "pid", "size", "stride", "hooks", "args", "tensor")
#: the GETs of an entry, in order
GET_NAMES = ("rebuild", "storage", "class", "location", "hooks")


def llama_names(layers: int) -> list[str]:
    """A Llama model's param names (9 a layer), embedding first and head last."""
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight", "input_layernorm.weight",
                                  "post_attention_layernorm.weight")]
    return names + ["model.norm.weight", "lm_head.weight"]


def placeholder(dtype=torch.bfloat16, requires_grad: bool = False) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, requires_grad=requires_grad)


def shape_of(name: str) -> torch.Size:
    return torch.Size([8]) if "norm" in name else torch.Size([8, 8])


def model_states(path: Path, module: dict, *, buffer_names: list | None = None,
                 share_names: bool = True, frozen: list[str] | None = None,
                 shared_params: dict | None = None, param_names: list | None = None) -> Path:
    """torch.save of DeepSpeed ZeRO-3 model states holding `module`. param_shapes names every
    module entry that is a placeholder (or `param_names`), with the module's very name strings
    (memo GETs, as DeepSpeed's files) unless not `share_names`; `frozen` names go to
    frozen_param_shapes (and frozen_param_fragments) instead."""
    frozen = frozen or []
    if param_names is None:
        param_names = [n for n, t in module.items() if t.numel() == 0 and n not in frozen]
    own = (lambda n: n) if share_names else (lambda n: "".join(list(n)))
    names = list(module)
    if isinstance(module, OrderedDict):
        module._metadata = OrderedDict([("", {"version": 1}), ("model", {"version": 1})])
    states = {
        "module": module,
        "buffer_names": list(buffer_names or []),
        "optimizer": None,
        "param_shapes": [OrderedDict((own(n), shape_of(n)) for n in param_names)],
        "frozen_param_shapes": OrderedDict((n, shape_of(n)) for n in frozen) if frozen else None,
        "shared_params": dict(shared_params or {}),
        "frozen_param_fragments": OrderedDict((n, torch.zeros(3, dtype=torch.bfloat16))
                                              for n in frozen) if frozen else None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": 2,
        "global_samples": 16,
        "dp_world_size": 4,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                      "names_seen": len(names)},
        "ds_version": "0.19.8",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, path)
    return path


def llama_module(layers: int, dtype=torch.bfloat16) -> OrderedDict:
    return OrderedDict((n, placeholder(dtype)) for n in llama_names(layers))


# ------------------------------------------------------------------ reading a data.pkl's entries


@dataclass
class Entry:
    """One placeholder entry of a data.pkl: its bytes are raw[start:end]."""

    start: int
    end: int
    name: str
    key: str
    #: (position of the opcode, its length, memo index) of each PUT, in PUT_NAMES order
    puts: list[tuple[int, int, int]] = field(default_factory=list)
    #: (position, memo index) of each GET, in GET_NAMES order
    gets: list[tuple[int, int]] = field(default_factory=list)
    #: (position, opcode name) of every opcode of the entry
    ops: list[tuple[int, str]] = field(default_factory=list)

    def put(self, what: str) -> int:
        return self.puts[PUT_NAMES.index(what)][2]

    def get(self, what: str) -> int:
        return self.gets[GET_NAMES.index(what)][1]

    @property
    def high(self) -> bool:
        """All its PUTs LONG_BINPUTs of index >= 256 (what a run's entries are)."""
        return all(n == 5 and i >= 256 for _, n, i in self.puts)


def _matches(op, want) -> bool:
    if want is None:
        return op.name in PUTS
    if want == "bool":
        return op.name in ("NEWTRUE", "NEWFALSE")
    return op.name == want


def module_entries(raw: bytes) -> list[Entry]:
    """Every placeholder entry of `raw`, in order."""
    ops = list(pickletools.genops(raw))
    out, i = [], 0
    while i + len(ENTRY) <= len(ops):
        window = ops[i:i + len(ENTRY)]
        if not all(_matches(op, want) for (op, _, _), want in zip(window, ENTRY, strict=True)):
            i += 1
            continue
        end = ops[i + len(ENTRY)][2]
        e = Entry(window[0][2], end, window[0][1], window[7][1])
        for op, arg, pos in window:
            e.ops.append((pos, op.name))
            if op.name in PUTS:
                e.puts.append((pos, 2 if op.name == "BINPUT" else 5, arg))
            elif op.name in GETS:
                e.gets.append((pos, arg))
        out.append(e)
        i += len(ENTRY)
    return out


def run_of(entries: list[Entry], raw: bytes) -> list[Entry]:
    """The longest stretch of entries that follow each other (or across a batch's SETITEMS +
    MARK) with every PUT a LONG_BINPUT >= 256 and the same GETs: where a run lies."""
    best, cur = [], []
    for e in entries:
        joined = cur and (raw[cur[-1].end:e.start] in (b"", b"u(")) and \
            [g for _, g in cur[-1].gets] == [g for _, g in e.gets]
        cur = cur + [e] if e.high and joined else [e] if e.high else []
        if len(cur) > len(best):
            best = cur
    return best


def index_positions(raw: bytes, what: tuple[str, ...]) -> list[tuple[int, object]]:
    """(position, argument) of every opcode named in `what`."""
    return [(pos, arg) for op, arg, pos in pickletools.genops(raw) if op.name in what]


# ------------------------------------------------------------------ opcodes and splicing


def long_put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def unicode(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def splice(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`raw` with each (start, end, new) span replaced (spans sorted, not overlapping)."""
    out, pos = [], 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
        assert start >= pos, "overlapping edits"
        out += [raw[pos:start], new]
        pos = end
    return b"".join(out + [raw[pos:]])


def set_put(raw: bytes, put: tuple[int, int, int], index: int) -> bytes:
    """The PUT `put` (from Entry.puts) given memo index `index` (as a LONG_BINPUT)."""
    pos, n, _ = put
    return splice(raw, [(pos, pos + n, long_put(index))])


def add_top_item(raw: bytes, key: str, value: bytes) -> bytes:
    """A key -> value (opcodes) pair added at the end of the pickle's top dict (torch.save's
    pickle of a dict ends with its last SETITEMS and STOP)."""
    assert raw.endswith(b"u."), raw[-8:]
    return raw[:-2] + unicode(key) + value + b"u."


def rewrite(src: Path, dest: Path, raw: bytes) -> Path:
    """A copy of `src` at `dest` whose data.pkl is `raw` (every CRC valid)."""
    shutil.copyfile(src, dest)
    D.rewrite_pickle(dest, raw)
    return dest


@dataclass
class ShapeEntry:
    """One param_shapes entry (GET name, GET torch.Size, ints, TUPLEn, PUT, TUPLE1, PUT,
    REDUCE, PUT): its dims' opcodes are raw[dims:tuple_op + 1]."""

    start: int
    dims: int
    tuple_op: int
    end: int
    ndims: int


def shape_entries(raw: bytes) -> list[ShapeEntry]:
    """Every torch.Size entry of a dict whose dims are BININT1s and a TUPLE1/2/3."""
    ops = list(pickletools.genops(raw))
    tail = (PUTS, ("TUPLE1",), PUTS, ("REDUCE",), PUTS)
    out = []
    for i, (op, _, pos) in enumerate(ops):
        n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(op.name)
        if n is None or i < n + 2 or i + 6 > len(ops):
            continue
        head = ops[i - n - 2:i]
        if head[0][0].name in GETS and head[1][0].name in GETS and \
                all(o.name == "BININT1" for o, _, _ in head[2:]) and \
                all(ops[i + 1 + j][0].name in want for j, want in enumerate(tail)):
            out.append(ShapeEntry(head[0][2], head[2][2], pos, ops[i + 6][2], n))
    return out


def unused_index(raw: bytes) -> int:
    """A memo index no PUT of `raw` uses (above them all)."""
    return 1 + max(arg for _, arg in index_positions(raw, PUTS))


# ------------------------------------------------------------------ forgeries of a run
# each makes forge(raw, run) -> raw: `run` is run_of(module_entries(raw), raw)

ODICT = b"ccollections\nOrderedDict\n"


def get_after(what: str):
    return lambda raw, run: add_top_item(raw, "forged", get(run[600].put(what)))


def reuse(src: int, what: str, dst: int, later_get: bool = True):
    """run[src]'s `what` PUT given run[dst]'s name index; that index GET'd after the run."""
    def forge(raw, run):
        index = run[dst].put("name")
        out = set_put(raw, run[src].puts[PUT_NAMES.index(what)], index)
        return add_top_item(out, "forged", get(index)) if later_get else out
    return forge


def reuse_before(what: str):
    """An index PUT before the run (a stack-neutral string, PUT, POP), PUT again by the run's
    `what` and GET'd after the run."""
    def forge(raw, run):
        index = unused_index(raw)
        out = set_put(raw, run[700].puts[PUT_NAMES.index(what)], index)
        out = splice(out, [(run[0].start, run[0].start,
                            unicode("before") + long_put(index) + b"0")])
        return add_top_item(out, "forged", get(index))
    return forge


def set_key(at: int, source):
    """run[at]'s storage key made `source(raw, run)`'s text (a new BINUNICODE)."""
    def forge(raw, run):
        e = run[at]
        pos = e.ops[7][0]
        return splice(raw, [(pos, e.puts[1][0], unicode(source(raw, run)))])
    return forge


def set_name(at: int, source):
    """run[at]'s name made `source(raw, run)`'s text (a new BINUNICODE)."""
    def forge(raw, run):
        e = run[at]
        return splice(raw, [(e.start, e.puts[0][0], unicode(source(raw, run)))])
    return forge


def slot(what: str, obj: bytes, restored: bytes = b""):
    """The memo slot the run GETs as `what` holds `obj` from the run's first entry on (and
    `restored`, if any, after the run: the OrderedDicts that follow it)."""
    def forge(raw, run):
        put = b"q" + bytes([run[0].get(what)]) + b"0"
        return splice(raw, [(run[0].start, run[0].start, obj + put)] +
                      [(run[-1].end, run[-1].end, restored + put)] * bool(restored))
    return forge


def framed(before: bytes, after: bytes):
    """The run's entries (batch boundaries dropped) as the items of another frame, under a
    key 'forged' of the module: `before` + entries + `after`."""
    def forge(raw, run):
        body = b"".join(raw[e.start:e.end] for e in run)
        return raw[:run[0].start] + unicode("forged") + before + body + after + \
            raw[run[-1].end:]
    return forge


def insert(at, data: bytes):
    return lambda raw, run: splice(raw, [(at(run), at(run), data)])


def truncate(at):
    return lambda raw, run: raw[:at(run)]


def shapes_miscounted(raw, run):
    """param_shapes: an entry's two dims under TUPLE1, the next entry's one dim under TUPLE2
    (as many items in all: the two together look like two shapes in bulk)."""
    shapes = shape_entries(raw)
    i = next(i for i, s in enumerate(shapes[500:], 500)
             if s.ndims == 2 and shapes[i + 1].ndims == 1)
    a, b = shapes[i], shapes[i + 1]
    return splice(raw, [(a.tuple_op, a.tuple_op + 1, b"\x85"),
                        (b.tuple_op, b.tuple_op + 1, b"\x86")])


def shape_get_after(raw, run):
    s = shape_entries(raw)[700]
    index = int.from_bytes(raw[s.tuple_op + 2:s.tuple_op + 6], "little")
    return add_top_item(raw, "forged", get(index))


def shape_name_get_of_a_run_put(raw, run):
    """param_shapes: an entry's name GET reads the dims tuple the entry before PUT (the key
    is that tuple on the other paths)."""
    shapes = shape_entries(raw)
    a, b = shapes[699], shapes[700]
    index = int.from_bytes(raw[a.tuple_op + 2:a.tuple_op + 6], "little")
    width = 2 if raw[b.start] == ord("h") else 5
    return splice(raw, [(b.start, b.start + width, get(index))])


def shape_put_beyond_the_memo_bound(raw, run):
    s = shape_entries(raw)[700]
    return splice(raw, [(s.tuple_op + 1, s.tuple_op + 6, long_put(1 << 22))])


def shape_name(key: bytes):
    """param_shapes: an entry's name GET reads the object `key` (opcodes) PUT before the runs."""
    def forge(raw, run):
        index = unused_index(raw)
        b = shape_entries(raw)[700]
        width = 2 if raw[b.start] == ord("h") else 5
        return splice(raw, [(run[0].start, run[0].start, key + long_put(index) + b"0"),
                            (b.start, b.start + width, get(index))])
    return forge


def framed_kept(raw, run):
    """As frame_a_tuple_in_an_ordered_dict, and the OrderedDict's argument list (PUT) GET'd
    into the module after it."""
    index = unused_index(raw)
    out = framed(ODICT + b"(]" + long_put(index) + b"((", b"tetR")(raw, run)
    return add_top_item(out, "forged", get(index))
