"""LRU: evict the least recently used evictable block."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key, first_evictable


class LruPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity: int, rng: random.Random | None = None) -> None:
        super().__init__(capacity, rng)
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def insert(self, key: Key, parent: Key | None = None) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def hit(self, key: Key) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, evictable: Evictable) -> Key | None:
        return first_evictable(self.order, evictable=evictable)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, key: object) -> bool:
        return key in self.order
