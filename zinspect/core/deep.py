"""The deep check (`zinspect validate --deep`): read the tensor bytes too, streamed.

First, the pickles that opening the checkpoint did not unpickle (`RankFile.shallow`: ZeRO-3
model states of ranks > 0, only checked whole) are read with `torchzip.read_torch_file`, which
never runs anything, and dangerous globals in them are reported as "unsafe-pickle", as `validate`
does for the pickles it read: a tampered rank-1 file is found, not just rank 0's.

Then two passes over the data, each through one reused buffer (memory is bounded by `CHUNK`,
whatever the checkpoint size), stdlib only:

1. CRC32 of every record of every readable zip file against the CRC in its zip directory
   ("crc-mismatch": the bytes changed after the save; "record-unreadable": they are not all
   there). This catches a file that keeps its size but holds zeroed or garbage data, which no
   metadata check can see.
2. NaN and Inf counts of every tensor a merge would write (the fp32 masters, 16-bit frozen
   values, float buffers), over exactly the bytes `plan_merge(ckpt, salvage=True)` plans
   ("nan-values" / "inf-values", warnings: the weights exist but are unusable). Counting looks
   only at the exponent bits, with `bytes.translate` and big-int bit counts, so it runs in C
   at several hundred MB/s without torch or numpy. The copies of a param the merge does not
   write but compares (a replicated tensor-parallel param's other tp ranks, a tied param's
   other pipeline stages: the plan's `mirrors`) are compared with the copy it writes, by the
   merge's rule and in its words (`zinspect.core.drift`: "tp-replica-drift" /
   "tied-copy-drift" with the largest difference).

The CRC rule (`RecordCheck`) and the NaN/Inf counter are `zinspect.core.verify`'s, shared with
the merge, which applies them to the bytes it streams.

Cancelling: `should_stop()` is polled after every chunk and every pickle; when it returns true
the check raises `MergeCancelled` (as a cancelled merge does) instead of returning partial
results that could be mistaken for a clean bill of health.

Damaged or unreadable bytes never raise: they become findings.
"""

from __future__ import annotations

import os

from zinspect.core.codes import finding
from zinspect.core.drift import DRIFT, difference, drift_finding
from zinspect.core.filechecks import unsafe_pickle_finding
from zinspect.core.model import Checkpoint, Finding, RankFile
from zinspect.core.readfiles import SourceFiles, open_regular
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop
from zinspect.core.torchzip import DTYPE_SIZES, PickleMemo, read_torch_file
from zinspect.core.verify import CRC_HINT, FLOAT_DTYPES, RecordCheck, count_nonfinite
from zinspect.core.zipcheck import LOCAL_HEADER, NoZipDirectory, central_directory, local_data_offset
from zinspect.errors import MergeCancelled, UnreadableFile, ZinspectError

CHUNK = 8 << 20  # bytes per read; a multiple of every itemsize
#: every finding code only the deep check emits (a second run replaces the first one's
#: findings). It also emits validate's "unsafe-pickle", for files no finding names yet.
CODES = frozenset({"crc-mismatch", "crc-unavailable", "record-unreadable", "values-unchecked",
                   "nan-values", "inf-values", *(code for code, *_ in DRIFT.values())})

# ------------------------------------------------------------------ the check


def _pread(files: SourceFiles, view: memoryview, path: str, offset: int,
           nbytes: int) -> memoryview:
    """Up to `nbytes` (<= len(view)) bytes at `offset` into `view`; fewer when the file ends
    first. Raises OSError, or UnreadableFile when the file cannot be opened."""
    fd = files.fd(path)
    pos = 0
    while pos < nbytes:
        n = os.preadv(fd, [view[pos:nbytes]], offset + pos)
        if n <= 0:
            break
        pos += n
    return view[:pos]


def _why(e: OSError | UnreadableFile, path: str) -> str:
    if isinstance(e, UnreadableFile):
        return e.message.removeprefix(f"{path}: ")
    return e.strerror or str(e)


def deep_check(ckpt: Checkpoint, progress: Progress | None = None,
               should_stop: ShouldStop | None = None, chunk: int = CHUNK) -> list[Finding]:
    """Read the checkpoint's bytes: zip CRCs of every record, NaN/Inf counts per tensor.

    Returns new findings (the caller adds them to `ckpt.findings`). `progress(done, total,
    name)` is called about 20 times a second; `should_stop()` is polled after every chunk and,
    when true, raises `MergeCancelled`."""
    chunk = max(64, chunk - chunk % 8)  # >= a local header (30 bytes), whole elements
    findings: list[Finding] = []
    records = _zip_records(ckpt, findings)
    tensors = _planned_tensors(ckpt, findings)
    total = sum(e[3] for _, entries in records for e in entries) + \
        sum(m.src_nbytes for t in tensors for m in t.streamed())
    meter = ProgressMeter(total, progress)
    view = memoryview(bytearray(chunk))

    def tick(nbytes: int, name: str) -> None:
        meter.add(nbytes, name)
        if should_stop is not None and should_stop():
            raise MergeCancelled("the deep check was cancelled", "nothing was changed")

    _check_pickles(ckpt, findings, tick)
    for rf, entries in records:
        with SourceFiles() as one:  # one file open at a time: 1024 rank files fit `ulimit -n`
            for name, header_offset, _, size, crc in entries:
                _check_crc(one, view, rf, name, header_offset, size, crc, findings, tick)
    rank_of = {str(ckpt.path / f.name): f for f in ckpt.files}
    with SourceFiles() as files:  # a ZeRO-3 tensor has a piece in every rank's file
        for t in tensors:
            _check_values(files, view, t, rank_of, findings, tick)
            _check_copies(files, view, t, findings, tick)
    if progress is not None and meter.done < total:
        progress(total, total, "")
    return findings


def _check_pickles(ckpt: Checkpoint, findings: list[Finding], tick) -> None:
    """Unpickle, inertly, the pickles the quick path left unread (shallow files) and report
    dangerous globals in them. The ranks' copies are usually the same bytes: a memo reads
    those once (the 511 model-states pickles of a 70B checkpoint: 0.85 s)."""
    memo = PickleMemo()
    reported = {f.file for f in ckpt.findings if f.code == "unsafe-pickle"}  # a second run
    for rf in ckpt.files:
        if not rf.shallow or not rf.readable or rf.name in reported:
            continue
        try:
            tf = read_torch_file(rf.path, memo)
        except UnreadableFile as e:
            findings.append(finding("record-unreadable", f"{rf.name}: its pickle cannot "
                                    "be read, so it was not checked for code that torch.load "
                                    f"would run ({_why(e, str(rf.path))})", e.hint or
                                    "do not load this file with torch; copy it again",
                                    file=rf.name, rank=rf.rank))
        else:
            unsafe = unsafe_pickle_finding(rf.name, rf.rank, sorted(tf.unknown_globals))
            if unsafe:
                findings.append(unsafe)
        tick(0, rf.name)


def _zip_records(ckpt: Checkpoint, findings: list[Finding]) -> list[tuple[RankFile, list]]:
    """Every readable zip with its records (name, header offset, compression, size, crc), from
    its central directory as it is now (torchzip's parser: no object per record)."""
    out = []
    for rf in ckpt.files:
        if not rf.readable:
            continue  # already reported by the metadata checks
        if rf.format != "zip" or rf.recovered:
            why = "its zip directory is lost (truncated)" if rf.recovered else \
                "the legacy torch format stores no checksums"
            findings.append(finding("crc-unavailable", f"{rf.name}: no CRCs to check: {why}",
                                    file=rf.name, rank=rf.rank))
            continue
        try:
            with os.fdopen(open_regular(rf.path), "rb", buffering=0) as f:  # never a FIFO
                out.append((rf, central_directory(f, os.fstat(f.fileno()).st_size)))
        except (NoZipDirectory, OSError, UnreadableFile) as e:
            why = (e.strerror or str(e)) if isinstance(e, OSError) else e.message \
                if isinstance(e, UnreadableFile) else \
                "its end record or entries are missing or malformed"
            findings.append(finding("record-unreadable", f"{rf.name}: its zip directory "
                                    f"cannot be read now ({why})", "the file changed or is "
                                    "damaged; copy it again", file=rf.name, rank=rf.rank))
    return out


def _check_crc(files: SourceFiles, view: memoryview, rf: RankFile, name: str,
               header_offset: int, size: int, want: int, findings: list[Finding], tick) -> None:
    path = str(rf.path)
    where = {"file": rf.name, "rank": rf.rank}
    try:
        offset = local_data_offset(header_offset,
                                   bytes(_pread(files, view, path, header_offset, LOCAL_HEADER)))
        if offset is None:
            findings.append(finding("record-unreadable", f"{rf.name}: record {name} has "
                                    "no local header where the zip directory says",
                                    "the file is damaged; copy it again", **where))
            tick(size, rf.name)
            return
        check = RecordCheck(rf.name, name, offset, size, want)
        while not check.done:
            data = _pread(files, view, path, offset + check.cursor,
                          min(len(view), size - check.cursor))
            if not len(data):
                break
            check.feed(offset + check.cursor, data)
            tick(len(data), rf.name)
    except (OSError, UnreadableFile) as e:
        findings.append(finding("record-unreadable", f"{rf.name}: record {name} cannot "
                                f"be read ({_why(e, path)})", "check the file", **where))
        return
    if not check.done:
        findings.append(finding("record-unreadable", f"{rf.name}: record {name} holds "
                                f"{check.cursor:,} of its {size:,} bytes", "the file is "
                                "truncated; copy it again", **where))
        tick(size - check.cursor, rf.name)
    elif check.failed:
        findings.append(finding("crc-mismatch", check.problem(), CRC_HINT, **where))


def _planned_tensors(ckpt: Checkpoint, findings: list[Finding]) -> list:
    from zinspect.core.plan import plan_merge

    try:
        plan = plan_merge(ckpt, salvage=True)
    except ZinspectError as e:
        findings.append(finding("values-unchecked", f"NaN/Inf not counted: {e.message}",
                                e.hint))
        return []
    # tied aliases share their owner's bytes: count them once, under the owner's name
    return [t for t in plan.tensors if t.tied_to is None and t.src_dtype in FLOAT_DTYPES]


def _check_values(files: SourceFiles, view: memoryview, t, rank_of: dict,
                  findings: list[Finding], tick) -> None:
    itemsize = DTYPE_SIZES[t.src_dtype]
    step = len(view) - len(view) % itemsize
    nan = inf = 0
    bad_files: list[str] = []
    for piece in t.pieces:
        done = 0
        try:
            while done < piece.nbytes:
                data = _pread(files, view, piece.path, piece.offset + done,
                              min(step, piece.nbytes - done))
                whole = len(data) - len(data) % itemsize
                if not whole:
                    break
                n, i = count_nonfinite(data[:whole], t.src_dtype)
                if (n or i) and piece.path not in bad_files:
                    bad_files.append(piece.path)
                nan, inf = nan + n, inf + i
                done += whole
                tick(whole, t.name)
        except (OSError, UnreadableFile):
            pass
        if done < piece.nbytes:
            rf = rank_of.get(piece.path)
            findings.append(finding("record-unreadable", f"{t.name}: only {done:,} of "
                                    f"{piece.nbytes:,} bytes could be read from "
                                    f"{os.path.basename(piece.path)}", "the file changed or is "
                                    "truncated; copy it again", file=rf.name if rf else None,
                                    rank=rf.rank if rf else None, param=t.name))
            tick(piece.nbytes - done, t.name)
    rf = rank_of.get(bad_files[0]) if len(bad_files) == 1 else None
    where = {"file": rf.name if rf else None, "rank": rf.rank if rf else None, "param": t.name}
    source = "fp32 masters" if t.src_dtype == "float32" else f"saved {t.src_dtype} values"
    for count, code, what in ((nan, "nan-values", "NaN"), (inf, "inf-values", "Inf")):
        if count:
            findings.append(finding(code, f"{t.name}: {count:,} of {t.numel:,} "
                                    f"values are {what} in its {source}",
                                    "training diverged before this save (or the bytes are "
                                    "corrupt: see crc-mismatch); use an earlier checkpoint",
                                    **where))


def _check_copies(files: SourceFiles, view: memoryview, t, findings: list[Finding],
                  tick) -> None:
    """Each copy of `t` the merge compares (`t.mirrors`), read beside the copy it writes at the
    same byte positions (half of `view` each) and measured by the merge's rule. A copy that
    cannot be read is left: the CRC pass names its file."""
    itemsize = DTYPE_SIZES[t.src_dtype]
    half = len(view) // 2 - len(view) // 2 % itemsize
    drift: dict[str, dict[int, float]] = {}
    for m in t.mirrors:
        done = 0
        try:
            for (path_a, at_a), (path_b, at_b), n in _aligned(m.pieces, t.pieces, half):
                a = _pread(files, view[:half], path_a, at_a, n)
                b = _pread(files, view[half:], path_b, at_b, n)
                if len(a) < n or len(b) < n:
                    break
                diff = difference(a, b, t.src_dtype)
                if diff is not None:
                    ranks = drift.setdefault(m.axis, {})
                    ranks[m.replica] = max(ranks.get(m.replica, 0.0), diff)
                done += n
                tick(n, t.name)
        except (OSError, UnreadableFile):
            pass
        tick(m.src_nbytes - done, t.name)
    findings.extend(drift_finding(t.name, ranks, axis) for axis, ranks in drift.items())


def _aligned(copy: list, written: list, step: int):
    """((path, offset), (path, offset), n): the two piece lists (the same bytes in the same
    order) walked together, in runs of at most `step` bytes inside one piece of each."""
    i = j = 0
    pos_a = pos_b = 0  # bytes of the current pieces already walked
    while i < len(copy) and j < len(written):
        a, b = copy[i], written[j]
        n = min(a.nbytes - pos_a, b.nbytes - pos_b, step)
        if n > 0:
            yield (a.path, a.offset + pos_a), (b.path, b.offset + pos_b), n
        pos_a, pos_b = pos_a + n, pos_b + n
        if pos_a == a.nbytes:
            i, pos_a = i + 1, 0
        if pos_b == b.nbytes:
            j, pos_b = j + 1, 0
