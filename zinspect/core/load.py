"""Build the `Checkpoint` model from a tag dir, reading only pickles and zip directories.

Orchestration only: list and classify the files (`discover`), parse their pickles in threads,
read what the headers say (`layouts.headers.read_headers`), pick the layout from the registry
(`zinspect.core.layouts`) and let it describe the files. The layouts themselves (ZeRO-1/2,
ZeRO-3, BF16_Optimizer, ...) are explained in their modules.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from zinspect.core import codes, layouts
from zinspect.core.discover import NamedFile, classify, file_kind, locate
from zinspect.core.features import features_of
from zinspect.core.layouts import headers, topology
from zinspect.core.model import Checkpoint, RankFile, Storage
from zinspect.core.pickle_bytes import read_at
from zinspect.core.torchzip import (
    DTYPE_SIZES,
    MAX_PICKLE_BYTES,
    PickleMemo,
    TorchFile,
    open_exact,
    pickle_is_intact,
    read_torch_file,
    zip_is_complete,
)
from zinspect.errors import UnreadableFile


def load_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> Checkpoint:
    """Read a checkpoint's metadata into the model. Findings from reading are attached;
    `zinspect.core.validate.validate` adds the consistency checks.

    `progress(files_done, files_total, file_name)` is called (from reader threads) as each
    rank file is read."""
    loc = locate(path, tag)
    ckpt = Checkpoint(path=loc.tag_dir, tag=loc.tag, root=loc.root, tags=loc.tags)
    try:
        entries = sorted(loc.tag_dir.iterdir())
    except OSError as e:
        raise UnreadableFile(f"{loc.tag_dir}: cannot list ({e.strerror})",
                             "check the directory's permissions") from e
    named = [classify(p) for p in entries]
    # only regular files are opened: a FIFO would block forever, a device never ends
    special = {n.path: file_kind(n.path) for n in named if n.kind not in ("other", "universal")}
    wanted = [n for n in named if n.kind not in ("other", "universal") and special[n.path] is None]
    # ZeRO-3 model states of ranks > 0 hold only their frozen-param fragments (and copies of
    # what rank 0 says): at 512 ranks unpickling them all is most of the time to open. They are
    # checked whole here and unpickled when a frozen param's fragments are first needed.
    later = [n for n in wanted if n.kind == "model" and n.rank not in (None, 0)]
    tick = _Ticker(len(wanted), progress)
    parsed = _parse_files([n for n in wanted if n.kind != "model" or n.rank in (None, 0)], tick)
    rank0 = next((tf for rf, tf in parsed.values() if rf.kind == "model" and rf.rank == 0), None)
    if rank0 is None:  # the names come from the next model states: read them all
        parsed.update(_parse_files(later, tick))
    else:  # with frozen params their pickles will be read: check those now
        frozen = isinstance(rank0.obj, dict) and rank0.obj.get("frozen_param_shapes")
        parsed.update(_check_files(later, tick, pickle_is_intact if frozen else zip_is_complete))
    torch_files: dict[int, TorchFile] = {}
    for n in named:
        rf, tf = parsed.get(n.path, (None, None))
        if rf is None:
            rf = _rank_file(n)
            if special.get(n.path):
                rf.error = f"it is {special[n.path]}, not a regular file (it was not opened)"
                rf.error_hint = "put the real file back under this name (restore it from a copy)"
        elif n.kind != "other" and n.path.is_symlink():
            ckpt.findings.append(codes.finding(
                "symlinked-file", f"{n.path.name} is a symbolic link to "
                f"{os.path.realpath(n.path)}; it was followed", file=n.path.name, rank=n.rank))
        ckpt.files.append(rf)
        if tf is not None:
            torch_files[id(rf)] = tf
    ckpt.topology.files = ckpt.files
    ctx = layouts.LoadContext(ckpt, torch_files, partial(_parse_later, seed=rank0))
    headers.read_headers(ctx)
    topology.settle(ctx)
    layout = layouts.pick(ctx)
    ckpt.layout = layout.name
    layout.describe(ctx)
    topology.cross_check(ctx)
    ckpt.features = features_of(ckpt.ds_config)
    if tag is None and loc.root is not None and \
            Path(path).expanduser().resolve() != loc.tag_dir.resolve() and \
            not (loc.root / "latest").is_file():
        ckpt.findings.append(codes.finding(
            "no-latest", f"{loc.root} has no `latest` file; its only tag dir, "
            f"{loc.tag}, was used", "DeepSpeed writes `latest` last: if the save or the copy "
            "was cut short, check that this tag is complete (zinspect validate --deep)"))
    return ckpt


def _rank_file(n: NamedFile, **facts) -> RankFile:
    return RankFile(n.path, n.kind, n.rank, n.mp_rank, n.prefix, size=_size(n.path),
                    coords=n.coords, **facts)


def _parse_later(files: list[RankFile], seed: TorchFile | None = None) -> dict[int, TorchFile]:
    """Parse files left shallow at open (for a layout's lazy fragments): id(file) -> parsed.
    The first is unpickled alone, unless its data.pkl is `seed`'s (rank 0's, parsed at open):
    the others whose data.pkl has its bytes share its result."""
    named = {f.path: f for f in files}
    todo = [NamedFile(f.path, f.kind, f.rank, f.mp_rank, f.prefix, f.coords) for f in files]
    tick, memo = _Ticker(len(files), None), _FirstPickle(seed)
    parsed = _parse_files(todo[:1], tick, memo)
    parsed.update(_parse_files(todo[1:], tick, memo))
    return {id(named[path]): tf for path, (_, tf) in parsed.items() if tf is not None}


class _FirstPickle:
    """A memo for `read_torch_file` that keeps the first pickle read, however large: the ZeRO-3
    model states of ranks > 0 are the very same data.pkl (57 MB at 297k names; only their
    tensor records differ), so with frozen params, whose fragments every rank's file holds, one
    is unpickled, not each: the others, compared byte for byte, share its result read-only (as
    `PickleMemo` shares small pickles).

    Rank 0's is most often the same pickle too, but it was read at open in chunks, not kept:
    the first pickle with the `seed` file's data.pkl size and CRC-32 is compared byte for byte
    with the seed's data.pkl read again from its file (a CRC can be forged: it only picks the
    candidate), and shares the seed's parse when they are the same bytes (which then have the
    CRC the seed's parse saw: the seed file did not change since)."""

    max_bytes = MAX_PICKLE_BYTES  # what it keeps: read every pickle whole, to compare

    def __init__(self, seed: TorchFile | None = None) -> None:
        self._first: tuple[bytes, tuple] | None = None
        self._seed = seed if seed is not None and seed.pickle is not None else None

    def get(self, raw: bytes) -> tuple | None:
        seed, self._seed = self._seed, None  # tried on the first pickle read only
        if seed is not None and _same_pickle(seed, raw):
            self._first = (raw, (seed.obj, seed.storages, seed.unknown_globals))
        first = self._first
        return first[1] if first is not None and first[0] == raw else None

    def put(self, raw: bytes, parsed: tuple) -> None:
        if self._first is None:
            self._first = (raw, parsed)


def _same_pickle(tf: TorchFile, raw: bytes) -> bool:
    """Whether `raw` is the very data.pkl `tf` was parsed from: the same size and CRC-32, then
    the same bytes as its file's data.pkl read again."""
    start, size, crc = tf.pickle
    if len(raw) != size or zlib.crc32(raw) != crc:
        return False
    try:
        f, _ = open_exact(tf.path)
        with f:
            return read_at(f, start, size) == raw
    except (OSError, UnreadableFile):
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Ticker:
    """Counts files done for a progress callback that reader threads share."""

    def __init__(self, total: int, progress: Callable[[int, int, str], None] | None) -> None:
        self.total, self.progress, self.done = total, progress, 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        if self.progress is not None:
            with self._lock:
                self.done += 1
                self.progress(self.done, self.total, name)


def _parse_files(named: list[NamedFile], tick: _Ticker,
                 memo: PickleMemo | _FirstPickle | None = None
                 ) -> dict[Path, tuple[RankFile, TorchFile | None]]:
    """Parse every rank file's metadata; threads overlap the cold reads of many small pickles."""
    memo = PickleMemo() if memo is None else memo

    def one(n: NamedFile) -> tuple[RankFile, TorchFile | None]:
        try:
            return _parse_one(n)
        finally:
            tick(n.path.name)

    def _parse_one(n: NamedFile) -> tuple[RankFile, TorchFile | None]:
        rf = _rank_file(n)
        try:
            tf = read_torch_file(n.path, memo)
        except UnreadableFile as e:
            rf.error = e.message.removeprefix(f"{n.path}: ")
            rf.error_hint = e.hint or None
            rf.unknown_globals = sorted(e.unknown_globals)
            return rf, None
        rf.format, rf.recovered = tf.format, tf.recovered
        rf.unknown_globals = sorted(tf.unknown_globals)
        rf.storages = _storages(tf)
        return rf, tf

    return {rf.path: (rf, tf) for rf, tf in _each(one, named)}


def _storages(tf: TorchFile) -> list[Storage]:
    """Each storage of a parsed file with what its record holds, but for the storages of no
    elements whose record is empty or missing: none of their bytes can be missing, and a
    ZeRO-3 model-states file holds one per param (300k Storages, 0.2 s, at 300k names)."""
    records, listed, sizes = tf.records, tf.records.listed, DTYPE_SIZES
    # a record cut by the end of the file is truncated even where its tensor's bytes are all
    # there: count the record's own size
    return [Storage(key, st.dtype, st.numel, nbytes, 0, None) if rec is None else
            Storage(key, st.dtype, st.numel, nbytes, min(rec.present, nbytes), rec.data_offset)
            for key, st in tf.storages.items() if st.numel or key in listed
            for rec in (records.get(key),)
            for nbytes in (st.numel * sizes[st.dtype] if rec is None or rec.present >= rec.size
                           else max(st.numel * sizes[st.dtype], rec.size),)]


def _each(fn, items: list) -> list:
    """fn over items, in threads when there are several: the reads are small and many, and on
    a cold cache (or a network file system) their latencies overlap; crc32 releases the GIL."""
    if len(items) <= 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


def _check_files(named: list[NamedFile], tick: _Ticker,
                 whole: Callable[[Path], bool]) -> dict[Path, tuple[RankFile, TorchFile | None]]:
    """Files whose pickle is not needed yet: check that they are `whole`, and parse only
    those that are not, so the findings can say what is wrong."""
    def check(n: NamedFile) -> bool:
        ok = whole(n.path)
        if ok:
            tick(n.path.name)
        return ok

    out, broken = {}, []
    for n, ok in zip(named, _each(check, named), strict=True):
        if ok:
            out[n.path] = (_rank_file(n, format="zip", shallow=True), None)
        else:
            broken.append(n)
    out.update(_parse_files(broken, tick))
    return out
