"""SIEVE (Zhang et al., NSDI'24): a FIFO with one visited bit and a hand that sweeps from old to new.

A hit only sets a bit (no reordering), so hits are cheap; the hand clears bits
as it passes and evicts the first unvisited block. Blocks the tier cannot
evict are passed over like visited ones, keeping their bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key
from kvrack.daemon.policies.linked import OrderedKeys


class SievePolicy(EvictionPolicy):
    name = "sieve"

    def __init__(self, capacity: int, rng: random.Random | None = None) -> None:
        super().__init__(capacity, rng)
        self.queue = OrderedKeys()
        self.visited: dict[Key, bool] = {}
        self.hand: Key | None = None

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self.visited:
            self.visited[key] = True
            return
        self.queue.push_newest(key)
        self.visited[key] = False

    def hit(self, key: Key) -> None:
        if key in self.visited:
            self.visited[key] = True

    def remove(self, key: Key) -> None:
        if key not in self.visited:
            return
        if self.hand == key:
            self.hand = self.queue.newer(key)
        self.queue.discard(key)
        del self.visited[key]

    def victim(self, evictable: Evictable) -> Key | None:
        n = len(self.visited)
        key = self.hand if self.hand is not None else self.queue.first()
        # two sweeps clear every bit once; a third finds an unvisited evictable block if one exists
        for _ in range(3 * n):
            if key is None:
                key = self.queue.first()
                if key is None:
                    return None
            if self.visited[key]:
                self.visited[key] = False
            elif evictable(key):
                self.hand = self.queue.newer(key)
                return key
            key = self.queue.newer(key)
        return None

    def __iter__(self) -> Iterator[Key]:
        return iter(self.queue)

    def __len__(self) -> int:
        return len(self.visited)

    def __contains__(self, key: object) -> bool:
        return key in self.visited
