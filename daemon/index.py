"""The block index: key -> small slotted entry, per namespace, plus an intrusive LRU.

An entry is in the LRU list exactly when it is committed and unpinned, so the
eviction candidate is always the list head: O(1), no scan past pinned blocks.
The index knows nothing of bytes; ``seg``/``slot`` only name where they are.

A block can have two copies: one in the memory tier clients map (``seg``/``slot``,
``seg`` None when it is only on NVMe) and one on the NVMe tier
(``nseg``/``nslot``, set once that copy is durable and indexed).
"""

from __future__ import annotations

import hmac
from typing import Any

from kvrack.daemon.policies.base import always

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
        self.nflags = 0  # the NVMe tier's CLOCK bits (mover.NVME_QUEUED, mover.NVME_REFERENCED)
        # children with a DRAM copy: None, the one child (chains are mostly linear), or a set of them
        self.kids: Entry | set[Entry] | None = None

    def add_kid(self, kid: Entry) -> None:
        kids = self.kids
        if kids is None:
            self.kids = kid
        elif isinstance(kids, set):
            kids.add(kid)
        elif kids is not kid:
            self.kids = {kids, kid}

    def drop_kid(self, kid: Entry) -> None:
        kids = self.kids
        if kids is kid:
            self.kids = None
        elif isinstance(kids, set):
            kids.discard(kid)
            if len(kids) == 1:
                self.kids = next(iter(kids))
            elif not kids:
                self.kids = None

    def each_kid(self) -> tuple[Entry, ...] | set[Entry]:
        kids = self.kids
        return () if kids is None else kids if isinstance(kids, set) else (kids,)

    @property
    def offset(self) -> int:
        return self.slot * self.seg.slot_size


class LruList:
    """Doubly linked list threaded through the entries, with one sentinel: no edge cases."""

    __slots__ = ("root", "size")

    def __init__(self) -> None:
        root = Entry.__new__(Entry)
        root.prev = root.next = root
        self.root = root
        self.size = 0

    def push_mru(self, e: Entry) -> None:
        root = self.root
        last = root.prev
        e.prev = last
        e.next = root
        last.next = e  # type: ignore[union-attr]
        root.prev = e
        self.size += 1

    def unlink(self, e: Entry) -> None:
        e.prev.next = e.next  # type: ignore[union-attr]
        e.next.prev = e.prev  # type: ignore[union-attr]
        e.prev = e.next = None
        self.size -= 1

    def touch(self, e: Entry) -> None:
        self.unlink(e)
        self.push_mru(e)

    def lru(self) -> Entry | None:
        e = self.root.next
        return None if e is self.root else e

    def __iter__(self):  # oldest first; for tests and debugging
        e = self.root.next
        while e is not self.root:
            yield e
            e = e.next


class PolicyOrder:
    """``LruList``'s interface over a named eviction policy (``kvrack.daemon.policies``).

    Same invariant: an entry is a member exactly when it is committed, unpinned
    and has a DRAM copy; membership is marked in ``prev`` (the store's test).
    A pin takes the entry out and the unpin puts it back, which the policy
    sees as a removal and a fresh insert: policies with a ghost memory
    (``chain``) count that as reuse.
    """

    __slots__ = ("policy", "_mark")

    def __init__(self, name: str, capacity_blocks: int) -> None:
        from kvrack.daemon.policies import make_policy

        self.policy = make_policy(name, max(1, capacity_blocks))
        self._mark = Entry.__new__(Entry)

    @property
    def size(self) -> int:
        return len(self.policy)

    def push_mru(self, e: Entry) -> None:
        e.prev = self._mark
        self.policy.insert(e)

    def unlink(self, e: Entry) -> None:
        e.prev = None
        self.policy.remove(e)

    def touch(self, e: Entry) -> None:
        self.policy.hit(e)

    def lru(self) -> Entry | None:
        return self.policy.victim(always)  # type: ignore[return-value]

    def __iter__(self):  # members, nearest eviction first; a snapshot, so callers may unlink while walking
        yield from list(self.policy)


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
