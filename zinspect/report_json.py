"""What `zinspect info --json` prints: one object (`info_json`), written by `write_info_json`
as json.dumps writes it, with the params' rows made from columns (300k params: no dict each)."""

from __future__ import annotations

from zinspect.report import _group_of, _sorted_files, optimizer_json, peft_summary, totals

#: info --json's per-param fields, in order
PARAM_FIELDS = ("name", "shape", "numel", "dtype", "frozen", "tied_to", "group", "sub_group")
#: the JSON types each field may hold for a row to be written by `_row_chunks` (anything else,
#: e.g. a shape that is not a tuple of ints, goes through json.dumps)
_ROW_TYPES = {"name": {str}, "numel": {int}, "dtype": {str, type(None)}, "frozen": {bool},
              "tied_to": {str, type(None)}, "group": {int, type(None)},
              "sub_group": {int, type(None)}}


def _param_columns(ckpt) -> dict[str, list]:
    """info's per-param fields as columns ({field: one value per param, in model order})."""
    import math
    from operator import attrgetter

    from zinspect.core.model import short_dtype

    ps = list(ckpt.params.values())
    shapes, dtypes, frozen, tied, groups, subs = (list(map(attrgetter(k), ps)) for k in (
        "shape", "dtype", "frozen", "tied_to", "group", "sub_group"))
    short = {d: short_dtype(d) for d in set(dtypes) if d}
    return {"name": list(map(attrgetter("name"), ps)), "shape": shapes,
            "numel": list(map(math.prod, shapes)),  # Param.numel, at C speed
            "dtype": list(map(short.get, dtypes)), "frozen": frozen, "tied_to": tied,
            # a tied alias has its owner's group, a frozen param none
            "group": [(None if f else g) if t is None else _group_of(ckpt, p)
                      for p, t, f, g in zip(ps, tied, frozen, groups, strict=True)],
            "sub_group": [s if t is None else None for t, s in zip(tied, subs, strict=True)]}


def _info_parts(ckpt) -> tuple[dict, dict[str, list], dict]:
    """`info --json`'s object in three parts: the fields before `params`, the params as columns
    and the fields after them."""
    from zinspect.core import gc_paused
    from zinspect.core.model import short_dtype

    head = {
        "path": str(ckpt.path),
        "root": str(ckpt.root) if ckpt.root else None,
        "tag": ckpt.tag,
        "tags": list(ckpt.tags),
        "stage": ckpt.stage,
        "world_size": ckpt.world_size,
        "layout": ckpt.layout,
        "topology": ckpt.topology.sizes,
        "features": list(ckpt.features),
        "states": ckpt.states,
        "dtype": short_dtype(ckpt.dtype) if ckpt.dtype else None,
        "master_dtype": short_dtype(ckpt.master_dtype) if ckpt.master_dtype else None,
        "ds_version": ckpt.ds_version,
        "files": [{"name": f.name, "kind": f.kind, "rank": f.rank, "mp_rank": f.mp_rank,
                   "prefix": f.prefix, "size": f.size, "format": f.format or None,
                   "error": f.error, "stage": f.stage, "ds_version": f.ds_version}
                  for f in _sorted_files(ckpt)],
        "buffers": [{"name": b.name, "shape": list(b.shape), "dtype": short_dtype(b.dtype)
                     if b.dtype else None} for b in ckpt.buffers.values()],
    }
    with gc_paused():  # 297k params: no object made here is part of a cycle
        columns = _param_columns(ckpt)
    tail = {
        "groups": [{"index": g.index, "param_group": g.param_group, "params": list(g.params),
                    "numel": g.numel, "dtype": short_dtype(g.dtype) if g.dtype else None,
                    "partition_numel": {str(r): n for r, n in sorted(g.partition_numel.items())},
                    "padding": {str(r): n for r, n in sorted(g.padding.items())}}
                   for g in ckpt.groups],
        "findings": [f.to_json() for f in ckpt.findings],
        "counts": ckpt.counts(),
        "totals": totals(ckpt, columns),
        "peft": peft_summary(ckpt),
        "optimizer": optimizer_json(ckpt),
    }
    return head, columns, tail


def info_json(ckpt) -> dict:
    """What `zinspect info --json` prints, as one object (`write_info_json` writes it)."""
    head, columns, tail = _info_parts(ckpt)
    return {**head, "params": _param_dicts(columns), **tail}


def _param_dicts(columns: dict[str, list]) -> list[dict]:
    from zinspect.core import gc_paused

    with gc_paused():  # a dict per param (297k): no object in it is part of a cycle
        return [dict(zip(PARAM_FIELDS, (name, list(shape), *rest), strict=True))
                for name, shape, *rest in zip(*columns.values(), strict=True)]


def write_info_json(ckpt, out) -> None:
    """`info_json(ckpt)` written to `out` as `json.dumps(..., default=str)` writes it, byte for
    byte, without making a dict per param: the usual rows are formatted from the columns at C
    speed and written in chunks (at 297k params: 0.2 s instead of 1.1 s, and no 60 MB string)."""
    import json

    from zinspect.core import gc_paused

    with gc_paused():  # a few tuples per param (297k), none of them part of a cycle
        head, columns, tail = _info_parts(ckpt)
        chunks = _row_chunks(columns)
        if chunks is None:  # some value the rows below do not write as json.dumps would
            out.write(json.dumps({**head, "params": _param_dicts(columns), **tail}, default=str))
            return
        out.write(json.dumps(head, default=str)[:-1] + ', "params": [')
        for i, chunk in enumerate(chunks):
            out.write(chunk[2:] if i == 0 else chunk)  # the first row is led by no ", "
        out.write("], " + json.dumps(tail, default=str)[1:])


def _row_chunks(columns: dict[str, list], size: int = 20_000):
    """The params' rows as JSON text, `size` rows a chunk, each chunk's rows led by ", " (an
    iterator); None when a value is not of the types (`_ROW_TYPES`) written here exactly as
    json.dumps writes them. A row is its name plus two texts made once per distinct value:
    shape and numel (by shape), and the other fields (few distinct tuples)."""
    from itertools import chain, repeat
    from json import dumps
    from json.encoder import encode_basestring_ascii

    if any(not set(map(type, columns[k])) <= ok for k, ok in _ROW_TYPES.items()) or \
            not set(map(type, columns["shape"])) <= {tuple} or \
            not set(map(type, chain.from_iterable(columns["shape"]))) <= {int}:
        return None
    names, shapes = columns["name"], columns["shape"]
    shape_text = {s: f'{", ".join(map(str, s))}], "numel": {n}, '
                  for s, n in dict(zip(shapes, columns["numel"], strict=True)).items()}
    rest = PARAM_FIELDS[3:]
    keys = list(zip(*(columns[k] for k in rest), strict=True))
    rest_text = {key: ", ".join(f'"{k}": {dumps(v)}' for k, v in zip(rest, key, strict=True)) + "}"
                 for key in set(keys)}
    return ("".join(chain.from_iterable(zip(
        repeat(', {"name": '), map(encode_basestring_ascii, names[i:i + size]), repeat(', "shape": ['),
        map(shape_text.__getitem__, shapes[i:i + size]),
        map(rest_text.__getitem__, keys[i:i + size])))) for i in range(0, len(names), size))
