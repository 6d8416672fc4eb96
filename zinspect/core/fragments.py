"""Where a param's elements are: `Fragment` (an element range of one rank file's tensor at a
byte offset), `TensorAt` (a rank file's flat tensor, resolved once, that makes the fragments
indexing into it) and `Fragments` (a param's fragments built on first use). Part of the model
(`zinspect.core.model` imports them); metadata only, no tensor bytes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from zinspect.core.torchzip import DTYPE_SIZES


@dataclass
class Fragment:
    """Elements [start, start+numel) of a param (flattened), held by `file` at byte `offset`.

    `padding` elements follow it in the same partition (ZeRO-3 per-param padding). `shard`: the
    tp rank whose shard (`Param.shards[shard]`) the range indexes; None: the full tensor."""

    rank: int
    file: str
    group: int | None  # flat group (ZeRO-3 sub-group) index; None for module/frozen records
    start: int
    numel: int
    offset: int | None  # absolute byte offset in the file; None when the record is missing
    dtype: str
    padding: int = 0
    source: str = "master"  # "master" (fp32 partition), "frozen" (16-bit fragment), "module"
    group_offset: int = 0  # element offset inside the rank's flat group
    intact: bool = True  # False when its bytes are not all in the file (missing or truncated)
    shard: int | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True, slots=True)
class TensorAt:
    """A flat tensor of a rank file, resolved once: where its element 0 is and how many of its
    elements are really in the file. It makes the fragments that index into it."""

    rank: int
    file: str
    base: int | None  # byte offset of element 0 in the file (None: the record is missing)
    itemsize: int
    dtype: str
    numel: int
    whole: int  # elements from 0 that are really in the file

    def fragment(self, group: int | None, elem: int, start: int, numel: int, padding: int = 0,
                 source: str = "master", shard: int | None = None) -> Fragment:
        """Param elements [start, start+numel) held at element `elem` of this tensor."""
        return Fragment(self.rank, self.file, group, start, numel,
                        None if self.base is None else self.base + elem * self.itemsize,
                        self.dtype, padding, source, elem,
                        self.base is not None and elem + numel <= self.whole, shard)


_BUILDING = threading.Lock()


class Fragments(Sequence):
    """A param's fragments, built on first use.

    ZeRO-3 gives every param one fragment per rank: 70B params over 512 ranks is ~370k of them,
    and a 300k-name model at 64 ranks would be 19M. Opening a checkpoint builds none of them;
    the views that show one param, and the merge, build them as they go."""

    __slots__ = ("_items", "_make", "_reads")

    def __init__(self, items: Iterable[Fragment] = (),
                 make: Callable[[], list[Fragment]] | None = None,
                 reads: Callable[[], bool] | None = None) -> None:
        self._items = list(items)
        self._make = make
        self._reads = reads  # whether `make` would read files now (None: never)

    @property
    def pending_reads(self) -> bool:
        """Building them would read rank files (seconds at 512 ranks): do it off the UI thread."""
        return self._make is not None and self._reads is not None and self._reads()

    def _all(self) -> list[Fragment]:
        make = self._make
        if make is not None:  # two threads (the merge, the app's detail view) may both build:
            built = make()  # the first to finish keeps its list, the other's is dropped
            with _BUILDING:
                if self._make is make:
                    self._items.extend(built)
                    self._make = None
        return self._items

    def __getitem__(self, i):
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self._all())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Fragments({self._items!r})" if self._make is None else "Fragments(<lazy>)"
