"""The daemon's CXL tier: one region per namespace, filled behind every commit.

The daemon is the region's allocating and evicting host: it copies each
committed block from DRAM into its namespace's region (pinned in DRAM while
the copy runs, on one worker thread so copies and deletions stay in commit
order), evicts in the region when it is full, deletes there what clients
delete, beats its host line and reclaims what dead hosts left half-written.
Clients read the region themselves: the Unix socket hands them its fd at
hello; hosts on the same CXL fabric open the path. Nobody asks the daemon to
read a block that is in CXL.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvrack.daemon.copy_worker import CopyWorker
from kvrack.daemon.cxl_order import RegionOrder
from kvrack.daemon.index import COMMITTED, Entry, Namespace
from kvrack.daemon.progress import ProgressSignal
from kvrack.protocol import TierId
from kvrack.tiers.cxl import CxlFull, CxlRegion

if TYPE_CHECKING:
    from kvrack.daemon.store import Store

log = logging.getLogger("kvrack.cxl")
_RECLAIM_EVERY_S = 10.0


def region_paths(namespaces: Sequence[str], directory: str, paths: Sequence[str]) -> dict[str, str]:
    """Each namespace's region: its ``NAMESPACE=PATH`` entry of ``cxl.paths``, else ``DIR/kvrack-cxl-NAMESPACE``."""
    named: dict[str, str] = {}
    for item in paths:
        ns, sep, path = item.partition("=")
        if not sep or not ns.strip() or not path.strip():
            raise ValueError(f"cxl.paths: expected NAMESPACE=PATH, got {item!r}")
        if ns.strip() not in namespaces:
            raise ValueError(f"cxl.paths: no namespace {ns.strip()!r} is configured")
        named[ns.strip()] = path.strip()
    return {ns: named.get(ns) or os.path.join(directory, f"kvrack-cxl-{ns}") for ns in namespaces}


class CxlPool(CopyWorker):
    """Regions by namespace, and the copies into them (event-loop thread, plus one worker)."""

    name = "cxl"
    tier_id = int(TierId.CXL)

    def __init__(self, store: Store, paths: dict[str, str], capacity: int, chunk_bytes: int, coherent: bool,
                 host_timeout_s: float, policy: str = "lru") -> None:
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.coherent = coherent
        self.host_timeout_ms = int(host_timeout_s * 1000)
        self.regions: dict[str, CxlRegion] = {}
        self.orders: dict[str, RegionOrder] = {}
        self.copying: dict[str, int] = {}  # copies submitted and not landed, by namespace: room they will take
        try:
            for ns, path in paths.items():
                region = CxlRegion.create(path, capacity, chunk_bytes, ns, coherent=coherent)
                self.regions[ns] = region
                region.register_host()
                reaped = region.reclaim(self.host_timeout_ms)
                if reaped:
                    log.info("cxl: %s: reclaimed what %d dead host(s) left", path, reaped)
                order = self.orders[ns] = RegionOrder(policy, region.g.nchunks)
                self.copying[ns] = 0
                for key in region.ready_keys():  # kept over a restart: parents unknown
                    order.add(key)
        except BaseException:
            self.close()
            raise
        super().__init__("kvrack-cxl")
        self.copied = 0
        self.copied_bytes = 0
        self.skipped = 0  # larger than a chunk, or the region had no room
        self.promoted = 0  # blocks copied back up into DRAM for clients that cannot read the region
        self.promoted_bytes = 0
        self.in_flight = 0
        self._next_reclaim = time.monotonic() + _RECLAIM_EVERY_S
        self._progress = ProgressSignal()  # fired when a copy finishes

    # ------------------------------------------------------------- copies
    def committed(self, e: Entry) -> None:
        """Copy a freshly committed block into its namespace's region, behind the commit."""
        region = self.regions.get(e.ns.name)
        if region is None or self.loop is None or e.seg is None:
            return
        if e.nbytes > self.chunk_bytes:
            self.skipped += 1
            return
        order = self.orders[e.ns.name]
        if e.key in order and region.size_of(e.key) is not None:  # stored again: the region has it
            order.touch((e.key,))
            return
        self._make_room(e.ns.name, region)
        self.store.pin(e)  # the DRAM slot stays put until the copy is done
        self.in_flight += 1
        self.copying[e.ns.name] += 1
        view = self.store.tier.view(e.seg, e.slot, e.nbytes)
        fut = self.worker.submit(self._copy, region, e.key, view)
        fut.add_done_callback(functools.partial(self._on_loop, self._copied, e))

    def _copy(self, region: CxlRegion, key: bytes, view: memoryview) -> bool:
        try:
            return region.put(key, view)
        except CxlFull:
            return False
        finally:
            view.release()

    def _make_room(self, namespace: str, region: CxlRegion) -> None:
        """Delete the order's victims (on the worker, ahead of the copy) until the copy has a free chunk,
        so the region's own clock never has to choose."""
        order = self.orders[namespace]
        while len(order) + self.copying[namespace] >= order.capacity:
            victim = order.evict()
            if victim is None:
                break
            self.worker.submit(region.delete, victim)
            if self.store.events is not None:
                self.store.events.removed_key(namespace, victim, self.tier_id)

    def _copied(self, e: Entry, fut: concurrent.futures.Future[bool]) -> None:
        self.in_flight -= 1
        self.copying[e.ns.name] -= 1
        self.store.unpin(e)
        self._progress.fire()
        exc = fut.exception()
        if exc is not None:
            log.error("cxl: copying a block of namespace %r failed: %s", e.ns.name, exc)
            self.skipped += 1
            return
        if fut.result():
            self.copied += 1
            self.copied_bytes += e.nbytes
            if self.store.events is not None:
                self.store.events.stored(e, self.tier_id)
        region, order = self.regions.get(e.ns.name), self.orders.get(e.ns.name)
        if region is not None and order is not None and (fut.result() or region.size_of(e.key) is not None):
            order.add(e.key, e.parent)  # stored now, or already there
        if e.state != COMMITTED:  # deleted while it was being copied: take the copy back out
            self.deleted(e)

    def deleted(self, e: Entry) -> None:
        # now, so no reader finds it after the client's delete returns; a copy still in flight is
        # taken back out by _copied, which sees the entry is no longer committed
        self.delete(e.ns.name, e.key)

    def forget(self, ns: Namespace, key: bytes) -> bool:
        """A block that left DRAM (and NVMe) may still be in the region: a delete removes it there too."""
        return self.delete(ns.name, key)

    def delete(self, namespace: str, key: bytes) -> bool:
        """Remove a block from the namespace's region (e.g. one DRAM no longer holds); whether it was there."""
        region = self.regions.get(namespace)
        if region is None:
            return False
        self.orders[namespace].remove(key)
        gone = bool(region.delete(key))
        if gone and self.store.events is not None:
            self.store.events.removed_key(namespace, key, self.tier_id)
        return gone

    def touch(self, ns: Namespace, keys: Sequence[bytes]) -> None:
        """Reads of region blocks that clients served themselves from the mapping (or the daemon copied
        back up): the eviction order sees them as hits."""
        order = self.orders.get(ns.name)
        if order is not None:
            order.touch(keys)

    def pending(self) -> int:
        return self.in_flight

    async def wait_for_progress(self, timeout: float) -> bool:
        """Wait until a copy finishes (its DRAM block becomes evictable again); False if none is running."""
        if not self.in_flight or self.loop is None:
            return False
        return await self._progress.wait(self.loop, timeout)

    # ------------------------------------------------- serving from CXL
    def holds(self, ns: Namespace, keys: Sequence[bytes]) -> list[bool] | None:
        """Which keys the namespace's region holds (its shared index, no copy): hits in ``lookup``."""
        region = self.regions.get(ns.name)
        if region is None:
            return None
        if not keys:
            return []
        _leading, slots = region.lookup(list(keys))
        return [int(s) >= 0 for s in slots]

    def promotable(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes]:
        """The keys the daemon's index lacks but the namespace's region holds."""
        absent = [k for k in keys if k not in ns.entries and len(k) == 32]
        return [k for k, held in zip(absent, self.holds(ns, absent) or ()) if held]

    async def promote_keys(self, ns: Namespace, keys: list[bytes]) -> int:
        """Copy blocks that only the region holds back into DRAM, for clients that cannot map it
        (remote hosts off the fabric, the TCP byte stream, zero-copy leases): they become ordinary
        DRAM blocks. Slots are taken on the event loop, the copies run on the worker. Returns how
        many came up."""
        region = self.regions.get(ns.name)
        store = self.store
        if region is None or self.loop is None:
            return 0
        todo: list[tuple[bytes, Any, int, int]] = []
        coming = 0  # bytes of this batch's blocks: they count toward the quota once adopted
        for key in dict.fromkeys(keys):
            nbytes = region.size_of(key)
            if nbytes is None:
                continue
            coming += nbytes
            if ns.quota and ns.over_quota("dram", coming, len(todo) + 1):
                store.shed(ns, coming, len(todo) + 1)  # room among its own blocks, as a read from NVMe makes it
            placement = store.make_room(ns.name, nbytes)
            if placement is None:
                break
            todo.append((key, placement[0], placement[1], nbytes))
        if not todo:
            return 0
        views = [store.tier.view(seg, slot, n) for _k, seg, slot, n in todo]

        def copy_all() -> list[int | None]:
            try:
                return [region.read(key, view) for (key, _s, _l, _n), view in zip(todo, views)]
            finally:
                for view in views:
                    view.release()

        got = await self.loop.run_in_executor(self.worker, copy_all)
        up = 0
        for (key, seg, slot, nbytes), n in zip(todo, got):
            if n != nbytes or key in ns.entries:  # evicted or replaced meanwhile, or stored again by a client
                store.tier.free(seg, slot)
                continue
            store.adopt_block(ns, key, seg, slot, nbytes)
            self.orders[ns.name].touch((key,))
            self.promoted += 1
            self.promoted_bytes += nbytes
            up += 1
        return up

    # ----------------------------------------------------------- upkeep
    def tick(self) -> None:
        """Beat every host line; now and then reclaim what dead writer hosts left (on the worker)."""
        for region in self.regions.values():
            region.heartbeat()
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + _RECLAIM_EVERY_S
            for region in self.regions.values():
                self.worker.submit(region.reclaim, self.host_timeout_ms)

    def hello(self, ns: Namespace, local: bool) -> tuple[dict[str, Any], int | None]:
        """The namespace's region for ``hello``: its path and size, and (Unix socket) its fd; hosts on the
        same CXL fabric open it by its path."""
        region = self.regions.get(ns.name)
        if region is None:
            return {}, None
        fields = {"cxl_path": region.path, "cxl_bytes": region.g.region_bytes, "cxl_coherent": self.coherent}
        return fields, region.fd if local else None

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """The tier's figures; with ``namespace``, its region only (what a client of it may see)."""
        regions = {ns: {**r.stats(), **self.orders[ns].stats()} for ns, r in self.regions.items()
                   if namespace in (None, ns)}
        return {"tier": "cxl", "tier_id": 2, "coherent": self.coherent, "copied_blocks": self.copied,
                "policy_evictions": sum(r["policy_evictions"] for r in regions.values()),
                "promoted_blocks": self.promoted, "promoted_bytes": self.promoted_bytes,
                "copied_bytes": self.copied_bytes, "skipped_blocks": self.skipped, "copies_in_flight": self.in_flight,
                "blocks": sum(r["blocks"] for r in regions.values()),
                "used_bytes": sum(r["bytes"] for r in regions.values()),
                "capacity_bytes": sum(r["capacity"] for r in regions.values()), "regions": regions}

    def moves(self) -> dict[str, dict[str, int]]:
        return {"dram_to_cxl": {"blocks": self.copied, "bytes": self.copied_bytes},
                "cxl_to_dram": {"blocks": self.promoted, "bytes": self.promoted_bytes}}

    def close(self) -> None:
        self.stop_worker()
        for region in self.regions.values():
            region.close()
        self.regions.clear()
