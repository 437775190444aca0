"""The block index: key -> small slotted entry, per namespace.

An entry is in its tier's eviction order (``kvrack.daemon.order``) exactly when it is committed, unpinned
and has a DRAM copy. The index knows nothing of bytes; ``seg``/``slot`` only name where they are.

A block can have two copies: one in the memory tier clients map (``seg``/``slot``,
``seg`` None when it is only on NVMe) and one on the NVMe tier
(``nseg``/``nslot``, set once that copy is durable and indexed).
"""

from __future__ import annotations

import hmac
from typing import Any

RESERVED = 1
COMMITTED = 2
DELETED = 3  # removed from the index, bytes kept until the last pin ends

# Entry.loc: the block's size above SLOT_BITS, its slot in the memory tier below
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1
# Entry.nflags: the NVMe tier's CLOCK bits (3), the hit count (21 bits, saturating), the NVMe slot above
HIT_SHIFT = 3
HIT = 1 << HIT_SHIFT
CLOCK_BITS = HIT - 1
HITS_MASK = ((1 << 21) - 1) << HIT_SHIFT
NSLOT_SHIFT = 24
NFLAGS_LOW = (1 << NSLOT_SHIFT) - 1


class Entry:
    """One block. 128 bytes with its GC header (12 slots); the key's bytes object is shared with the index dict.

    Two pairs of numbers share an int each, so an entry costs a 128-byte object, not 144, and one int beside
    it: ``loc`` holds the size and the memory slot (the size alone is an interned int shared by every block of
    that size), ``nflags`` the CLOCK bits, the hit count and the NVMe slot (a small int, shared, until the
    block has an NVMe copy or 32 hits)."""

    __slots__ = ("key", "ns", "seg", "loc", "state", "pins", "prev", "next", "parent", "nseg", "nflags", "kids")

    def __init__(self, key: bytes, ns: Namespace, seg: Any, slot: int, nbytes: int, parent: bytes | None) -> None:
        self.key = key
        self.ns = ns
        self.seg = seg
        self.loc = nbytes << SLOT_BITS | _memory_slot(slot)
        self.state = RESERVED
        self.pins = 0
        self.prev: Entry | None = None
        self.next: Entry | None = None
        self.parent = parent
        self.nseg: Any = None  # NVMe copy, once durable (its slot: ``nslot``)
        self.nflags = 0  # CLOCK bits (kvrack.daemon.policies.clock, EntryFlags), hits, NVMe slot
        # children with a DRAM copy, kept by kvrack.daemon.policies.chains.EntryChains
        self.kids: Any = None

    @property
    def slot(self) -> int:
        """The block's slot in its memory-tier segment ``seg``."""
        return self.loc & SLOT_MASK

    @slot.setter
    def slot(self, slot: int) -> None:
        self.loc = (self.loc & ~SLOT_MASK) | _memory_slot(slot)

    @property
    def nbytes(self) -> int:
        return self.loc >> SLOT_BITS

    @property
    def nslot(self) -> int:
        """The slot of the NVMe copy in ``nseg``."""
        return self.nflags >> NSLOT_SHIFT

    @nslot.setter
    def nslot(self, slot: int) -> None:
        if slot < 0:
            raise ValueError(f"slot {slot} out of range")
        self.nflags = (self.nflags & NFLAGS_LOW) | slot << NSLOT_SHIFT

    @property
    def hits(self) -> int:
        """How many times it was acquired (saturating at 2,097,151)."""
        return (int(self.nflags) & HITS_MASK) >> HIT_SHIFT

    def count_hit(self) -> None:
        if self.nflags & HITS_MASK != HITS_MASK:
            self.nflags += HIT

    @property
    def offset(self) -> int:
        return self.slot * self.seg.slot_size


def _memory_slot(slot: int) -> int:
    """``slot``, checked to fit below ``loc``'s size bits."""
    if not 0 <= slot <= SLOT_MASK:
        raise ValueError(f"slot {slot} out of range")
    return slot


class Namespace:
    """A tenant's isolated key space, its eviction order in DRAM, its use of each tier and its quotas."""

    __slots__ = ("name", "salt", "uids", "gids", "entries", "blocks", "bytes", "_token", "order", "leaf",
                 "dram_blocks", "dram_bytes", "nvme_blocks", "nvme_bytes", "quota", "lookup_keys", "lookup_hits",
                 "reserved_blocks", "reserved_bytes")

    def __init__(self, name: str, salt: bytes, uids: tuple[int, ...] = (), gids: tuple[int, ...] = (),
                 token: str = "", quota: dict[str, int] | None = None) -> None:
        self.name = name
        self.salt = salt
        self.uids = uids
        self.gids = gids
        self._token = token.encode()
        self.entries: dict[bytes, Entry] = {}
        self.blocks = 0  # committed
        self.bytes = 0  # committed
        self.order: Any = None  # its DRAM eviction order (kvrack.daemon.order)
        self.leaf: Any = None  # its leaf-first descent (kvrack.daemon.policies.base.LeafFirst)
        self.dram_blocks = 0
        self.dram_bytes = 0
        self.nvme_blocks = 0
        self.nvme_bytes = 0
        self.lookup_keys = 0
        self.lookup_hits = 0
        self.reserved_blocks = 0  # DRAM slots taken by blocks being written (they count toward the DRAM quota)
        self.reserved_bytes = 0
        # limits by QUOTA_FIELDS name ("dram_bytes", "dram_blocks", "nvme_bytes", "nvme_blocks"); absent = none
        self.quota: dict[str, int] = dict(quota or {})

    def allows(self, uid: int, gids: set[int]) -> bool:
        """Whether a peer with these credentials may use the namespace."""
        if not self.uids and not self.gids:
            return True
        return uid in self.uids or bool(gids.intersection(self.gids))

    @property
    def remote(self) -> bool:
        """Whether TCP clients may use it (it has a token)."""
        return bool(self._token)

    def accepts_token(self, token: str) -> bool:
        """Constant-time check of a TCP client's token; a namespace without one accepts none."""
        return bool(self._token) and hmac.compare_digest(self._token, token.encode())

    def over_quota(self, tier: str, nbytes: int = 0, blocks: int = 0) -> int:
        """By how much (bytes, or blocks when only a block quota is passed) the namespace would be over its
        quota on ``tier`` ("dram" or "nvme") with ``nbytes`` in ``blocks`` more; 0 when within it."""
        quota = self.quota
        if not quota:
            return 0
        over = 0
        held_bytes, held_blocks = getattr(self, f"{tier}_bytes"), getattr(self, f"{tier}_blocks")
        if tier == "dram":  # slots being written are DRAM the namespace holds
            held_bytes += self.reserved_bytes
            held_blocks += self.reserved_blocks
        limit = quota.get(f"{tier}_bytes")
        if limit is not None:
            over = max(over, held_bytes + nbytes - limit)
        limit = quota.get(f"{tier}_blocks")
        if limit is not None and held_blocks + blocks > limit:
            over = max(over, 1)
        return over
