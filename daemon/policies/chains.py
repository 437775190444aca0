"""Which cached blocks hang under which: the one parent/child tracker of the store, the CXL order and the
simulator, so that eviction goes leaf first everywhere.

A parent's cached children are kept as nothing, the one child (chains are mostly linear), or a collection
of them when the chain branches. Where they are kept is the only difference between users: the store keeps
them on its index entries (``EntryChains``, no memory beyond the slot the entry has, branches as sets), the
others in a dict by key (``Chains``, branches as dicts oldest first, so that a replay is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")


class Chains(Generic[K]):
    """Children by parent, in a dict."""

    def __init__(self) -> None:
        self._by_parent: dict[K, Any] = {}

    # where a parent's children live: overridden by EntryChains
    def _load(self, parent: K) -> Any:
        return self._by_parent.get(parent)

    def _store(self, parent: K, kids: Any) -> None:
        if kids is None:
            self._by_parent.pop(parent, None)
        else:
            self._by_parent[parent] = kids

    ordered = True  # branches as dicts (insertion order) rather than sets

    def add(self, parent: K, kid: K) -> None:
        """``kid`` (a child of ``parent``) is cached now."""
        kids = self._load(parent)
        if kids is None:
            self._store(parent, kid)
        elif isinstance(kids, dict):
            kids[kid] = None
        elif isinstance(kids, set):
            kids.add(kid)
        elif kids is not kid and kids != kid:
            self._store(parent, {kids: None, kid: None} if self.ordered else {kids, kid})

    def drop(self, parent: K, kid: K) -> None:
        """``kid`` is no longer cached."""
        kids = self._load(parent)
        if kids is None:
            return
        if isinstance(kids, (dict, set)):
            if isinstance(kids, dict):
                kids.pop(kid, None)
            else:
                kids.discard(kid)
            if len(kids) == 1:
                self._store(parent, next(iter(kids)))
            elif not kids:
                self._store(parent, None)
        elif kids is kid or kids == kid:
            self._store(parent, None)

    def kids(self, parent: K) -> Iterator[K]:
        """The cached children of ``parent`` (oldest first when ``ordered``)."""
        kids = self._load(parent)
        if kids is None:
            return iter(())
        return iter(kids) if isinstance(kids, (dict, set)) else iter((kids,))

    def get(self, parent: K) -> list[K]:
        """The cached children as a list (empty: a leaf)."""
        return list(self.kids(parent))

    def has_kids(self, parent: K) -> bool:
        return self._load(parent) is not None

    def first(self, parent: K, may_go: Callable[[K], bool]) -> K | None:
        """A cached child of ``parent`` that ``may_go`` accepts, or None."""
        kids = self._load(parent)
        if kids is None:
            return None
        if not isinstance(kids, (dict, set)):
            return kids if may_go(kids) else None
        return next((k for k in kids if may_go(k)), None)


class EntryChains(Chains[Any]):
    """Children kept on the parent's index entry (its ``kids`` slot)."""

    ordered = False

    def __init__(self) -> None:
        pass

    def _load(self, parent: Any) -> Any:
        return parent.kids

    def _store(self, parent: Any, kids: Any) -> None:
        parent.kids = kids
