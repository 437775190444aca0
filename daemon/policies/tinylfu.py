"""W-TinyLFU (Einziger et al.): a small LRU window, a segmented-LRU main space, and a frequency duel.

Every access is counted in a count-min sketch. New blocks enter the window
(1% of capacity). When the window is over its share, its least recent block
duels the main space's victim: the one the sketch has seen more often stays.
So a block seen once cannot push out a block that keeps being reused, yet a
newly popular block gets in after a few accesses. Registered as ``lfu``.
"""

from __future__ import annotations

import random

from kvrack.daemon.policies.base import Evictable, Key, QueuedPolicy, first_evictable
from kvrack.daemon.policies.sketch import FrequencySketch

WINDOW, PROBATION, PROTECTED = 0, 1, 2


class TinyLfuPolicy(QueuedPolicy):
    name = "lfu"

    def __init__(self, capacity: int, rng: random.Random | None = None, window_fraction: float = 0.01,
                 protected_fraction: float = 0.8) -> None:
        super().__init__(capacity, rng, 3)
        self.window_target = max(1, int(capacity * window_fraction))
        self.protected_target = max(1, int((capacity - self.window_target) * protected_fraction))
        self.sketch = FrequencySketch(capacity)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self.where:
            self.hit(key)
            return
        self.sketch.add(key)
        self._put(key, WINDOW)

    def hit(self, key: Key) -> None:
        q = self.where.get(key)
        if q is None:
            return
        self.sketch.add(key)
        if q == PROBATION:  # reused in the main space: protected
            del self.queues[PROBATION][key]
            self._put(key, PROTECTED)
            protected = self.queues[PROTECTED]
            if len(protected) > self.protected_target:
                demoted = next(iter(protected))
                del protected[demoted]
                self._put(demoted, PROBATION)
        else:
            self.queues[q].move_to_end(key)

    def remove(self, key: Key) -> None:
        self._drop(key)

    def victim(self, evictable: Evictable) -> Key | None:
        window, probation, protected = self.queues
        while True:
            main_victim = first_evictable(probation, protected, evictable=evictable)
            if len(window) <= self.window_target and main_victim is not None:
                return main_victim
            candidate = first_evictable(window, evictable=evictable)
            if candidate is None:
                return main_victim
            if len(probation) + len(protected) < self.capacity - self.window_target:
                del window[candidate]  # the main space has room: no duel
                self._put(candidate, PROBATION)
                continue
            if main_victim is None:
                return candidate
            if self.sketch.estimate(candidate) > self.sketch.estimate(main_victim):
                del window[candidate]  # admitted to the main space; the main victim goes
                self._put(candidate, PROBATION)
                return main_victim
            return candidate
