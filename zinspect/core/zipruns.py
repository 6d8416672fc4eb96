"""Runs of zero-byte records in a torch.save zip, read and checked whole.

A ZeRO-3 model-states file holds one empty placeholder record per param (297k at 297k names),
written back to back and named `<root>/data/0`, `1`, ...: their directory entries differ only
in the number ending the name and the offset, and their local headers only in that number.
`run_at` finds such a run in the directory bytes (an `EmptyRun`: one object, not a tuple per
record), built 8, 16, 32, ... entries at a time and compared with the bytes; `check_runs`
compares each run's local headers in the file with those its entries imply, a megabyte at a
time. Both compare whole byte strings (C speed) instead of reading 297k records in Python.
Any difference, anything they do not prove, raises `Doubt`, and zipcheck then checks every
record alone: the verdicts and messages are the same as record by record.

Records with data cannot be a run (each is read for its local header alone: between two
headers lie tensor bytes), but a stretch of them alike (`alike`: the 132k frozen fragments of
a ZeRO-3 file with frozen params) has its headers compared in one comparison after the first
is checked alone (`check_alike`); on any difference the rest are checked one by one.
"""

from __future__ import annotations

import bisect
import operator
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import groupby, pairwise, repeat

LOCAL_HEADER = 30  # bytes of a zip local header before its name and extra field
#: the fewest records a run has (fewer are read one by one)
MIN_ROWS = 8
DESCRIPTOR = 16  # crc, sizes after the data when flag bit 3 is set (24 with zip64 sizes)
#: most bytes of local headers one comparison covers
READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class EmptyRun:
    """`count` consecutive directory entries of zero-byte, uncompressed records named
    `prefix` + str(first + i), alike but for their names and offsets (`central`: the 42 bytes
    of fields they share), whose local headers are said to follow each other from `header`,
    `stride` bytes apart (the header, the name, an extra field; no data)."""

    prefix: str
    first: int
    count: int
    header: int
    stride: int
    central: bytes

    @property
    def end(self) -> int:
        return self.header + self.count * self.stride

    @property
    def crc(self) -> int:
        return int.from_bytes(self.central[16:20], "little")

    def name(self, i: int) -> str:
        return self.prefix + str(self.first + i)


class Runs:
    """EmptyRuns found by a record's name, in log time."""

    def __init__(self, runs: list[EmptyRun]) -> None:
        self.runs = sorted(runs, key=_RUN_ORDER)
        self._keys = list(map(_RUN_ORDER, self.runs))

    def find(self, name: str) -> tuple[EmptyRun, int] | None:
        """(run, i) with run.name(i) == name, or None."""
        digits = _TRAILING_DIGITS.search(name)
        if digits is None or len(digits[0]) > 18 or not _NUMBER.fullmatch(digits[0]):
            return None
        prefix, n = name[:digits.start()], int(digits[0])
        k = bisect.bisect_right(self._keys, (prefix, n)) - 1
        run = self.runs[k] if k >= 0 else None
        return (run, n - run.first) if run and run.prefix == prefix and \
            n < run.first + run.count else None

    def hold_any(self, names: list[str]) -> bool:
        """Whether any of `names` is a run's: `find` of each, answered in bulk. In the names
        one a line, the numbers ending a whole line after a run's prefix (as `find` reads them:
        no leading zero, up to 18 digits) are found at once, sorted, and compared with the
        runs' ranges. (A name holding a newline may make a line no name is: a run then seems
        named twice, a doubt, never a miss.)"""
        lines = "\n".join(names)
        for prefix in {run.prefix for run in self.runs}:
            numbers = sorted(map(int, re.findall(
                f"^{re.escape(prefix)}(0|[1-9][0-9]{{0,17}})$", lines, re.MULTILINE)))
            for run in self.runs:
                k = bisect.bisect_left(numbers, run.first)
                if run.prefix == prefix and k < len(numbers) and \
                        numbers[k] < run.first + run.count:
                    return True
        return False

    def overlap(self) -> bool:
        """Whether two runs hold the same name."""
        return any(a.prefix == b.prefix and b.first < a.first + a.count
                   for a, b in pairwise(self.runs))


_RUN_ORDER = operator.attrgetter("prefix", "first")
_U32 = "I" if array("I").itemsize == 4 else "L"  # the offset fields of central entries
_NUMBER = re.compile(r"0|[1-9][0-9]*")
_TRAILING_DIGITS = re.compile(r"[0-9]+\Z")
_TRAILING_DIGIT_BYTES = re.compile(rb"[0-9]+\Z")


class Doubt(Exception):
    """The runs cannot be checked whole: check record by record."""


def check_runs(f, size: int, entries: list, runs: Runs) -> None:
    """Raise Doubt unless every name is unique and each run's local headers are all in the
    file, byte for byte the headers its directory entries imply."""
    names = [e[0] for e in entries]
    if len(set(names)) != len(entries) or runs.overlap() or runs.hold_any(names):
        raise Doubt
    for r in runs.runs:
        if r.end > size:
            raise Doubt
        # a local header holds its entry's fields, the name and an extra field (torch pads
        # each record to 64 bytes): the first record's, which all the others must repeat
        name = r.prefix.encode() + b"0" * len(str(r.first))
        extra = r.stride - LOCAL_HEADER - len(name)
        f.seek(r.header + LOCAL_HEADER + len(name))
        template = b"PK\x03\x04" + r.central[6:30] + extra.to_bytes(2, "little") + name + \
            f.read(extra)
        step = max(1, READ_BYTES // r.stride)
        for i in range(0, r.count, step):
            rows = min(step, r.count - i)
            f.seek(r.header + i * r.stride)
            if f.read(rows * r.stride) != _rows(template, len(template) - extra, r.first + i,
                                                rows):
                raise Doubt


def _rows(template: bytes, name_end: int, first: int, rows: int,
          offsets: tuple[int, int] | None = None) -> bytearray:
    """`rows` copies of `template` whose names (ending at `name_end`) count up from `first`;
    with `offsets` (start, step), central entries whose offset fields count up so."""
    out = bytearray(template) * rows
    width, stride = len(str(first)), len(template)
    for j in range(width):  # the digit worth 10**j of each row's number
        out[name_end - 1 - j::stride] = _digit_column(first, rows, 10 ** j)
    if offsets is not None:
        start, step = offsets
        column = array(_U32, range(start, start + rows * step, step))
        if sys.byteorder == "big":
            column.byteswap()
        column = column.tobytes()
        for c in range(4):
            out[42 + c::stride] = column[c::4]
    return out


def _digit_column(first: int, rows: int, weight: int) -> bytes:
    """The ASCII digit worth `weight` of first, first + 1, ... (rows numbers)."""
    period = 10 * weight
    if rows >= period:
        start = first % period
        cycle = b"".join(bytes((48 + d,)) * weight for d in range(10))
        return (cycle * (rows // period + 2))[start:start + rows]
    out, n, end = [], first, first + rows
    while n < end:
        step = min(end, (n // weight + 1) * weight) - n
        out.append(bytes((48 + n // weight % 10,)) * step)
        n += step
    return b"".join(out)


def run_at(cd: bytes, pos: int, nlen: int, offset: int) -> EmptyRun | None:
    """The run of entries from `pos` alike but for their offsets and numbered names, of
    records whose local headers follow each other (at least MIN_ROWS), or None. Compared with the
    entries it implies, built 8, 16, 32, ... at a time: a short run costs little."""
    name = cd[pos + 46:pos + 46 + nlen]
    digits = _TRAILING_DIGIT_BYTES.search(name)
    if digits is None or len(digits[0]) > 18 or len(digits[0]) > 1 and digits[0][0] == 48 \
            or cd[pos + 8] & 8:  # (a data descriptor after each record)
        return None
    try:
        prefix = name[:digits.start()].decode()
    except UnicodeDecodeError:
        return None
    first, width, entry = int(digits[0]), len(digits[0]), 46 + nlen
    for k in (1, MIN_ROWS - 1):  # a quick look at two entries before building any
        at = pos + k * entry
        if cd[at + 4:at + 42] != cd[pos + 4:pos + 42] or \
                cd[at + 46:at + 46 + nlen] != name[:digits.start()] + b"%d" % (first + k):
            return None
    # the records' local headers are `local` bytes apart: the header, the name, its extra field
    local = int.from_bytes(cd[pos + entry + 42:pos + entry + 46], "little") - offset
    if not LOCAL_HEADER + nlen <= local <= LOCAL_HEADER + nlen + 0xFFFF:
        return None
    most = min(10 ** width - first, (len(cd) - pos) // entry, (0xFFFFFFFE - offset) // local + 1)
    template = cd[pos:pos + 42] + bytes(4) + name[:digits.start()] + b"0" * width
    count, rows = 0, 8
    while count < most:
        rows = min(rows, most - count)
        start = pos + count * entry
        want = _rows(template, entry, first + count, rows, (offset + count * local, local))
        got = cd[start:start + rows * entry]
        if got != want:
            count += _agree(got, want) // entry
            break
        count, rows = count + rows, rows * 2
    # the last record's extent is known when the next entry's record follows it
    after = pos + count * entry
    if int.from_bytes(cd[after + 42:after + 46], "little") != offset + count * local:
        count -= 1
    return EmptyRun(prefix, first, count, offset, local, cd[pos:pos + 42]) \
        if count >= MIN_ROWS else None


def _agree(a: bytes, b: bytes | bytearray) -> int:
    """How many leading bytes `a` and `b` (as long) share."""
    lo, hi = 0, len(a)
    if a == b:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def alike(ordered: list) -> dict[int, int]:
    """i -> j for each stretch ordered[i:j] (in header order, no EmptyRun) of at least MIN_ROWS
    entries of one compression, size (not 0: check_records reads the headers of empty records
    in windows) and name length: records whose local headers `check_alike` may compare whole
    (a ZeRO-3 model-states file's frozen fragments)."""
    keys = [None if isinstance(e, EmptyRun) or not e[3] else (e[2], e[3], len(e[0]))
            for e in ordered]
    out, i = {}, 0
    for key, group in groupby(keys):
        n = len(list(group))
        if key is not None and n >= MIN_ROWS:
            out[i] = i + n
        i += n
    return out


def check_alike(f, size: int, entries: list, head: bytes, end: int
                ) -> tuple[dict[str, int], int] | None:
    """(name -> data offset, where the last record ends) of entries[1:] (a stretch from
    `alike`), or None unless each one's local header is `head` (entries[0]'s, checked alone;
    its record ends at `end`) but for its CRC and extra field's length, its name is the
    entry's, and each record (header, name, extra field, data, descriptor) ends inside the file
    and before the next one's header: what check_records finds of each, with one read of each
    local header and name (never a data byte) and one comparison of them all."""
    names, headers, _, usize, _ = zip(*entries, strict=True)
    flags, nlen = struct.unpack_from("<H18xH", head, 6)
    joined, need, rows = "".join(names), LOCAL_HEADER + nlen, len(headers) - 1
    if not joined.isascii() or len(joined) != nlen * len(names) or headers[-1] + need > size:
        return None
    reads = []
    for at in headers[1:]:
        f.seek(at)
        reads.append(f.read(need))
    got = bytearray(b"".join(reads))
    if len(got) != need * rows:
        return None
    lengths = bytearray(2 * rows)  # each record's extra field length, then not compared
    lengths[0::2], lengths[1::2] = got[28::need], got[29::need]
    for c in (14, 15, 16, 17, 28, 29):  # (the CRCs, which the directory's are not compared with)
        got[c::need] = bytes(rows)
    template = (head[:14] + bytes(4) + head[18:28] + bytes(2)).decode("latin-1")
    if got != (template + template.join(names[1:])).encode("latin-1"):
        return None
    extra = array("H", lengths)
    if sys.byteorder == "big":
        extra.byteswap()
    starts = list(map(operator.add, headers[1:], map(operator.add, extra, repeat(need))))
    ends = [end, *map(operator.add, starts, repeat(usize[0] + (DESCRIPTOR if flags & 8 else 0)))]
    if ends[-1] > size or not all(map(operator.le, ends, headers[1:])):
        return None
    return dict(zip(names[1:], starts, strict=True)), ends[-1]
