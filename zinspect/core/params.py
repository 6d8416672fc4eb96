"""`Checkpoint.params` for the usual ZeRO-3 model states (300k names): columns, and a `Param`
made for a name only when something asks for it (`ParamTable`). Opening, validating and
`info --json` read the columns (`column`, `made`, `outside_groups`) and make no Param at all.

Every Param handed out is kept (`made`), so it stays the one truth for its name; a name no
Param was made for is exactly what its columns say: a trainable param, not tied, of its flat
group (`join`)."""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from itertools import accumulate, chain, count, repeat
from operator import attrgetter

from zinspect.core.model import Param

#: what `column` reads: Param attributes (and numel)
FIELDS = ("name", "shape", "dtype", "frozen", "tied_to", "group", "sub_group", "numel")


@dataclass(eq=False)
class _Joined:
    """One flat group's members, as `zero3.attach` cut them: param k's fp32 fragments are
    `make(offsets[k], numels[k], shares[k])` (none when its share is 0)."""

    index: int  # flat group (ZeRO-3 sub-group)
    param_group: int
    names: list[str]
    numels: list[int]
    shares: list[int]
    make: Callable[[int, int, int], object]
    ws: int | None = None  # the world size `shares` were cut over
    _offsets: list[int] | None = None

    def offset(self, k: int) -> int:
        if self._offsets is None:
            self._offsets = list(accumulate(self.shares, initial=0))
        return self._offsets[k]


class ParamTable(MutableMapping):
    """name -> Param, in model order, from columns (names, shapes, dtypes: the module's order)
    and the flat groups joined to them; Params are made on first access (`__getitem__`, `get`;
    `values()` / `items()` make them all, once)."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], dtypes: list[str],
                 groups: list[list[str]], order: list[int] | None = None) -> None:
        self._names, self._shapes, self._dtypes = names, shapes, dtypes
        self._groups = groups  # the flat groups' names, each list the one `join` takes
        #: each name's place in `groups`' names one after another ([]: `names` is that list;
        #: None: not known yet; False: some name is in no group)
        self._order = order
        self.dtype = ""  # for a name whose module tensor gave none (`fill_dtype`)
        self._index: dict[str, int] | None = None
        self._made: dict[str, Param] = {}  # Params made for names of the columns
        self._extra: dict[str, Param] = {}  # names added after (or every name, once all made)
        self._joined: list[_Joined] = []
        self._lock = threading.RLock()
        self._flat: dict[str, int] | None = None  # name -> position over the joined groups
        self._starts: list[int] = []

    # -- building ------------------------------------------------------------------------
    def join(self, index: int, param_group: int, names: list[str], numels: list[int],
             shares: list[int], make: Callable[[int, int, int], object],
             ws: int | None = None) -> bool:
        """Flat group `index`'s members (`names`, a group's in order) get its optimizer group,
        its index and their fragments (`make`), unless some Param is already made or `names`
        is not one of the lists the table was made with, joined once (False: the caller joins
        them one by one)."""
        if self._made or self._extra or self._flat is not None or self._names is None or \
                not any(names is g for g in self._groups) or \
                any(names is j.names for j in self._joined):
            return False
        self._joined.append(_Joined(index, param_group, names, numels, shares, make, ws))
        return True

    def fill_dtype(self, dtype: str) -> None:
        """A name whose module tensor gave no dtype gets `dtype` (the checkpoint's)."""
        self.dtype = dtype
        for p in self.made():
            p.dtype = p.dtype or dtype

    # -- the columns ---------------------------------------------------------------------
    def made(self) -> list[Param]:
        """Every Param made so far (read, added or replaced), in model order: the params that
        may be other than usual. Any other name is a trainable, untied param as its columns
        say."""
        with self._lock:
            if not self._made:
                return list(self._extra.values())
            return [*map(self._made.__getitem__, sorted(self._made, key=self._position)),
                    *self._extra.values()]

    def outside_groups(self, sub_groups: set[int]) -> list[Param]:
        """Every param but those no Param was made for whose flat group is in `sub_groups`."""
        with self._lock:
            return self._outside_groups(sub_groups)

    def _outside_groups(self, sub_groups: set[int]) -> list[Param]:
        if self._names is not None and \
                sum(len(j.names) for j in self._joined) == len(self._names):
            skip = [j for j in self._joined if j.index in sub_groups]
            if len(skip) == len(self._joined):
                return list(self.made())
            keep = set(chain.from_iterable(j.names for j in self._joined if j not in skip))
            return [self[n] for n in self._names if n in keep or n in self._made] + \
                list(self._extra.values())
        return list(self.values())

    def column(self, field: str) -> list:
        """Each param's `field` (one of FIELDS), in model order, without making a Param."""
        with self._lock:
            return self._column(field)

    def _column(self, field: str) -> list:
        if self._names is None:
            return list(map(attrgetter(field), self._extra.values()))
        n = len(self._names)
        if field == "name":
            out = list(self._names)
        elif field == "shape":
            out = list(self._shapes)
        elif field == "numel":  # the joined groups' (cut from these shapes), else computed
            out = self._in_model_order({id(j.names): j.numels for j in self._joined}) or \
                list(map(math.prod, self._shapes))
        elif field == "dtype":
            dtypes = self._dtypes
            out = list(dtypes) if not self.dtype or "" not in dtypes else \
                [d or self.dtype for d in dtypes]
        elif field in ("frozen", "tied_to"):
            out = [False if field == "frozen" else None] * n
        else:
            out = self._group_column(field == "group")
        for name, p in self._made.items():  # a Param made is the truth for its name
            out[self._position(name)] = getattr(p, field)
        return out + list(map(attrgetter(field), self._extra.values()))

    @property
    def pristine(self) -> bool:
        """No Param made or added: every value of `column` is one the parse checked (names
        str, shapes tuples of ints, ...)."""
        return self._names is not None and not self._made and not self._extra

    def _group_column(self, param_group: bool) -> list:
        """Each name's flat group (or param group): None for a name of no joined group."""
        of = {id(j.names): j.param_group if param_group else j.index for j in self._joined}
        out = self._in_model_order({k: repeat(v, len(j.names)) for (k, v), j in
                                    zip(of.items(), self._joined, strict=True)})
        if out is not None:
            return out
        at = dict(chain.from_iterable(zip(j.names, repeat(of[id(j.names)]))
                                      for j in self._joined))
        return list(map(at.get, self._names))

    def _in_model_order(self, per_group: dict[int, Iterable]) -> list | None:
        """A value a name of each group (`per_group`: id of a group's names -> its values, in
        its order) in model order, when every group has them and every name is in one (else
        None)."""
        order = self._places() if len(per_group) == len(self._groups) else None
        if order is None:
            return None
        flat = list(chain.from_iterable(per_group[id(g)] for g in self._groups))
        return list(map(flat.__getitem__, order)) if order else flat

    def _places(self) -> list[int] | None:
        """`order` (an empty list when the names are the groups' names in order; None when
        they are not the groups' names, each once), found once when the table was made
        without it."""
        if self._order is None:
            order = places(self._names, self._groups)
            self._order = order if order is not None else False
        return self._order if self._order is not False else None

    def numels_of(self, names: list[str]) -> list[int]:
        """The numels of those of `names` that are params; from the columns when `names` is a
        joined group's and no Param of it was made."""
        j = self._as_joined(names)
        return j.numels if j is not None else \
            [p.numel for p in map(self.get, names) if p is not None]

    def shares_of(self, names: list[str], ws: int) -> list[int] | None:
        """The ZeRO-3 shares `join` was given for `names` when they were cut over `ws` ranks
        and no Param of them was made (None: ask `numels_of`)."""
        j = self._as_joined(names)
        return j.shares if j is not None and j.ws == ws else None

    def _as_joined(self, names: list[str]) -> _Joined | None:
        """The joined group whose names list `names` is, when no Param of it was made."""
        j = next((j for j in self._joined if j.names is names), None)
        if j is not None and not (self._made and any(map(self._made.__contains__, names))):
            return j
        return None

    # -- the mapping ---------------------------------------------------------------------
    def _position(self, name) -> int | None:
        index = self._index
        if index is None:
            with self._lock:
                if self._names is None:
                    return None
                index = self._index = self._index or dict_in_chunks(self._names, count())
        return index.get(name)

    def _make(self, i: int) -> Param:
        name = self._names[i]
        p = Param(name, self._shapes[i], self._dtypes[i] or self.dtype)
        if self._flat is None:
            self._flat = dict_in_chunks([*chain.from_iterable(j.names for j in self._joined)],
                                        count())
            self._starts = list(accumulate((len(j.names) for j in self._joined), initial=0))
        at = self._flat.get(name)
        if at is not None:
            g = bisect_right(self._starts, at) - 1
            j, k = self._joined[g], at - self._starts[g]
            p.group, p.sub_group = j.param_group, j.index
            if j.shares[k]:
                p.fragments = j.make(j.offset(k), j.numels[k], j.shares[k])
        self._made[name] = p
        return p

    def __getitem__(self, name) -> Param:
        p = self._made.get(name) or self._extra.get(name)
        if p is not None:
            return p
        with self._lock:  # (the app's threads: one Param a name, and none while all are made)
            p = self._made.get(name) or self._extra.get(name)
            if p is not None:
                return p
            i = self._position(name) if self._names is not None else None
            if i is None:
                raise KeyError(name)
            return self._make(i)

    def get(self, name, default=None):
        try:
            return self[name]
        except (KeyError, TypeError):  # TypeError: an unhashable key, as dict.get raises it
            return default

    def __contains__(self, name) -> bool:
        return name in self._extra or self._position(name) is not None

    def __iter__(self) -> Iterator[str]:
        with self._lock:  # (one state: `_all` may run in another thread)
            names, extra = self._names, self._extra
        if names is None:
            return iter(extra)
        return chain(names, extra) if extra else iter(names)

    def __len__(self) -> int:
        with self._lock:
            return (0 if self._names is None else len(self._names)) + len(self._extra)

    def __setitem__(self, name: str, p: Param) -> None:
        if self._names is not None and self._position(name) is not None:
            self._made[name] = p
        else:
            self._extra[name] = p

    def __delitem__(self, name) -> None:
        self._all()
        del self._extra[name]

    def _all(self) -> dict[str, Param]:
        """Every Param made (in model order, in `_extra`): the table is a dict from then on."""
        if self._names is None:
            return self._extra
        with self._lock:
            if self._names is not None:
                self._make_all()
        return self._extra

    def _make_all(self) -> None:
        """`_all`, with the lock held: as `_make`, a flat group at a time."""
        dtypes = self._dtypes if not self.dtype else [d or self.dtype for d in self._dtypes]
        made = dict(zip(self._names, map(Param, self._names, self._shapes, dtypes), strict=True))
        for j in self._joined:
            for name, o, n, P in zip(j.names, accumulate(j.shares, initial=0), j.numels,
                                     j.shares, strict=False):  # (offsets: one more)
                p = made[name]
                p.group, p.sub_group = j.param_group, j.index
                if P:
                    p.fragments = j.make(o, n, P)
        made.update(self._made)  # the Params already made stay the ones
        made.update(self._extra)
        self._extra, self._made, self._index = made, {}, None
        self._names = self._shapes = self._dtypes = None

    def values(self):
        return self._all().values()

    def items(self):
        return self._all().items()

    def __repr__(self) -> str:
        return repr(self._all())


def places(names: list, groups: list[list]) -> list[int] | None:
    """Each of `names`' place in `groups`' names one after another ([]: `names` is that list),
    when they are the same names, each once (None otherwise; `names` are distinct: a dict's
    keys). At C speed, and when `names` interleave the groups, each group's names in its own
    order (DeepSpeed's groups take the model's params in order), with no dict of every name
    (300k names: 0.12 -> 0.045 s): each name's group is looked up among the groups but the
    largest, each group's names take its places in turn, and the places are checked."""
    if len(names) != sum(map(len, groups)):
        return None
    flat = list(chain.from_iterable(groups))
    if names == flat:
        return []
    every = list(range(len(names)))
    starts = accumulate(map(len, groups[:-1]), initial=0)
    turns = [iter(every[a:a + len(g)]) for a, g in zip(starts, groups, strict=True)]
    big = max(range(len(groups)), key=lambda i: len(groups[i]))
    if len(groups) == 2:  # (the usual two: a set's look-up takes half a dict's)
        which, turns = set(groups[1 - big]).__contains__, {True: turns[1 - big],
                                                             False: turns[big]}
    else:  # name -> its group, None for the largest group's
        group: dict = {}
        for i, g in enumerate(groups):
            if i != big:
                group.update(zip(g, repeat(i)))
        which, turns = group.get, {**dict(enumerate(turns)), None: turns[big]}
    # each name's group, then each group's places in turn (two passes: faster than one)
    order = list(map(next, map(turns.__getitem__, list(map(which, names)))))
    # distinct names at the places of equal names: each place once, each name once in both
    if list(map(flat.__getitem__, order)) == names:
        return order
    # not interleaved (or a name in no group, or in two): each name's place, looked up
    at = dict(zip(flat, count()))
    order = list(map(at.get, names))
    return order if None not in order else None  # (distinct names: each in flat once)


#: keys put in a dict between two chances for other threads to run (1-2 ms at 300k names)
CHUNK = 4096


def dict_in_chunks(keys: list, values: Iterable) -> dict:
    """`dict(zip(keys, values))`, CHUNK keys at a time: one `dict(zip())` of 297k names is
    one C call that holds the interpreter 30-60 ms, so a worker making it kept the UI thread
    from a key typed meanwhile; between chunks other threads get their turn."""
    out: dict = {}
    values = iter(values)
    for start in range(0, len(keys), CHUNK):
        out.update(zip(keys[start:start + CHUNK], values, strict=False))  # (values: more)
    return out


# -- the same questions of a plain dict of Params (every layout but the usual ZeRO-3) ---------
def made(params) -> Iterable[Param]:
    """The Params of `params` that may be other than usual (`ParamTable.made`; all of a dict)."""
    return params.made() if type(params) is ParamTable else params.values()


def column(params, field: str) -> list:
    """Each param's `field`, in model order (`ParamTable.column`)."""
    if type(params) is ParamTable:
        return params.column(field)
    return list(map(attrgetter(field), params.values()))


def outside_groups(params, sub_groups: set[int]) -> Iterable[Param]:
    """`ParamTable.outside_groups`; every Param of a dict."""
    return params.outside_groups(sub_groups) if type(params) is ParamTable else params.values()


def fill_dtype(params, dtype: str) -> None:
    """A param of no dtype gets `dtype`."""
    if type(params) is ParamTable:
        params.fill_dtype(dtype)
        return
    for p in params.values():
        if not p.dtype:
            p.dtype = dtype


def numels_of(params, names: list[str]) -> list[int]:
    """The numels of those of `names` that are params (`ParamTable.numels_of`)."""
    if type(params) is ParamTable:
        return params.numels_of(names)
    return [math.prod(p.shape) for p in map(params.get, names) if p is not None]


def shares_of(params, names: list[str], ws: int) -> list[int] | None:
    """`ParamTable.shares_of` (None for a dict: its Params may hold anything)."""
    return params.shares_of(names, ws) if type(params) is ParamTable else None


def pristine(params) -> bool:
    """`ParamTable.pristine` (a dict's Params may hold anything)."""
    return type(params) is ParamTable and params.pristine
