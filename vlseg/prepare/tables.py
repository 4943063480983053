"""Compact per-case tables, so that an index of tens of thousands of cases stays small in every data-loader worker.

A case's ``classes`` (class → label values) is usually the same table for every case of its dataset, its ``present``
flags are one bit per class, and its ``boxes`` are six small integers per present class.  Held as dicts of lists,
those take about 10 kB per case; here they are one shared dict per distinct table (``SharedTable``), a shared name
tuple and an integer bit mask (``Flags``), and a shared name tuple with the integers packed in one ``bytes``
(``Rows``).

Each is a ``MutableMapping`` that reads like the dict it replaces (equal to it, same order, same values: lists of
ints, bools) and pickles as its compact parts (a table or name tuple shared by many cases is pickled once per pickle
call).  The first write to one turns it into a dict of its own, so changing one case's table never changes another's.
Values read out are fresh lists, except ``SharedTable``'s, which are the shared table's lists: treat them as read-only.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import MutableMapping


class Interner:
    """One object per distinct value seen (for the duration of one manifest read or cache open)."""

    def __init__(self):
        self._seen: dict = {}

    def names(self, names: tuple) -> tuple:
        """The first tuple equal to ``names`` seen so far."""
        return self._seen.setdefault(("names", names), names)

    def adopt(self, table) -> None:
        """Share the name tuple of ``table`` from now on, if it is a compact table (else nothing)."""
        if isinstance(table, (Flags, Rows)):
            self.names(table._names)

    def table(self, table: dict) -> dict:
        """The first dict equal to ``table`` (keys in the same order) seen so far."""
        key = ("table", tuple((k, tuple(v)) for k, v in table.items()))
        return self._seen.setdefault(key, table)


class _Compact(MutableMapping):
    """Reads from compact storage (``_keys``, ``_get``) until the first write, then from a dict of its own."""

    __slots__ = ("_own",)

    def _keys(self) -> tuple:
        raise NotImplementedError

    def _get(self, key):
        raise NotImplementedError

    def _parts(self) -> tuple:
        raise NotImplementedError

    def __getitem__(self, key):
        return self._own[key] if self._own is not None else self._get(key)

    def __contains__(self, key) -> bool:
        return key in (self._own if self._own is not None else self._keys())

    def __iter__(self):
        return iter(self._own if self._own is not None else self._keys())

    def __len__(self) -> int:
        return len(self._own if self._own is not None else self._keys())

    def _mine(self) -> dict:
        if self._own is None:
            self._own = {k: self._get(k) for k in self._keys()}
        return self._own

    def __setitem__(self, key, value) -> None:
        self._mine()[key] = value

    def __delitem__(self, key) -> None:
        del self._mine()[key]

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self):
        return (_owned, (type(self), self._own)) if self._own is not None else (type(self), self._parts())


def _owned(cls, own: dict):
    """A table that was written to: its own dict (how one pickles)."""
    table = cls.__new__(cls)
    table._own = own
    return table


class SharedTable(_Compact):
    """A dict shared by many cases (one per dataset, usually): read through, copied at the first write."""

    __slots__ = ("_table",)

    def __init__(self, table: dict):
        self._own, self._table = None, table

    def _keys(self):
        return self._table

    def _get(self, key):
        return self._table[key]

    def _parts(self) -> tuple:
        return (self._table,)

    def _mine(self) -> dict:
        if self._own is None:
            self._own = {k: list(v) for k, v in self._table.items()}
        return self._own


class Flags(_Compact):
    """name → bool for the names of a (shared) tuple, as the bits of one integer (bit i: ``names[i]``)."""

    __slots__ = ("_names", "_mask")

    def __init__(self, names: tuple, mask: int):
        self._own, self._names, self._mask = None, names, mask

    @classmethod
    def of(cls, flags: dict, interner: Interner) -> Flags:
        names = interner.names(tuple(flags))
        return cls(names, sum(1 << i for i, v in enumerate(flags.values()) if v))

    def _keys(self):
        return self._names

    def _get(self, key) -> bool:
        try:
            return bool(self._mask >> self._names.index(key) & 1)
        except ValueError:
            raise KeyError(key) from None

    def _parts(self) -> tuple:
        return self._names, self._mask


class Rows(_Compact):
    """name → a row of small integers, all rows in one ``bytes`` (machine int16/32/64, ``width`` per row): a list of
    ints per name, or one int per name for width 0."""

    __slots__ = ("_names", "_data", "_code", "_width")

    def __init__(self, names: tuple, data: bytes, code: str, width: int):
        self._own, self._names, self._data, self._code, self._width = None, names, data, code, width

    @classmethod
    def of(cls, table: dict, interner: Interner, width: int = 0) -> MutableMapping:
        """``table`` (name → ``width`` ints, or one int for width 0) held compactly; as a dict when it does not fit
        (a row of another length, a value outside int64)."""
        rows = list(table.values())
        if width and not all(isinstance(r, list) and len(r) == width for r in rows):
            return dict(table)
        flat = [v for r in rows for v in r] if width else rows
        for code in ("h", "i", "q"):  # box corners and voxel counts mostly fit in 2 or 4 bytes
            try:
                data = array(code, flat).tobytes()
            except (OverflowError, TypeError):
                continue
            return cls(interner.names(tuple(table)), data, sys.intern(code), width)
        return dict(table)

    def _keys(self):
        return self._names

    def _get(self, key):
        try:
            i = self._names.index(key)
        except ValueError:
            raise KeyError(key) from None
        values = memoryview(self._data).cast(self._code)
        w = self._width
        return values[i * w:(i + 1) * w].tolist() if w else values[i]

    def _parts(self) -> tuple:
        return self._names, self._data, self._code, self._width
