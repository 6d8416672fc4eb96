"""Build damaged copies of the real fixtures, one function per kind of damage.

Each builder takes a tmp dir and returns the PATH a user would pass to zinspect (the dir holding
`latest`, a tag dir, or a file). Nothing here touches the committed fixtures.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

from conftest import FIXTURES, manifest

TAG = "global_step2"


def optim_name(rank: int, prefix: str = "") -> str:
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def z3_model_name(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


MODEL = "mp_rank_00_model_states.pt"


def copy_root(tmp: Path, name: str, dest: str | None = None) -> Path:
    """A private copy of fixture `name` (latest + tag dir); returns the root holding `latest`."""
    root = tmp / (dest or name)
    root.mkdir(parents=True)
    tag = manifest(name)["tag"]
    shutil.copy2(FIXTURES / name / "latest", root / "latest")
    shutil.copytree(FIXTURES / name / tag, root / tag)
    return root


def zip_entry(path: Path, leaf: str) -> tuple[int, int]:
    """(data offset, size) of the zip record whose name ends with `leaf` (e.g. 'data.pkl')."""
    with zipfile.ZipFile(path) as zf:
        zi = next(z for z in zf.infolist() if z.filename.endswith("/" + leaf))
    with open(path, "rb") as f:
        f.seek(zi.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return zi.header_offset + 30 + name_len + extra_len, zi.file_size


def flip(path: Path, offset: int, count: int = 1) -> None:
    """XOR `count` bytes at `offset` with 0xFF."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# ------------------------------------------------------------------ the damage corpus
def missing_optim(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / TAG / optim_name(2)).unlink()
    return root


def missing_model_z3(tmp: Path) -> Path:
    root = copy_root(tmp, "s3_w4_bf16")
    (root / TAG / z3_model_name(2)).unlink()
    return root


def rank_gap_stale(tmp: Path) -> Path:
    """Ranks {0,1,3,7} for world size 4: rank 2 is gone and a stale rank-7 file (here rank 2's
    bytes under rank 7's name) keeps the file count at 4, so zero_to_fp32's count check passes
    and it takes files 0,1,3,7 as ranks 0..3: silently wrong weights (spec section 3.1)."""
    root = copy_root(tmp, "s2_w4_fp16")
    (root / TAG / optim_name(2)).rename(root / TAG / optim_name(7))
    return root


def extra_stale(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    shutil.copy2(root / TAG / optim_name(3), root / TAG / optim_name(4))
    return root


def truncated_60(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    truncate(p, p.stat().st_size * 60 // 100)
    return root


def truncated_100(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    truncate(root / TAG / optim_name(1), 100)
    return root


def corrupt_pickle(tmp: Path) -> Path:
    """Bytes flipped in the middle of rank 1's data.pkl (the zip directory is intact)."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    off, size = zip_entry(p, "data.pkl")
    flip(p, off + size // 2, 16)
    return root


def not_a_zip(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / TAG / optim_name(1)).write_text("this is not a checkpoint\n" * 100)
    return root


def zero_bytes(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    truncate(root / TAG / optim_name(1), 0)
    return root


def latest_missing_tag(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / "latest").write_text("global_step9")
    return root


def no_latest_one_tag(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / "latest").unlink()
    return root


def no_latest_two_tags(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / "latest").unlink()
    shutil.copytree(root / TAG, root / "global_step1")
    return root


def empty_dir(tmp: Path) -> Path:
    root = tmp / "empty"
    root.mkdir()
    return root


def path_is_file(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    return root / TAG / optim_name(0)


def other_world_size(tmp: Path) -> Path:
    """Rank 1 replaced by rank 1 of a ZeRO-2 run with world size 3."""
    root = copy_root(tmp, "s2_w4_fp16")
    shutil.copy2(FIXTURES / "s2_w3_fp32_rr" / TAG / optim_name(1), root / TAG / optim_name(1))
    return root


def mixed_stages(tmp: Path) -> Path:
    """A ZeRO-2 ws-2 tag dir whose rank-1 optimizer file comes from a ZeRO-3 ws-2 run."""
    root = copy_root(tmp, "s2_w2_fp32_plain")
    shutil.copy2(FIXTURES / "s3_w2_fp32" / TAG / optim_name(1), root / TAG / optim_name(1))
    return root


def unreadable_file(tmp: Path) -> Path:
    root = copy_root(tmp, "s2_w4_fp16")
    (root / TAG / optim_name(1)).chmod(0)
    return root


def malicious_pickle(tmp: Path, marker: Path) -> Path:
    """The model-states file replaced by a pickle whose load runs `touch MARKER`: a dict shaped
    like model states, with the payload in `module` and in a client_state key."""
    import torch

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    root = copy_root(tmp, "s2_w4_fp16")
    torch.save({"module": Evil(), "buffer_names": [], "param_shapes": Evil(),
                "ds_version": "0.19.8", "client": Evil()}, root / TAG / MODEL)
    return root


def set_crc(path: Path, leaf: str) -> None:
    """Rewrite the central-directory CRC of record `leaf` to match its current bytes, so the
    damage gets past zipfile's CRC check and reaches the parser behind it."""
    import zlib

    off, size = zip_entry(path, leaf)
    data = path.read_bytes()
    crc = zlib.crc32(data[off:off + size])
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
    buf = bytearray(data)
    while buf[pos:pos + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack("<HHH", buf[pos + 28:pos + 34])
        if buf[pos + 46:pos + 46 + n].decode().endswith("/" + leaf):
            buf[pos + 16:pos + 20] = struct.pack("<I", crc)
            break
        pos += 46 + n + e + c
    else:
        raise AssertionError(f"{leaf} not in the central directory of {path}")
    path.write_bytes(bytes(buf))


def corrupt_pickle_crc_ok(tmp: Path) -> Path:
    """Invalid opcodes written over rank 1's data.pkl at an opcode boundary half-way through,
    with the zip CRC fixed up: the damage reaches the unpickler."""
    import pickletools

    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    off, size = zip_entry(p, "data.pkl")
    raw = p.read_bytes()[off:off + size]
    ops = [pos for _, _, pos in pickletools.genops(raw)]
    at = ops[len(ops) // 2]
    with open(p, "r+b") as f:
        f.seek(off + at)
        f.write(b"\xff" * 8)
    set_crc(p, "data.pkl")
    return root


def all_unreadable(tmp: Path) -> Path:
    """Every file of the tag dir emptied: the checkpoint is found but nothing can be read."""
    root = copy_root(tmp, "s2_w4_fp16")
    for p in (root / TAG).iterdir():
        truncate(p, 0)
    return root


# ------------------------------------------------------------------ hostile paths and names
#: a param name forged to clear the line, start a fake "ok" line and set the terminal title;
#: as long as the name it replaces, so the pickle's string lengths stay right
FORGED_NAME = "\x1b[2K\nok: 0 errors\x1b]0;\x07"
FORGED_OF = "encoder.odd_out.weight"
assert len(FORGED_NAME) == len(FORGED_OF)


def forged_name(tmp: Path) -> Path:
    """s2_w2_fp32_plain with `encoder.odd_out.weight` renamed to FORGED_NAME in every pickle
    (model states and the optimizer file that names it), the zip CRCs fixed up."""
    root = copy_root(tmp, "s2_w2_fp32_plain", "forged_name")
    for p in (root / TAG).iterdir():
        off, size = zip_entry(p, "data.pkl")
        data = bytearray(p.read_bytes())
        pkl = bytes(data[off:off + size])
        if FORGED_OF.encode() not in pkl:
            continue
        data[off:off + size] = pkl.replace(FORGED_OF.encode(), FORGED_NAME.encode())
        p.write_bytes(bytes(data))
        set_crc(p, "data.pkl")
    return root


def hostile_latest(tmp: Path, content: bytes, name: str = "hostile_latest") -> Path:
    """s2_w2_fp32_plain whose `latest` holds `content`, with a healthy decoy tag dir
    `tmp/decoy` beside the root (where `../decoy` or its absolute path would lead)."""
    root = copy_root(tmp, "s2_w2_fp32_plain", name)
    (root / "latest").write_bytes(content)
    decoy = tmp / "decoy"
    if not decoy.exists():
        shutil.copytree(FIXTURES / "s1_w2_fp32" / manifest("s1_w2_fp32")["tag"], decoy)
    return root


#: what can sit under a rank-file name besides a regular file
SPECIAL_KINDS = ("fifo", "dev_zero_link", "dangling_link", "link_loop", "directory")


def special_rank_file(tmp: Path, kind: str, leaf: str = MODEL,
                      fixture: str = "s2_w2_fp32_plain") -> Path:
    """A copy of `fixture` whose rank file `leaf` is replaced by `kind` (SPECIAL_KINDS), or by
    a symbolic link to a regular copy of itself ("regular_link")."""
    import os

    root = copy_root(tmp, fixture, f"{fixture}_{kind}")
    p = root / TAG / leaf
    if kind == "regular_link":
        moved = root.parent / f"{root.name}-real-file"  # not a *_states.pt name
        p.rename(moved)
        p.symlink_to(moved)
        return root
    p.unlink()
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev_zero_link":
        p.symlink_to("/dev/zero")
    elif kind == "dangling_link":
        p.symlink_to(root / "no_such_file")
    elif kind == "link_loop":
        p.symlink_to(p.name)
    elif kind == "directory":
        p.mkdir()
    else:
        raise ValueError(kind)
    return root


# ------------------------------------------------------------------ the verifying merge (issue 8)


def record_holding(path: Path, offset: int) -> tuple[str, int, int]:
    """(record name, data offset, size) of the zip record of `path` whose data holds `offset`."""
    with zipfile.ZipFile(path) as zf:
        names = [z.filename for z in zf.infolist()]
    for name in names:
        off, size = zip_entry(path, name.split("/", 1)[1])
        if off <= offset < off + size:
            return name, off, size
    raise AssertionError(f"no record of {path} holds byte {offset}")


def flipped_fp32_record(tmp: Path, param: str = "encoder.cube") -> Path:
    """Four bytes flipped at the start of rank 1's fp32 master piece of `param` (s3_w2_fp32):
    the zip directory and the pickles are intact, only the record's CRC32 no longer matches."""
    from zinspect.core import open_checkpoint

    root = copy_root(tmp, "s3_w2_fp32", "flipped_fp32_record")
    frag = next(f for f in open_checkpoint(root).params[param].fragments if f.rank == 1)
    flip(root / TAG / frag.file, frag.offset, 4)
    return root


def nan_in_master(tmp: Path, param: str = "encoder.cube") -> Path:
    """A NaN and an Inf written into rank 0's fp32 master piece of `param` (s3_w2_fp32), with
    the record's CRC updated: the bytes are as saved (a diverged run), not corrupt."""
    from zinspect.core import open_checkpoint

    root = copy_root(tmp, "s3_w2_fp32", "nan_in_master")
    frag = next(f for f in open_checkpoint(root).params[param].fragments if f.rank == 0)
    path = root / TAG / frag.file
    with open(path, "r+b") as f:
        f.seek(frag.offset + 4)
        f.write(struct.pack("<II", 0x7FC00000, 0xFF800000))
    set_crc(path, record_holding(path, frag.offset)[0].split("/", 1)[1])
    return root


# ------------------------------------------------------------------ forged structure (issue 8)
def pickle_of(path: Path) -> bytes:
    """The data.pkl bytes of a torch.save zip."""
    off, size = zip_entry(path, "data.pkl")
    return path.read_bytes()[off:off + size]


def rewrite_pickle(path: Path, raw: bytes) -> None:
    """Rewrite the zip at `path` with its data.pkl replaced by `raw` (the other records and
    their order kept, stored uncompressed; CRCs valid): a forged file that passes every CRC."""
    with zipfile.ZipFile(path) as zf:
        records = [(zi.filename, zf.read(zi)) for zi in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, raw if name.endswith("/data.pkl") else data)


def forge_partition_count(path: Path, value: int) -> None:
    """Every int of the `partition_count` list in `path`'s pickle becomes `value` (written as
    LONG4: any size, any sign); every CRC stays valid."""
    import pickletools

    raw = pickle_of(path)
    out, last, inside = [], 0, False
    for op, arg, pos in pickletools.genops(raw):
        if op.name.endswith("UNICODE") and arg == "partition_count":
            inside = True
        elif inside and op.name in ("BININT1", "BININT2", "BININT"):
            size = {"BININT1": 2, "BININT2": 3, "BININT": 5}[op.name]
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            out += [raw[last:pos], b"\x8b" + struct.pack("<i", len(data)) + data]
            last = pos + size
        elif inside and op.name in ("APPENDS", "APPEND", "TUPLE", "TUPLE3"):
            break
    assert out, "no partition_count ints found"
    rewrite_pickle(path, b"".join(out) + raw[last:])


def _central_entries(buf: bytes) -> list[tuple[int, str]]:
    """(position in the file, name) of every central-directory entry."""
    with zipfile.ZipFile(__import__("io").BytesIO(buf)) as zf:
        pos = zf.start_dir
    out = []
    while buf[pos:pos + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack("<HHH", buf[pos + 28:pos + 34])
        out.append((pos, buf[pos + 46:pos + 46 + n].decode()))
        pos += 46 + n + e + c
    return out


def _patch_central(path: Path, leaf: str, fmt: str, at: int, value) -> None:
    buf = bytearray(path.read_bytes())
    pos = next(p for p, name in _central_entries(bytes(buf)) if name.endswith("/" + leaf))
    struct.pack_into(fmt, buf, pos + at, value)
    path.write_bytes(bytes(buf))


def _rename_record(path: Path, leaf: str, new_leaf: str, local: bool, central: bool) -> None:
    """Rename record `leaf` to `new_leaf` (same length) in its local header and/or its central
    entry."""
    assert len(leaf) == len(new_leaf)
    buf = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        zi = next(z for z in zf.infolist() if z.filename.endswith("/" + leaf))
    new = (zi.filename[: -len(leaf)] + new_leaf).encode()
    if local:
        buf[zi.header_offset + 30:zi.header_offset + 30 + len(new)] = new
    if central:
        pos = next(p for p, name in _central_entries(bytes(buf)) if name == zi.filename)
        buf[pos + 46:pos + 46 + len(new)] = new
    path.write_bytes(bytes(buf))


def _fp32_and_moment(path: Path) -> tuple[str, str]:
    """Record keys of rank file `path`'s first fp32 partition and of a same-sized Adam moment."""
    from zinspect.core.torchzip import read_torch_file

    tf = read_torch_file(path)
    osd = tf.obj["optimizer_state_dict"]
    flat = (osd.get("single_partition_of_fp32_groups") or osd["fp32_flat_groups"])[0]
    state = (osd.get("base_optimizer_state") or osd["optimizer_state_dict"])["state"]
    moment = next(v["exp_avg"] for v in state.values() if v["exp_avg"].numel == flat.numel)
    return flat.storage.key, moment.storage.key


def zip_duplicate_name(tmp: Path) -> Path:
    """Rank 1's Adam-moment record renamed (local and central) to the fp32 partition's name:
    two records named data/<k>; a reader taking the last one merges the moment as the weight."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    flat, moment = _fp32_and_moment(p)
    assert len(flat) == len(moment)
    _rename_record(p, "data/" + moment, "data/" + flat, local=True, central=True)
    return root


def zip_entry_elsewhere(tmp: Path) -> Path:
    """Rank 1's central entry for the fp32 partition pointed at the Adam moment's record."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    flat, moment = _fp32_and_moment(p)
    with zipfile.ZipFile(p) as zf:
        target = next(z for z in zf.infolist() if z.filename.endswith("/data/" + moment))
    _patch_central(p, "data/" + flat, "<I", 42, target.header_offset)
    return root


def zip_local_mismatch(tmp: Path) -> Path:
    """Rank 1's fp32 partition record renamed in its local header only."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    flat, _ = _fp32_and_moment(p)
    _rename_record(p, "data/" + flat, "data/" + "x" * len(flat), local=True, central=False)
    return root


def zip_overlap(tmp: Path) -> Path:
    """Rank 1's fp32 partition record grown by 64 bytes in the central directory: it runs into
    the next record."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    flat, _ = _fp32_and_moment(p)
    with zipfile.ZipFile(p) as zf:
        zi = next(z for z in zf.infolist() if z.filename.endswith("/data/" + flat))
    for at in (20, 24):  # compressed and uncompressed size
        _patch_central(p, "data/" + flat, "<I", at, zi.file_size + 64)
    return root


def _ops(raw: bytes):
    import pickletools

    return list(pickletools.genops(raw))


def _int_op(value: int) -> bytes:
    """The pickle opcode pushing `value`."""
    import pickle

    return pickle.dumps(value, protocol=2)[2:-1]


def _replace_ops(raw: bytes, spans: list[tuple[int, int, bytes]]) -> bytes:
    out, pos = [], 0
    for start, end, new in sorted(spans):
        out += [raw[pos:start], new]
        pos = end
    return b"".join(out + [raw[pos:]])


def negative_storage_offset(tmp: Path) -> Path:
    """Rank 1's fp32 partition given storage offset -16 (it would read the record before)."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    raw = pickle_of(p)
    ops = _ops(raw)
    key = _fp32_and_moment(p)[0]
    i = next(k for k, (op, arg, _) in enumerate(ops)
             if op.name == "BINPERSID" and any(a == key for _, a, _ in ops[k - 8:k]))
    op, arg, pos = ops[i + 1] if ops[i + 1][0].name != "BINPUT" else ops[i + 2]
    assert arg == 0, (op.name, arg)
    end = next(q for _, _, q in ops if q > pos)
    rewrite_pickle(p, _replace_ops(raw, [(pos, end, _int_op(-16))]))
    return root


def _shape_dims(raw: bytes) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """(name, [(value, start, end) of each dim opcode]) of each param_shapes entry, in order."""
    ops = _ops(raw)
    start = next(k for k, (_, arg, _) in enumerate(ops) if arg == "param_shapes")
    out, name = [], None
    for k in range(start + 1, len(ops)):
        op, arg, pos = ops[k]
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
            if isinstance(arg, str) and "." in arg:
                name = arg
                out.append((name, []))
            elif out:
                break  # the next key of the top-level dict
        elif op.name in ("BININT1", "BININT2", "BININT", "LONG1") and out:
            out[-1][1].append((arg, pos, ops[k + 1][2]))
    return out


def shape_off(tmp: Path, name: str = "s2_w4_fp16", by: int = 2) -> Path:
    """The first 1-D trainable param of `name` declared `by` elements longer in param_shapes
    (CRCs valid): the flat group no longer adds up."""
    root = copy_root(tmp, name)
    p = root / TAG / (MODEL if (root / TAG / MODEL).exists() else z3_model_name(0))
    raw = pickle_of(p)
    param, dims = next((n, d) for n, d in _shape_dims(raw) if len(d) == 1)
    value, start, end = dims[0]
    rewrite_pickle(p, _replace_ops(raw, [(start, end, _int_op(value + by))]))
    (root / "forged_param.txt").write_text(param)
    return root


def shape_off_z3(tmp: Path) -> Path:
    return shape_off(tmp, "s3_w4_bf16")


def numel_balanced(tmp: Path) -> Path:
    """The first two params' first dims set to 10**18 and -10**18 + their sizes."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / MODEL
    raw = pickle_of(p)
    (_, d1), (_, d2) = _shape_dims(raw)[:2]
    spans = [(d1[0][1], d1[0][2], _int_op(10**18)), (d2[0][1], d2[0][2], _int_op(-10**18))]
    rewrite_pickle(p, _replace_ops(raw, spans))
    return root


def append_to_pickle(tmp: Path, ops: bytes, fixture: str = "s2_w4_fp16") -> Path:
    """`ops` (leaving a key and a value on the stack) spliced in before the final STOP of the
    model-states pickle, with SETITEM: the real dict gains one forged entry."""
    root = copy_root(tmp, fixture)
    p = root / TAG / MODEL
    raw = pickle_of(p)
    assert raw.endswith(b".")
    rewrite_pickle(p, raw[:-1] + ops + b"s.")
    return root


def _key(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def memo_bomb(tmp: Path) -> Path:
    """A value of 2**60 nodes from 121 bytes: None, then 60 times (DUP, TUPLE2)."""
    return append_to_pickle(tmp, _key("bomb") + b"N" + b"2\x86" * 60)


def memo_bomb_key(tmp: Path) -> Path:
    """A storage reference whose key is a memo bomb (formatting it never ends)."""
    pid = (b"(" + _key("storage") + b"ctorch\nFloatStorage\n" + b"N" + b"2\x86" * 60 +
           _key("cpu") + b"K\x04t" + b"Q")
    return append_to_pickle(tmp, _key("bomb") + pid)


def deep_key(tmp: Path) -> Path:
    """A dict key that is a tuple nested 200,000 deep (hashing it recurses)."""
    return append_to_pickle(tmp, b"N" + b"\x85" * 200_000 + b"N")


def huge_memo_index(tmp: Path) -> Path:
    """A LONG_BINPUT at index 2**32-2 in a 5 MB pickle (the C unpickler, used for pickles over
    4 MB, sized its memo array by it: gigabytes)."""
    return append_to_pickle(tmp, b"N0" * (5 << 19) + _key("memo") + b"N" + b"r\xfe\xff\xff\xff")


def giant_string(tmp: Path) -> Path:
    """A 24 MiB string value."""
    return append_to_pickle(tmp, _key("name") + _key("x" * (24 << 20)))


def model_100_bytes(tmp: Path, name: str = "s2_w4_fp16") -> Path:
    """The (rank-0) model-states file cut to its first 100 bytes."""
    root = copy_root(tmp, name)
    model = root / TAG / MODEL
    truncate(model if model.exists() else root / TAG / z3_model_name(0), 100)
    return root


def model_100_bytes_z3(tmp: Path) -> Path:
    return model_100_bytes(tmp, "s3_w4_bf16")


def model_100_bytes_z1(tmp: Path) -> Path:
    return model_100_bytes(tmp, "s1_w2_fp32")


def corrupt_rank0_optim(tmp: Path) -> Path:
    """Rank 0's optimizer file overwritten with text (the reference rank for the layout)."""
    root = copy_root(tmp, "s2_w4_fp16")
    (root / TAG / optim_name(0)).write_text("this is not a checkpoint\n" * 100)
    return root


def zip_record_past_eof(tmp: Path) -> Path:
    """Rank 1's fp32 partition record said (in the central directory) to be 1 MiB long: it
    runs past the end of the file."""
    root = copy_root(tmp, "s2_w4_fp16")
    p = root / TAG / optim_name(1)
    flat, _ = _fp32_and_moment(p)
    for at in (20, 24):
        _patch_central(p, "data/" + flat, "<I", at, 1 << 20)
    return root


# ------------------------------------------------------------------ topology (issue 9)
def topology_mp_world_size(tmp: Path) -> Path:
    """The model states say mp_world_size 2 while their checkpoint_parallel_dimensions say
    pp 1 x tp 1 (and only mp_rank_00 files exist)."""
    return append_to_pickle(tmp, _key("mp_world_size") + _int_op(2))


def topology_tp_rank_beyond(tmp: Path) -> Path:
    """A tp2 checkpoint whose mp_rank_01 model states say pp 1 x tp 1, mp_world_size 1: the
    file's name (mp_rank 1) and its pickle disagree, and with the checkpoint's pp 1 x tp 2."""
    root = copy_root(tmp, "parallel/tp2_dp2_s2_toy", "topology_tp_rank_beyond")
    p = root / TAG / "mp_rank_01_model_states.pt"
    raw = pickle_of(p)
    dims = b"}(" + _key("pp_degree") + _int_op(1) + _key("tp_degree") + _int_op(1) + b"u"
    rewrite_pickle(p, raw[:-1] + _key("checkpoint_parallel_dimensions") + dims + b"s" +
                   _key("mp_world_size") + _int_op(1) + b"s.")
    return root
