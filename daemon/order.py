"""A tier's eviction order over index entries: which committed, unpinned block goes first.

One interface for every tier the store evicts from (DRAM here; the NVMe tier's order is the same policy
interface over its copies): ``add`` a block that may be evicted, ``remove`` one that may not any more
(pinned, gone), ``touch`` one that was used, ``holds`` says whether a block is a member (the order's own
state: callers never infer it), and ``victim`` names the next block to go. LRU is an intrusive list
threaded through the entries' ``prev``/``next`` slots (O(1), no per-block dict); every other named policy
(``kvrack.daemon.policies``) is wrapped by ``PolicyOrder``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from kvrack.daemon.index import Entry, Namespace
from kvrack.daemon.policies import make_policy
from kvrack.daemon.policies.base import always


class EvictionOrder(Protocol):
    """The members are exactly the blocks that may be evicted now."""

    def add(self, e: Entry) -> None: ...

    def remove(self, e: Entry) -> None: ...

    def touch(self, e: Entry) -> None: ...

    def holds(self, e: Entry) -> bool: ...

    def victim(self) -> Entry | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Entry]: ...

    @property
    def size(self) -> int: ...


class LruOrder:
    """Least recently used first: a doubly linked list with one sentinel, threaded through the entries."""

    __slots__ = ("root", "size")

    def __init__(self) -> None:
        root = Entry.__new__(Entry)
        root.prev = root.next = root
        self.root = root
        self.size = 0

    def add(self, e: Entry) -> None:
        root = self.root
        last = root.prev
        e.prev = last
        e.next = root
        last.next = e  # type: ignore[union-attr]
        root.prev = e
        self.size += 1

    def remove(self, e: Entry) -> None:
        e.prev.next = e.next  # type: ignore[union-attr]
        e.next.prev = e.prev  # type: ignore[union-attr]
        e.prev = e.next = None
        self.size -= 1

    def touch(self, e: Entry) -> None:
        self.remove(e)
        self.add(e)

    def holds(self, e: Entry) -> bool:
        return e.prev is not None

    def victim(self) -> Entry | None:
        e = self.root.next
        return None if e is self.root else e

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Entry]:  # oldest first
        e = self.root.next
        while e is not self.root:
            assert e is not None
            yield e
            e = e.next


class PolicyOrder:
    """A named eviction policy over the entries. Membership is marked in the entry's ``prev`` slot (a marker
    object): the policy's own containers answer ``holds`` too, but slower. A pin takes the entry out and the
    unpin puts it back, which the policy sees as a removal and a fresh insert: policies with a ghost memory
    (``chain``) count that as reuse."""

    __slots__ = ("policy", "_mark")

    def __init__(self, name: str, capacity_blocks: int) -> None:
        self.policy = make_policy(name, max(1, capacity_blocks))
        self._mark = Entry.__new__(Entry)

    @property
    def size(self) -> int:
        return len(self.policy)

    def add(self, e: Entry) -> None:
        e.prev = self._mark
        self.policy.insert(e)

    def remove(self, e: Entry) -> None:
        e.prev = None
        self.policy.remove(e)

    def touch(self, e: Entry) -> None:
        self.policy.hit(e)

    def holds(self, e: Entry) -> bool:
        return e.prev is self._mark

    def victim(self) -> Entry | None:
        victim = self.policy.victim(always)
        assert victim is None or isinstance(victim, Entry)
        return victim

    def __len__(self) -> int:
        return len(self.policy)

    def __iter__(self) -> Iterator[Entry]:  # members, nearest eviction first; a snapshot, so callers may remove
        for e in list(self.policy):
            assert isinstance(e, Entry)
            yield e


def make_order(policy: str, capacity_blocks: int) -> LruOrder | PolicyOrder:
    """LRU as the intrusive list; any other policy by its name."""
    return LruOrder() if policy == "lru" else PolicyOrder(policy, capacity_blocks)


class NamespaceOrders:
    """The DRAM tier's order: one order per namespace (``ns.order``), so that a namespace over its quota evicts
    only its own blocks, and the choice of namespace when the tier itself is full (``pick``): one over its
    quota first, then the one holding the most DRAM, so a tenant that hoards loses blocks before the others.
    With one namespace this is that namespace's order, as it always was."""

    def __init__(self, namespaces: dict[str, Namespace], policy: str, capacity_blocks: int) -> None:
        self.namespaces = namespaces
        for ns in namespaces.values():
            ns.order = make_order(policy, capacity_blocks)
        self.single = next(iter(namespaces.values())) if len(namespaces) == 1 else None

    def add(self, e: Entry) -> None:
        e.ns.order.add(e)

    def remove(self, e: Entry) -> None:
        e.ns.order.remove(e)

    def touch(self, e: Entry) -> None:
        e.ns.order.touch(e)

    def holds(self, e: Entry) -> bool:
        return bool(e.ns.order.holds(e))

    @property
    def size(self) -> int:
        return sum(ns.order.size for ns in self.namespaces.values())

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Entry]:
        for ns in self.namespaces.values():
            yield from ns.order

    def pick(self) -> Iterator[Namespace]:
        """Namespaces to evict from, in order, when the tier is full (those with evictable blocks)."""
        if self.single is not None:
            yield self.single
            return
        candidates = [ns for ns in self.namespaces.values() if ns.order.size]
        candidates.sort(key=lambda ns: (-ns.over_quota("dram"), -ns.dram_bytes))
        yield from candidates
