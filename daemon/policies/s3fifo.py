"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost list.

New blocks enter the small queue (10% of capacity). A block leaving the small
queue moves to the main queue if it was read while there, else it is evicted
and its key remembered in the ghost list; a ghost key that returns goes
straight to the main queue. The main queue is a FIFO with 2-bit frequencies
(CLOCK-like reinsertion). One-hit wonders leave quickly: scan resistance.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Iterator

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key
from kvrack.daemon.policies.linked import OrderedKeys

MAX_FREQ = 3


class S3FifoPolicy(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, capacity: int, rng: random.Random | None = None, small_fraction: float = 0.1) -> None:
        super().__init__(capacity, rng)
        self.small_target = max(1, int(capacity * small_fraction))
        self.small = OrderedKeys()
        self.main = OrderedKeys()
        self.freq: dict[Key, int] = {}
        self.ghost: OrderedDict[Key, None] = OrderedDict()
        self.ghost_limit = max(1, capacity - self.small_target)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self.freq:
            self.hit(key)
            return
        self.freq[key] = 0
        if key in self.ghost:  # evicted unread from the small queue, and back: a real reuse
            del self.ghost[key]
            self.main.push_newest(key)
        else:
            self.small.push_newest(key)

    def hit(self, key: Key) -> None:
        f = self.freq.get(key)
        if f is not None and f < MAX_FREQ:
            self.freq[key] = f + 1

    def remove(self, key: Key) -> None:
        f = self.freq.pop(key, None)
        if f is None:
            return
        if self.small.discard(key):
            if f == 0:  # left the small queue unread: remember the key
                self.ghost[key] = None
                if len(self.ghost) > self.ghost_limit:
                    self.ghost.popitem(last=False)
        else:
            self.main.discard(key)

    def victim(self, evictable: Evictable) -> Key | None:
        """The oldest unread evictable block of the queue over its share; read ones move on, bits spent."""
        small_first = len(self.small) >= self.small_target or len(self.main) == 0
        order = (True, False) if small_first else (False, True)
        for is_small in order:
            key = self._scan(is_small, evictable)
            if key is not None:
                return key
        return None

    def _scan(self, is_small: bool, evictable: Evictable) -> Key | None:
        queue = self.small if is_small else self.main
        for _ in range((MAX_FREQ + 1) * len(queue) + 1):
            key = queue.first()
            if key is None:
                return None
            f = self.freq[key]
            if evictable(key) and f == 0:
                return key
            queue.discard(key)
            if not evictable(key):  # passed over: to the new end of its queue, bits kept
                queue.push_newest(key)
            elif is_small:  # read while probationary: promoted to the main queue
                self.freq[key] = 0
                self.main.push_newest(key)
            else:
                self.freq[key] = f - 1
                self.main.push_newest(key)
        return None

    def __iter__(self) -> Iterator[Key]:
        return itertools.chain(self.small, self.main)

    def __len__(self) -> int:
        return len(self.freq)

    def __contains__(self, key: object) -> bool:
        return key in self.freq
