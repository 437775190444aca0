"""CLOCK (second chance): a ring in insertion order and one reference bit a block; the NVMe tier's default.

A hit sets the bit; the hand takes blocks off the ring's head, puts back (clearing the bit) those read
since it last passed or that the tier may not evict now, and returns the first other one. Removal is lazy:
a removed block stays in the ring, skipped when the hand reaches it, until removed ones pile up and the
ring is compacted. Its bookkeeping is the ring (8 bytes a block) and two bits a block, which a tier can
keep in its own records (``EntryFlags``: the index entry's ``nflags``) rather than in a dict.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Protocol

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key

QUEUED = 1  # in the ring (possibly a removed block the hand has not reached yet)
REFERENCED = 2  # read since the hand last passed it
PRESENT = 4  # a member: inserted and not removed
COMPACT_AFTER = 4096  # removed blocks the ring may carry before it is compacted (and half of it at least)


class Flags(Protocol):
    """Where the policy keeps each block's bits."""

    def get(self, key: Any) -> int: ...

    def set(self, key: Any, bits: int) -> None: ...


class DictFlags:
    """Bits in a dict: for keys that carry no record of their own (the simulator's)."""

    def __init__(self) -> None:
        self.bits: dict[Key, int] = {}

    def get(self, key: Any) -> int:
        return self.bits.get(key, 0)

    def set(self, key: Any, bits: int) -> None:
        if bits:
            self.bits[key] = bits
        else:
            self.bits.pop(key, None)


class EntryFlags:
    """Bits in the index entry's ``nflags`` slot (its low 3 bits: QUEUED, REFERENCED, PRESENT): no memory beyond
    the ring."""

    @staticmethod
    def get(key: Any) -> int:
        return int(key.nflags) & 7

    @staticmethod
    def set(key: Any, bits: int) -> None:
        key.nflags = (key.nflags & ~7) | bits  # the bits above are the entry's hit count


class ClockPolicy(EvictionPolicy):
    name = "clock"

    def __init__(self, capacity: int, rng: Any = None, flags: Flags | None = None) -> None:
        super().__init__(capacity, rng)
        self.flags: Flags = flags if flags is not None else DictFlags()
        self.ring: collections.deque[Key] = collections.deque()
        self.members = 0
        self.stale = 0  # removed blocks still in the ring

    def insert(self, key: Key, parent: Key | None = None) -> None:
        bits = self.flags.get(key)
        if bits & PRESENT:
            self.flags.set(key, bits | REFERENCED)  # inserted again: a sign of reuse
            return
        self.members += 1
        if bits & QUEUED:  # removed, and back before the hand reached its old place in the ring
            self.stale -= 1
            self.flags.set(key, bits | PRESENT)
            return
        self.flags.set(key, QUEUED | PRESENT)
        self.ring.append(key)

    def hit(self, key: Key) -> None:
        bits = self.flags.get(key)
        if bits & PRESENT:
            self.flags.set(key, bits | REFERENCED)

    def remove(self, key: Key) -> None:
        bits = self.flags.get(key)
        if not bits & PRESENT:
            return
        self.members -= 1
        self.stale += 1
        self.flags.set(key, QUEUED)  # the ring still holds it; the hand or a compaction drops it
        if self.stale > COMPACT_AFTER and self.stale * 2 > len(self.ring):
            self.compact()

    def victim(self, evictable: Evictable) -> Key | None:
        """The hand's choice, left at the head of the ring: the tier removes it (or asks again)."""
        ring, flags = self.ring, self.flags
        for _ in range(2 * len(ring) + 1):
            if not ring:
                return None
            key = ring[0]
            bits = flags.get(key)
            if not bits & PRESENT:  # removed since it was queued
                ring.popleft()
                flags.set(key, 0)
                self.stale -= 1
                continue
            if bits & REFERENCED or not evictable(key):
                ring.rotate(-1)
                flags.set(key, QUEUED | PRESENT)
                continue
            return key
        return None

    def compact(self) -> None:
        """Drop removed blocks from the ring now rather than when the hand reaches them."""
        keep: collections.deque[Key] = collections.deque()
        for key in self.ring:
            if self.flags.get(key) & PRESENT:
                keep.append(key)
            else:
                self.flags.set(key, 0)
        self.ring = keep
        self.stale = 0

    def __iter__(self) -> Iterator[Key]:
        return (key for key in self.ring if self.flags.get(key) & PRESENT)

    def __len__(self) -> int:
        return self.members

    def __contains__(self, key: object) -> bool:
        return bool(self.flags.get(key) & PRESENT)
