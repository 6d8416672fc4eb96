"""The unpickler's fast path: when the C unpickler may read a pickle unwatched.

The pure-Python reader is about 7x slower than the C unpickler (13 s against 1.1 s on the
model-states pickle of a 300k-name checkpoint), so a pickle is first offered to a fast path,
`prepare_for_c`, which either proves the C unpickler safe on it or declines (None: the bounded
reader of zinspect.core.unpickle reads it, and says what is wrong). It declines much rather
than risk anything, and the C unpickler is only ever run with the same `find_class` /
`persistent_load` rules and the same tree check after the load. What it proves, in one C-speed
regex match over the whole opcode stream (a possessive repeat of one alternative per opcode and
argument length, so the tokenisation is exact, not a guess from byte patterns), plus a Python
step at each opcode that needs one (EMPTY_DICT, long strings, STOP):

* every opcode is one of a short list the C unpickler builds without hashing or calling
  anything we did not pick (no DICT, sets, DUP, INST/OBJ, EXT, text PUT/GET, STACK_GLOBAL,
  FRAME, LONG4, text INT/LONG...); anything else declines, and so does a LONG1 of more than 8
  bytes (the bounded reader refuses ints beyond `MAX_INT_BYTES`);
* every LONG_BINPUT index is below 2**k with 2**k <= len(pickle) / 4: the C memo is an array
  sized by the largest index, so it stays under 4 bytes per pickle byte (the forged 2**32-1
  index declines; the bounded reader keeps its memo in a dict);
* every string and bytes argument is at most `MAX_STRING` long;
* GLOBAL lines are short and hold no NUL, so the marker below cannot be forged.

Hashing is the one thing the C unpickler does that could still blow up (a deep or memo-bomb
tuple used as a dict key). Each EMPTY_DICT is rewritten into a call of `PickledDict` (a GLOBAL
with NUL bytes, which no real pickle holds and the scan refuses in the input) and OrderedDict
resolves to `PickledOrderedDict`: their `__setitem__`, which SETITEM(S) must call for a dict
subclass, checks each key exactly as the bounded reader does before it is hashed. Deep nesting
is built iteratively by the C unpickler and freed by the interpreter's trashcan; the tree check
after the load bounds depth, node count and memo bombs in values, as on the slow path. Any
exception on the fast path declines to the slow path, which gives the verdict and message, so
both paths accept exactly the same pickles and build the same objects: `plain` swaps each
PickledDict for a dict after the tree check (OrderedDicts stay PickledOrderedDict on both
paths, and pickle as OrderedDict). Hostile pickles can cost two reads, each bounded.

A large pickle is scanned as it is read, in chunks (`prepare_chunks_for_c`): a token cut by a
chunk's end is carried, copied, to the front of the next, a long string's bytes are skipped
across chunks, and the pieces are views of the chunks, so `PiecesReader`, which drops each
piece once read, frees the pickle's bytes as the C unpickler goes (at 297k names the 47 MB are
gone before its memo peaks). The whole pickle is still proven before the C unpickler starts,
and the verdict and the bytes are those of the scan of one piece (`prepare_for_c`, the same
code on one chunk).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from collections.abc import Callable

from zinspect.core.bounded_unpickler import _Budgeted
from zinspect.core.unpickle import MAX_STRING, PickledDict

#: what each EMPTY_DICT becomes: GLOBAL (a name no scanned pickle may hold), EMPTY_TUPLE, REDUCE
DICT_MARKER = ("\x00zinspect", "\x00dict")
_DICT_CALL = b"c" + "\n".join(DICT_MARKER).encode() + b"\n)R"
#: opcodes with a length-prefixed str/bytes argument -> bytes of the length
_LENGTH_PREFIXED = {ord("X"): 4, ord("B"): 4, ord("T"): 4, ord("C"): 1, ord("U"): 1,
                    0x8C: 1, 0x8D: 8, 0x8E: 8, 0x96: 8}
_STOP, _EMPTY_DICT = ord("."), ord("}")
#: a GLOBAL's module and name are at most this long; the longest token the scan matches whole is
#: a GLOBAL's, so an opcode the regex stops at with that many bytes after it is not a cut token
_NAME_MAX = 256
_LONGEST_TOKEN = 3 + 2 * _NAME_MAX


#: a BINUNICODE token of at most 255 bytes (`.{n}`: compiled 9x faster than n dots)
SHORT_UNICODE = b"X(?:" + b"|".join(re.escape(bytes([n, 0, 0, 0])) + (b".{%d}" % n if n else b"")
                                    for n in range(256)) + b")"


def memo_index_bits(total: int) -> int:
    """k of the scan's bound 2**k on a pickle of `total` bytes' memo indices (2**k <= total / 4:
    the C memo, an array sized by the largest index, stays under 4 bytes per pickle byte)."""
    return max(16, min(31, (total // 4).bit_length() - 1))


def below(bits: int) -> bytes:
    """A regex for a 4-byte little-endian unsigned int below 2**bits (16 <= bits < 32)."""
    top = (1 << (bits % 8)) - 1 if bits % 8 else 0xFF
    head = b"." * (bits // 8) if bits % 8 else b"." * (bits // 8 - 1)
    tail = b"\x00" * (4 - len(head) - 1)
    return head + b"[\x00-" + re.escape(bytes([top])) + b"]" + tail


@functools.lru_cache(maxsize=4)
def _opcode_runs(index_bits: int):
    """The regex matching a run of opcodes the C unpickler may read unwatched (None before
    Python 3.11, which lacks the possessive repeat that keeps the match linear)."""
    put = b"r" + below(index_bits)
    ops = [  # most frequent in torch's protocol-2 pickles first
        # a tensor as torch pickles it once its globals are in the memo (300k times in a large
        # model-states file), as two runs of the tokens below: one alternative each instead of
        # ~25 (the scan 1.5x faster); whatever they match, the single tokens would match too
        rb"h.\(\(h.h.", put + rb"h.K.t" + put + rb"QK.K.\x85" + put + rb"K.\x85" + put +
        rb"\x89h.\)R" + put + b"t" + put + b"R" + put,
        put, b"K.", b"h.", b"\x85", b"R", rb"\(", SHORT_UNICODE, b"t",
        b"j....", rb"\)", b"\x89", b"\x88", b"Q", b"\x86", b"\x87", b"q.", b"N", b"u", b"s",
        rb"\]", b"a", b"e", b"l", b"M..", b"J....", b"G.{8}", b"b", b"\x81", b"0", b"1",
        b"\x94", b"\x80[\x02-\x05]", b"\x8a(?:" + b"|".join(re.escape(bytes([n])) + b"." * n
                                                            for n in range(9)) + b")",
        b"c[^\n\x00]{1,%d}\n[^\n\x00]{1,%d}\n" % (_NAME_MAX, _NAME_MAX),
    ]
    try:
        return re.compile(b"(?:" + b"|".join(ops) + b")*+", re.DOTALL)
    except re.error:
        return None


def prepare_for_c(raw: bytes, total: int | None = None) -> list[memoryview | bytes] | None:
    """`raw` with each EMPTY_DICT made a PickledDict call, when the scan proves the C unpickler
    safe on it (see the module docstring); None when it does not. As pieces (views of `raw`
    and the calls between them): `PiecesReader` streams them without copying the pickle.
    `total`: the size of the whole pickle when `raw` is a part of it (the memo indices' bound)."""
    chunks = iter((raw,))
    return prepare_chunks_for_c(lambda carry: next(chunks, None),
                                len(raw) if total is None else total)


def prepare_chunks_for_c(next_chunk: Callable[[bytes], bytes | None], total: int
                         ) -> list[memoryview | bytes] | None:
    """`prepare_for_c` of a pickle of `total` bytes (the memo indices' bound) read in chunks
    up to its STOP: `next_chunk(carry)` gives the next chunk with `carry`, the start of a token
    the chunk before cut, in front of it (None after the last). Each piece is a view of one."""
    runs = _opcode_runs(memo_index_bits(total))
    if runs is None:
        return None
    pieces, carry, skip = [], b"", 0  # a cut token's start; string bytes still to skip
    while (window := next_chunk(carry)) is not None:
        if skip >= len(window):  # all inside a long string
            pieces.append(memoryview(window))
            skip -= len(window)
            continue
        view, start, pos, end = memoryview(window), 0, skip, len(window)
        carry, skip = b"", 0
        while True:
            pos = runs.match(window, pos).end()
            if pos >= end:
                break
            op = window[pos]
            if op == _STOP:
                pieces.append(view[start:pos + 1])
                return pieces
            if op == _EMPTY_DICT:
                pieces += (view[start:pos], _DICT_CALL)
                pos = start = pos + 1
                continue
            width = _LENGTH_PREFIXED.get(op)
            if width is None or pos + 1 + width > end:  # a bad opcode, or a token cut here
                if end - pos >= _LONGEST_TOKEN:
                    return None
                carry = window[pos:]
                break
            n = int.from_bytes(window[pos + 1:pos + 1 + width], "little")
            if n > MAX_STRING:
                return None
            pos += 1 + width + n
            if pos > end:
                skip = pos - end
                break
        pieces.append(view[start:end - len(carry)])
    return None  # the pickle ends before its STOP, or inside a token or a string


class PiecesReader(io.RawIOBase):
    """The pieces of `prepare_for_c` read as one stream (wrap it in io.BufferedReader: the C
    unpickler then reads ahead in blocks, 2x faster than from a BytesIO that it asks for each
    opcode's bytes); a large pickle is not copied a second time, and each piece is dropped from
    `pieces` once read."""

    def __init__(self, pieces: list[memoryview | bytes]) -> None:
        self._pieces, self._at, self._offset = pieces, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        done, want = 0, len(buffer)
        while done < want and self._at < len(self._pieces):
            piece = self._pieces[self._at]
            chunk = piece[self._offset:self._offset + want - done]
            buffer[done:done + len(chunk)] = chunk
            done += len(chunk)
            self._offset += len(chunk)
            if self._offset >= len(piece):  # dropped: a chunk is freed once read
                self._pieces[self._at] = b""
                self._at, self._offset = self._at + 1, 0
        return done


class FastUnpickler(_Budgeted, pickle.Unpickler):
    """The C unpickler for pickles `prepare_for_c` prepared; same interface, tree check and
    plain result as BoundedUnpickler. A subclass's `find_class` must resolve `special_globals`
    first (the marker to PickledDict) and map collections.OrderedDict to PickledOrderedDict,
    as the bounded reader's allowlist should too (so NEWOBJ of it agrees on both paths)."""

    special_globals = {DICT_MARKER: PickledDict}
    builds_pickled_dicts = True
