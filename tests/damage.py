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
