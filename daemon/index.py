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


class Entry:
    """One block. ~100 bytes; the key's bytes object is shared with the index dict."""

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
        self.nflags = 0  # the NVMe tier's CLOCK bits (kvrack.daemon.policies.clock, EntryFlags)
        # children with a DRAM copy, kept by kvrack.daemon.policies.chains.EntryChains
        self.kids: Any = None

    @property
    def offset(self) -> int:
        return self.slot * self.seg.slot_size


class Namespace:
    """A tenant's isolated key space and its counters."""

    __slots__ = ("name", "salt", "uids", "gids", "entries", "blocks", "bytes", "_token")

    def __init__(self, name: str, salt: bytes, uids: tuple[int, ...] = (), gids: tuple[int, ...] = (),
                 token: str = "") -> None:
        self.name = name
        self.salt = salt
        self.uids = uids
        self.gids = gids
        self._token = token.encode()
        self.entries: dict[bytes, Entry] = {}
        self.blocks = 0  # committed
        self.bytes = 0  # committed

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
