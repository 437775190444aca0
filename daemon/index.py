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
HIT_SHIFT = 3  # Entry.nflags: CLOCK bits below, the hit count above
HIT = 1 << HIT_SHIFT
CLOCK_BITS = HIT - 1


class Entry:
    """One block. ~144 bytes with its GC header (14 slots); the key's bytes object is shared with the index dict."""

    __slots__ = ("key", "ns", "seg", "slot", "nbytes", "state", "pins", "prev", "next", "parent", "nseg", "nslot",
                 "nflags", "kids")

    def __init__(self, key: bytes, ns: Namespace, seg: Any, slot: int, nbytes: int, parent: bytes | None) -> None:
        self.key = key
        self.ns = ns
        self.seg = seg
        self.slot = slot
        self.nbytes = nbytes
        self.state = RESERVED
        self.pins = 0
        self.prev: Entry | None = None
        self.next: Entry | None = None
        self.parent = parent
        self.nseg: Any = None  # NVMe copy, once durable
        self.nslot = 0
        # low 3 bits: the NVMe tier's CLOCK bits (kvrack.daemon.policies.clock, EntryFlags); above them, how many
        # times the block was acquired (HIT): no memory of its own until 31 hits (ints below 256 are shared)
        self.nflags = 0
        # children with a DRAM copy, kept by kvrack.daemon.policies.chains.EntryChains
        self.kids: Any = None

    @property
    def hits(self) -> int:
        """How many times it was acquired (kept above the CLOCK bits of ``nflags``)."""
        return int(self.nflags) >> HIT_SHIFT

    @property
    def offset(self) -> int:
        return self.slot * self.seg.slot_size


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
