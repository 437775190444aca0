"""A count-min sketch of 4-bit counters with periodic halving: TinyLFU's frequency memory."""

from __future__ import annotations

from collections.abc import Hashable

import xxhash

_SEEDS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


class FrequencySketch:
    """Approximate access counts over a sliding horizon of ``10 x capacity`` events, in 4 rows of bytes."""

    def __init__(self, capacity: int) -> None:
        width = 1
        while width < 4 * max(capacity, 16):
            width <<= 1
        self.mask = width - 1
        self.rows = [bytearray(width) for _ in _SEEDS]
        self.sample = 10 * max(capacity, 16)
        self.events = 0

    def _slots(self, key: Hashable) -> list[int]:
        h = xxhash.xxh3_64_intdigest(key if isinstance(key, bytes) else repr(key).encode())
        return [((h * seed) >> 17 ^ h) & self.mask for seed in _SEEDS]

    def add(self, key: Hashable) -> None:
        slots = self._slots(key)
        low = min(row[s] for row, s in zip(self.rows, slots))
        if low < 15:
            for row, s in zip(self.rows, slots):
                if row[s] == low:  # conservative update: only the smallest counters grow
                    row[s] = low + 1
        self.events += 1
        if self.events >= self.sample:
            self._age()

    def estimate(self, key: Hashable) -> int:
        return min(row[s] for row, s in zip(self.rows, self._slots(key)))

    def _age(self) -> None:
        """Halve every counter: old popularity fades, so the sketch follows a changing workload."""
        self.events //= 2
        for i, row in enumerate(self.rows):
            self.rows[i] = bytearray(v >> 1 for v in row)
