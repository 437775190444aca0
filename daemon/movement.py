"""How blocks move between DRAM and the tiers that keep copies of them: one interface, owned by the store.

Every copying tier (NVMe: write behind, demotion, promotion; CXL: a copy behind each commit that clients
read by themselves; HBM: hot blocks copied up for GPU readers) is a ``CopyingTier``. The store tells each
what happens to its blocks (committed, read, evicted from DRAM, deleted) and asks them for what the index
alone cannot answer (blocks only a copy still holds, room that copies in flight will free, what a client
needs at hello to read a tier itself). ``Movement`` is the store's list of them. Entry and allocator state
is touched on the event-loop thread only; each tier moves bytes on threads of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvrack import protocol as P
from kvrack.daemon.index import Entry, Namespace

if TYPE_CHECKING:
    from kvrack.daemon.session import Session
    from kvrack.daemon.store import KeysResult


class CopyingTier:
    """A tier holding copies of DRAM blocks. Every hook has a default that does nothing."""

    name = ""
    tier_id = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop is running: background work may start."""

    # ------------------------------------------------------- what happens to a block
    def committed(self, e: Entry) -> None:
        """``e`` was committed in DRAM (copy it behind, if this tier does)."""

    def demote(self, e: Entry) -> bool:
        """DRAM evicts ``e``: True when this tier takes a copy first (the store frees the DRAM copy once it
        is durable, ``store.drop_dram_copy``)."""
        return False

    def dram_copy_freed(self, e: Entry) -> None:
        """``e``'s DRAM copy is about to be freed (evicted, deleted, demoted)."""

    def deleted(self, e: Entry) -> None:
        """A client deleted ``e``."""

    def discard(self, e: Entry) -> None:
        """``e`` (deleted, unpinned at last) still has this tier's copy: drop it."""

    def acquired(self, entries: Sequence[Entry], local: bool) -> None:
        """Blocks a client pinned for reading (``local``: a same-host client, who can read device memory)."""

    # ------------------------------------------------- what the index alone cannot answer
    def holds(self, ns: Namespace, keys: Sequence[bytes]) -> list[bool] | None:
        """Which of ``keys`` (missing from the index) this tier still holds and serves as hits; None: none."""
        return None

    def forget(self, ns: Namespace, key: bytes) -> bool:
        """Delete a copy of a block the index does not know; whether there was one."""
        return False

    def has_copy(self, ns: Namespace, key: bytes) -> bool:
        """Whether this tier holds a copy of ``key`` (the admin API's block metadata)."""
        held = self.holds(ns, [key])
        return bool(held and held[0])

    def touch(self, ns: Namespace, keys: Sequence[bytes]) -> None:
        """Reads of this tier's blocks that clients served themselves."""

    def promotable(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes]:
        """Keys the index lacks that this tier can copy back into DRAM."""
        return []

    async def promote_keys(self, ns: Namespace, keys: list[bytes]) -> int:
        """Copy ``promotable`` blocks into DRAM as ordinary blocks; how many came up."""
        return 0

    async def promote(self, session: Session, keys: Sequence[bytes], res: KeysResult,
                      todo: list[tuple[int, Entry]]) -> list[int]:
        """Read the pinned entries of ``todo`` (only this tier holds them) into DRAM and fill in their
        descriptors; the positions that could not come up (their pins already released)."""
        return [i for i, _e in todo]

    def hbm_descriptors(self, ns: Namespace, keys: Sequence[bytes], dram: Sequence[P.Descriptor | None]
                        ) -> list[P.Descriptor | None] | None:
        """Device copies a same-host reader may use instead of the DRAM ones (HBM); None: none."""
        return None

    def hello(self, ns: Namespace, local: bool) -> tuple[dict[str, Any], int | None]:
        """Hello fields a client of ``ns`` needs to use this tier itself, and an fd to pass (Unix socket)."""
        return {}, None

    # ------------------------------------------------------------------ progress
    def pending(self) -> int:
        """Copies out of DRAM queued or running (their DRAM blocks are pinned until they finish)."""
        return 0

    async def wait_for_progress(self, timeout: float) -> bool:
        """Wait until one of them finishes; False when none is running."""
        return False

    async def flush(self, timeout: float) -> bool:
        """Wait (bounded) until nothing is pending; whether nothing is."""
        return not self.pending()

    def tick(self) -> None:
        """Periodic upkeep (the lease sweeper's cadence)."""

    # --------------------------------------------------------------------- views
    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        return {"tier": self.name, "tier_id": self.tier_id}

    def moves(self) -> dict[str, dict[str, int]]:
        """Blocks and bytes this tier moved, per direction (``dram_to_nvme``: ...)."""
        return {}

    def close(self) -> None:
        pass


class Movement:
    """The store's copying tiers, in order (NVMe, CXL, HBM), and what it asks of all of them."""

    def __init__(self) -> None:
        self.tiers: list[CopyingTier] = []
        # the tiers that do something on each event: the store's hot paths loop over these only
        self.on_commit: list[CopyingTier] = []
        self.on_dram_free: list[CopyingTier] = []
        self.on_delete: list[CopyingTier] = []
        self.on_read: list[CopyingTier] = []

    def add(self, tier: CopyingTier) -> None:
        self.tiers.append(tier)
        kind = type(tier)
        for hooks, methods in ((self.on_commit, ("committed",)), (self.on_dram_free, ("dram_copy_freed",)),
                               (self.on_delete, ("deleted",)), (self.on_read, ("acquired", "hbm_descriptors"))):
            if any(getattr(kind, m) is not getattr(CopyingTier, m) for m in methods):
                hooks.append(tier)

    def __iter__(self) -> Iterator[CopyingTier]:
        return iter(self.tiers)

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def copying(self) -> list[CopyingTier]:
        """Tiers whose copies out of DRAM are running (their blocks are pinned until they finish)."""
        return [t for t in self.tiers if t.pending()]

    async def wait_for_progress(self, timeout: float) -> list[CopyingTier]:
        """Wait until a copy of any tier finishes (bounded); the tiers that were copying."""
        copiers = self.copying()
        if copiers:
            waits = [asyncio.ensure_future(c.wait_for_progress(timeout)) for c in copiers]
            _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        return copiers

    def holds(self, ns: Namespace, keys: Sequence[bytes]) -> tuple[list[bool], int] | None:
        """Which keys some tier still serves (missing from the index), and that tier's id; None: none."""
        for t in self.tiers:
            held = t.holds(ns, keys)
            if held is not None:
                return held, t.tier_id
        return None

    def promotable(self, ns: Namespace, keys: Sequence[bytes]) -> list[tuple[CopyingTier, list[bytes]]]:
        out = []
        for t in self.tiers:
            todo = t.promotable(ns, keys)
            if todo:
                out.append((t, todo))
        return out

    def forget(self, ns: Namespace, key: bytes) -> bool:
        return any([t.forget(ns, key) for t in self.tiers])

    def hello(self, ns: Namespace, local: bool) -> tuple[dict[str, Any], list[int]]:
        fields: dict[str, Any] = {}
        fds: list[int] = []
        for t in self.tiers:
            more, fd = t.hello(ns, local)
            fields.update(more)
            if fd is not None:
                fds.append(fd)
        return fields, fds

    def moves(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tiers:
            out.update(t.moves())
        return out

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for t in self.tiers:
            t.start(loop)

    def tick(self) -> None:
        for t in self.tiers:
            t.tick()

    def close(self) -> None:
        for t in reversed(self.tiers):
            t.close()
