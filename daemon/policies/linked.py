"""An ordered set with O(1) insert at either end, removal, and walks from either end (dict-linked)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator

_END = object()


class OrderedKeys:
    """Keys from oldest to newest; ``older``/``newer`` give a neighbour in O(1) (SIEVE's hand needs that)."""

    __slots__ = ("_older", "_newer", "oldest", "newest")

    def __init__(self) -> None:
        self._older: dict[Hashable, Hashable] = {}
        self._newer: dict[Hashable, Hashable] = {}
        self.oldest: Hashable = _END
        self.newest: Hashable = _END

    def push_newest(self, key: Hashable) -> None:
        self._older[key] = self.newest
        self._newer[key] = _END
        if self.newest is _END:
            self.oldest = key
        else:
            self._newer[self.newest] = key
        self.newest = key

    def discard(self, key: Hashable) -> bool:
        if key not in self._newer:
            return False
        older = self._older.pop(key)
        newer = self._newer.pop(key)
        if older is _END:
            self.oldest = newer
        else:
            self._newer[older] = newer
        if newer is _END:
            self.newest = older
        else:
            self._older[newer] = older
        return True

    def newer(self, key: Hashable) -> Hashable | None:
        n = self._newer[key]
        return None if n is _END else n

    def first(self) -> Hashable | None:
        return None if self.oldest is _END else self.oldest

    def __contains__(self, key: object) -> bool:
        return key in self._newer

    def __len__(self) -> int:
        return len(self._newer)

    def __iter__(self) -> Iterator[Hashable]:
        k = self.oldest
        while k is not _END:
            yield k
            k = self._newer[k]
