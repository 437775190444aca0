"""The eviction-policy interface: policies see keys and events, never bytes, tiers or sessions.

A tier tells its policy when a block arrives (``insert``), is read (``hit``) and
leaves (``remove``), and asks it for a ``victim`` among the blocks the tier
says are evictable (unpinned, and no descendant cached in this or a faster
tier: leaf first). The policy never removes anything itself; the tier calls
``remove`` when it has dropped the victim. Randomness and time are injected,
so a run is reproducible.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import ClassVar, Generic, TypeVar

Key = Hashable
Evictable = Callable[[Key], bool]
T = TypeVar("T")

def always(_: object) -> bool:
    """Every block is evictable (a tier that pins nothing of its own)."""
    return True


# leaf-first descents deeper than this remember the blocks they passed (parent cycles)
PLAIN_DEPTH = 64


def leaf_first(victim: T | None, next_kid: Callable[[T], T | None]) -> T | None:
    """From a policy's victim down to its deepest descendant that may go first (``next_kid``: one evictable
    child, or None). Parents are the clients' word and may form a cycle: a descent deeper than
    ``PLAIN_DEPTH`` remembers where it has been and stops where it would revisit a block."""
    v = victim
    seen: set[T] | None = None
    depth = 0
    while v is not None:
        kid = next_kid(v)
        if kid is None:
            break
        depth += 1
        if depth > PLAIN_DEPTH:
            if seen is None:
                seen = set()
            if kid in seen:
                break
            seen.add(kid)
        v = kid
    return v


class LeafFirst(Generic[T]):
    """A leaf-first descent that resumes where its last one ended.

    A policy names a chain's head again and again while the chain shrinks
    from its tail, so descending from the head each time costs O(depth) per
    eviction and O(depth²) per chain. After returning a leaf this remembers
    the leaf's parent: when the policy names the same victim next, the
    descent starts there (the block that becomes a leaf once its child has
    gone), and from the victim again when that block may no longer go or
    leads to nothing. ``descend`` finds the leaf under a block (or None),
    ``parent_of`` gives a block's parent (or None), ``may_go`` says whether a
    block may be evicted now.
    """

    __slots__ = ("descend", "parent_of", "may_go", "root", "resume")

    def __init__(self, descend: Callable[[T], T | None], parent_of: Callable[[T], T | None],
                 may_go: Callable[[T], bool] = always) -> None:
        self.descend = descend
        self.parent_of = parent_of
        self.may_go = may_go
        self.root: T | None = None
        self.resume: T | None = None

    def __call__(self, victim: T | None) -> T | None:
        if victim is None:
            self.root = self.resume = None
            return None
        resume = self.resume
        leaf = self.descend(resume) if resume is not None and self.root == victim and self.may_go(resume) else None
        if leaf is None:
            leaf = self.descend(victim)
        self.root = victim
        self.resume = None if leaf is None or leaf == victim else self.parent_of(leaf)
        return leaf


class EvictionPolicy(ABC):
    """Order of eviction for one tier. ``capacity`` is in blocks: it sizes internal queues, not the tier."""

    name: ClassVar[str]

    def __init__(self, capacity: int, rng: random.Random | None = None) -> None:
        if capacity < 1:
            raise ValueError("policy capacity must be at least one block")
        self.capacity = capacity
        self.rng = rng or random.Random(0)

    @abstractmethod
    def insert(self, key: Key, parent: Key | None = None) -> None:
        """A block became resident in the tier; ``parent`` is the block before it in its chain, when known."""

    @abstractmethod
    def hit(self, key: Key) -> None:
        """A resident block was read (or written again)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """A block left the tier (evicted, deleted, moved); unknown keys are ignored."""

    @abstractmethod
    def victim(self, evictable: Evictable) -> Key | None:
        """The block to evict next among those ``evictable`` accepts, or None when there is none."""

    @abstractmethod
    def __iter__(self) -> Iterator[Key]:
        """Resident keys, those nearest eviction first (the policy's own order, no victim side effects)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class QueuedPolicy(EvictionPolicy, ABC):
    """A policy whose residents sit in a few ordered queues (oldest first), ``where`` naming each key's queue."""

    def __init__(self, capacity: int, rng: random.Random | None, nqueues: int) -> None:
        super().__init__(capacity, rng)
        self.queues: tuple[OrderedDict[Key, None], ...] = tuple(OrderedDict() for _ in range(nqueues))
        self.where: dict[Key, int] = {}

    def _put(self, key: Key, q: int) -> None:
        """Append ``key`` (not in any queue) to queue ``q``."""
        self.where[key] = q
        self.queues[q][key] = None

    def _drop(self, key: Key) -> int | None:
        """Take ``key`` out of its queue; the queue it was in, or None when it was not resident."""
        q = self.where.pop(key, None)
        if q is not None:
            del self.queues[q][key]
        return q

    def __iter__(self) -> Iterator[Key]:
        return itertools.chain(*self.queues)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: object) -> bool:
        return key in self.where


def first_evictable(*queues: Iterable[Key], evictable: Evictable) -> Key | None:
    """The first key, queue by queue in order, that the tier may evict."""
    for queue in queues:
        for key in queue:
            if evictable(key):
                return key
    return None
