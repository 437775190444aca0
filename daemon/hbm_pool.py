"""The daemon's HBM tier: hot DRAM blocks copied up into per-namespace GPU arenas.

HBM here is an inclusive cache above DRAM, as a GPU pool in write-through
mode is: a block read ``promote_after_hits`` times is copied from its DRAM
slot into the namespace's arena on the HBM worker thread (pinned in DRAM
while the copy runs). Its HBM copy lives as long as its DRAM copy: when DRAM
evicts or deletes the block, the HBM copy goes with it. When the arena is
full the least recently read HBM copy of an unpinned block is dropped; its
DRAM copy stays, so demotion costs no copy. A client's pin (``acquire``)
covers both copies, so an HBM copy never changes under a reader.

Same-host clients get every segment's CUDA IPC handle in ``hello`` and, in
``acquire`` replies, an HBM descriptor next to the DRAM one for blocks whose
HBM copy is complete: they copy device to device.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvrack import _native
from kvrack import protocol as P
from kvrack.daemon.copy_worker import CopyWorker
from kvrack.daemon.index import COMMITTED, Entry, Namespace
from kvrack.tiers.hbm import HbmArena

if TYPE_CHECKING:
    from kvrack.daemon.store import Store

log = logging.getLogger("kvrack.hbm")


class HbmPool(CopyWorker):
    """Arenas by namespace and the copies into them (event-loop thread, plus one worker)."""

    name = "hbm"
    tier_id = int(P.TierId.HBM)

    def __init__(self, store: Store, namespaces: list[str], device: int, capacity: int, segment_bytes: int,
                 promote_after_hits: int) -> None:
        self.store = store
        self.device = device
        self.promote_after_hits = max(1, promote_after_hits)
        share = capacity // max(1, len(namespaces))
        if share < segment_bytes:
            raise ValueError(f"hbm.capacity_bytes gives each of {len(namespaces)} namespace(s) {share} bytes, "
                             f"less than one segment of hbm.segment_bytes = {segment_bytes}")
        self.arenas: dict[str, HbmArena] = {}
        try:
            for ns in namespaces:
                self.arenas[ns] = HbmArena(ns, device, share, segment_bytes)
        except BaseException:
            self.close()
            raise
        # per namespace: key -> (segment, slot), least recently read first; only complete copies
        self.copies: dict[str, OrderedDict[bytes, tuple[Any, int]]] = {ns: OrderedDict() for ns in namespaces}
        self.reads: dict[bytes, int] = {}  # reads so far of DRAM blocks not yet promoted
        self.in_flight: dict[bytes, Entry] = {}
        super().__init__("kvrack-hbm")
        self.promoted = 0
        self.promoted_bytes = 0
        self.dropped = 0  # HBM copies dropped to make room (their DRAM copies stay)
        self.skipped = 0  # no room: every HBM copy pinned, or a copy failed

    # ------------------------------------------------------------ promotion
    def acquired(self, entries: Sequence[Entry], local: bool) -> None:
        """Blocks a same-host client acquired (only those can read device memory): count the read, copy up
        those read often enough."""
        if local:
            self.read(entries)

    def read(self, entries: Sequence[Entry]) -> None:
        """Count each block's read; copy up those read often enough."""
        for e in entries:
            copies = self.copies.get(e.ns.name)
            if copies is None or e.seg is None:
                continue
            if e.key in copies:
                copies.move_to_end(e.key)
                continue
            if e.key in self.in_flight:
                continue
            n = self.reads.get(e.key, 0) + 1
            if n < self.promote_after_hits:
                self.reads[e.key] = n
                continue
            self.reads.pop(e.key, None)
            self._copy_up(e)

    def _copy_up(self, e: Entry) -> None:
        arena = self.arenas[e.ns.name]
        if self.loop is None or e.nbytes > arena.allocator.segment_bytes:
            return
        placement = self._room(e.ns.name, e.nbytes)
        if placement is None:
            self.skipped += 1
            return
        seg, slot = placement
        self.store.pin(e)  # the DRAM slot stays put until the copy is done
        self.in_flight[e.key] = e
        view = self.store.tier.view(e.seg, e.slot, e.nbytes)
        fut = self.worker.submit(self._upload, arena, seg, slot, view, e.nbytes)
        fut.add_done_callback(functools.partial(self._upload_done, e, seg, slot))

    def _room(self, namespace: str, nbytes: int) -> tuple[Any, int] | None:
        arena, copies = self.arenas[namespace], self.copies[namespace]
        while True:
            placement = arena.allocate(nbytes)
            if placement is not None:
                return placement
            victim = next((k for k in copies if self._unpinned(namespace, k)), None)
            if victim is None:
                return None
            self._drop(namespace, victim)
            self.dropped += 1

    def _unpinned(self, namespace: str, key: bytes) -> bool:
        e = self.store.namespaces[namespace].entries.get(key)
        return e is None or e.pins == 0

    @staticmethod
    def _upload(arena: HbmArena, seg: Any, slot: int, view: memoryview, nbytes: int) -> None:
        try:
            arena.upload(seg, slot, _native.address(view), nbytes)
        finally:
            view.release()

    def _upload_done(self, e: Entry, seg: Any, slot: int, fut: concurrent.futures.Future[None]) -> None:
        self._on_loop(self._uploaded, e, seg, slot, fut)  # on the worker: the rest runs on the event loop

    def _uploaded(self, e: Entry, seg: Any, slot: int, fut: concurrent.futures.Future[None]) -> None:
        self.in_flight.pop(e.key, None)
        self.store.unpin(e)
        arena = self.arenas[e.ns.name]
        exc = fut.exception()
        if exc is not None:
            log.error("hbm: copying a block of namespace %r up failed: %s", e.ns.name, exc)
            self.skipped += 1
            arena.free(seg, slot)
            return
        if e.state != COMMITTED or e.seg is None or e.ns.entries.get(e.key) is not e:
            arena.free(seg, slot)  # deleted or evicted meanwhile
            return
        self.copies[e.ns.name][e.key] = (seg, slot)
        self.promoted += 1
        self.promoted_bytes += e.nbytes
        if self.store.events is not None:
            self.store.events.stored(e, self.tier_id)

    # ------------------------------------------------------------- removal
    def dram_copy_freed(self, e: Entry) -> None:
        self.reads.pop(e.key, None)
        if e.ns.name in self.copies:
            self._drop(e.ns.name, e.key)

    def _drop(self, namespace: str, key: bytes) -> None:
        placement = self.copies[namespace].pop(key, None)
        if placement is not None:
            self.arenas[namespace].free(*placement)
            if self.store.events is not None:
                self.store.events.removed_key(namespace, key, self.tier_id)

    def has_copy(self, ns: Namespace, key: bytes) -> bool:
        return key in self.copies.get(ns.name, ())

    # ----------------------------------------------------------- serving
    def hbm_descriptors(self, ns: Namespace, keys: Sequence[bytes], dram: Sequence[P.Descriptor | None]
                        ) -> list[P.Descriptor | None] | None:
        """HBM descriptors of the acquired blocks that have a complete HBM copy (None for the rest)."""
        copies = self.copies.get(ns.name)
        if not copies:
            return [None] * len(keys)
        out: list[P.Descriptor | None] = []
        for key, d in zip(keys, dram):
            placement = copies.get(key) if d is not None else None
            if placement is None:
                out.append(None)
            else:
                seg, slot = placement
                out.append(P.Descriptor(int(P.TierId.HBM), seg.id, slot * seg.slot_size, d.length))  # type: ignore[union-attr]
        return out

    def hello(self, ns: Namespace, local: bool) -> tuple[dict[str, Any], int | None]:
        """A same-host client gets the arena's CUDA IPC handles (a remote one cannot use them)."""
        arena = self.arenas.get(ns.name)
        if arena is None or not local:
            return {}, None
        return {"hbm_segments": [P.HbmSegment(seg_id, size, self.device, handle)
                                 for seg_id, size, handle in arena.segments()]}, None

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        arenas = {ns: {**a.stats(), "blocks": len(self.copies[ns])}
                  for ns, a in self.arenas.items() if namespace in (None, ns)}
        return {"tier": "hbm", "tier_id": int(P.TierId.HBM), "present": True, "device": self.device,
                "promoted_blocks": self.promoted, "promoted_bytes": self.promoted_bytes,
                "dropped_blocks": self.dropped, "skipped_blocks": self.skipped, "copies_in_flight": len(self.in_flight),
                "blocks": sum(a["blocks"] for a in arenas.values()),
                "used_bytes": sum(a["used_bytes"] for a in arenas.values()),
                "capacity_bytes": sum(a["capacity_bytes"] for a in arenas.values()), "arenas": arenas}

    def moves(self) -> dict[str, dict[str, int]]:
        return {"dram_to_hbm": {"blocks": self.promoted, "bytes": self.promoted_bytes}}

    def close(self) -> None:
        self.stop_worker()
        for arena in self.arenas.values():
            arena.close()
        self.arenas.clear()


def absent_stats(reason: str) -> dict[str, Any]:
    """What ``stats`` shows for an HBM tier that is off or could not start."""
    return {"tier": "hbm", "tier_id": int(P.TierId.HBM), "present": False, "reason": reason}
