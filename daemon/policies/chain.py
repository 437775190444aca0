"""Segmented LRU with ghosts for prefix-structured KV blocks (registered as ``chain``; the default is ``lru``).

KV reuse follows chains: a shared system prompt or document heads many
chains, the next turn of a conversation reads the previous prompt back, and a
one-shot prompt is never read again. Plain LRU gives a one-shot prompt's
blocks the same standing as a chain that keeps being read; scan-resistant
FIFOs (S3-FIFO, SIEVE) lose the other way on these traces: a request's tail
is new, and a FIFO's small queue drops it before the next turn comes.

So blocks live in two LRU segments:

- *probation*: blocks not read since they were stored;
- *protected* (30% of the capacity): blocks read again, and blocks stored
  again soon after they were evicted (ghost lists remember as many recently
  evicted keys as the tier holds); its least recent blocks fall back into
  probation.

Victims come from probation while it holds more than 5% of the capacity. The
tier applies leaf-first on top (a victim's cached descendants go before it),
so chains shrink from their tails and shared heads stay: the policy ranks
chains, the tier keeps them whole. Measured against LRU and the offline
optimum in docs/policies.md.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from kvrack.daemon.policies.base import Evictable, Key, QueuedPolicy, first_evictable

PROBATION, PROTECTED = 0, 1


class ChainPolicy(QueuedPolicy):
    name = "chain"

    def __init__(self, capacity: int, rng: random.Random | None = None, protected_fraction: float = 0.3,
                 probation_floor: float = 0.05, ghost_fraction: float = 1.0) -> None:
        super().__init__(capacity, rng, 2)
        self.protected_target = max(1, int(capacity * protected_fraction))
        self.probation_floor = int(capacity * probation_floor)
        self.ghost_limit = max(1, int(capacity * ghost_fraction))
        self.ghost: OrderedDict[Key, None] = OrderedDict()  # evicted from probation
        self.ghost_protected: OrderedDict[Key, None] = OrderedDict()  # evicted from protected

    def _protect(self, key: Key) -> None:
        self._put(key, PROTECTED)
        protected = self.queues[PROTECTED]
        while len(protected) > self.protected_target:
            old, _ = protected.popitem(last=False)
            self._put(old, PROBATION)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self.where:
            self.hit(key)
            return
        if key in self.ghost or key in self.ghost_protected:  # back soon after it was evicted
            self.ghost.pop(key, None)
            self.ghost_protected.pop(key, None)
            self._protect(key)
        else:
            self._put(key, PROBATION)

    def hit(self, key: Key) -> None:
        q = self.where.get(key)
        if q == PROBATION:
            del self.queues[PROBATION][key]
            self._protect(key)
        elif q == PROTECTED:
            self.queues[PROTECTED].move_to_end(key)

    def remove(self, key: Key) -> None:
        q = self._drop(key)
        if q is None:
            return
        ghost = self.ghost if q == PROBATION else self.ghost_protected
        ghost[key] = None
        if len(ghost) > self.ghost_limit:
            ghost.popitem(last=False)

    def victim(self, evictable: Evictable) -> Key | None:
        probation, protected = self.queues
        order = (probation, protected) if len(probation) > self.probation_floor else (protected, probation)
        return first_evictable(*order, evictable=evictable)
