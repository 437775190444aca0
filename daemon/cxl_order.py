"""The daemon's eviction order over one namespace's CXL region: a named policy, leaf first.

The region can evict by itself (a clock hand over its index, used when a
writer finds no free chunk), but that order knows neither recency nor chains:
it may drop a shared head while the blocks behind it stay, unreachable. So
the daemon, the region's only allocating host, keeps the order here and frees
room before each copy: the policy (``cxl.policy``) names a victim and a block
whose descendants are still in the region gives way to them first, as in
DRAM. It sees a block stored when its copy lands, read when the daemon copies
it back up, and read when clients report the hits they served themselves
from the mapping (``touch``, batched, no reply awaited).

Keys only, never bytes; event-loop thread only.
"""

from __future__ import annotations

from typing import Any

from kvrack.daemon.policies import make_policy
from kvrack.daemon.policies.base import LeafFirst, always, leaf_first
from kvrack.daemon.policies.chains import Chains


class RegionOrder:
    """Which blocks of a region go first. ``capacity`` is the region's chunk count (one block a chunk)."""

    def __init__(self, policy: str, capacity: int) -> None:
        self.name = policy
        self.capacity = capacity
        self.policy = make_policy(policy, max(1, capacity))
        self.parent: dict[bytes, bytes | None] = {}  # the members, with their parents
        self.kids: Chains[bytes] = Chains()  # members' children that are members too
        self.touches = 0  # reads reported or seen
        self.evictions = 0  # victims named by the policy
        self._leaf_first = LeafFirst(lambda key: leaf_first(key, self._a_kid), self.parent.get, self.__contains__)

    def __len__(self) -> int:
        return len(self.parent)

    def __contains__(self, key: object) -> bool:
        return key in self.parent

    def add(self, key: bytes, parent: bytes | None = None) -> None:
        """A block is in the region now (its copy landed, or it was there at start-up)."""
        if key in self.parent:
            self.policy.hit(key)
            return
        if parent == key:
            parent = None
        self.parent[key] = parent
        self.policy.insert(key, parent)
        if parent is not None and parent in self.parent:  # copies land in commit order: parents first
            self.kids.add(parent, key)

    def touch(self, keys: Any) -> int:
        """Reads of these blocks; returns how many are members."""
        n = 0
        for key in keys:
            if key in self.parent:
                self.policy.hit(key)
                n += 1
        self.touches += n
        return n

    def remove(self, key: bytes) -> bool:
        """The block left the region (evicted, deleted, or found gone); whether it was a member."""
        if key not in self.parent:
            return False
        parent = self.parent.pop(key)
        self.policy.remove(key)
        if parent is not None:
            self.kids.drop(parent, key)
        for kid in self.kids.get(key):  # orphans now: their parent left the region
            self.kids.drop(key, kid)
        return True

    def victim(self) -> bytes | None:
        """The next block to go: the policy's choice, or its deepest descendant still in the region."""
        victim = self.policy.victim(always)
        assert victim is None or isinstance(victim, bytes)
        return self._leaf_first(victim)

    def _a_kid(self, key: bytes) -> bytes | None:
        return self.kids.first(key, always)

    def evict(self) -> bytes | None:
        """Name the next victim and take it out of the order (the caller deletes it from the region)."""
        v = self.victim()
        if v is not None:
            self.remove(v)
            self.evictions += 1
        return v

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name, "tracked_blocks": len(self.parent), "policy_evictions": self.evictions,
                "touches": self.touches}
