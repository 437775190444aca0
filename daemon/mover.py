"""Moves block copies between the DRAM tier and the NVMe tier, off the event loop.

* Write-through: every committed DRAM block is queued and written to NVMe in
  batches (one fdatasync and one index commit per batch). The block is held,
  like a pin, until its NVMe copy is durable, so its DRAM bytes cannot be
  reused under the write.
* Promotion: a get of a block whose only copy is on NVMe reads it (checksum
  verified) into a fresh DRAM slot of the block's namespace; the client then
  maps it like any other block. Why not let the client read the file range
  itself: the files hold every tenant's blocks, so handing out their fds would
  break isolation, and the DRAM copy serves the next reader at memory speed.
  The extra memcpy (~8 GB/s) is cheaper than the NVMe read it follows.
* Removal: an NVMe copy is unindexed durably before its slot may be reused.

Entry and allocator state is touched on the event-loop thread only; threads
move bytes and talk to LMDB. Index mutations and write batches run on one
thread in submission order, and one batch is in flight at a time, so a delete
followed by a re-put of the same key never unindexes the new copy.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvrack.daemon.counters import NvmeCounters
from kvrack.daemon.index import COMMITTED, Entry
from kvrack.daemon.movement import CopyingTier
from kvrack.daemon.mover_retries import Retries
from kvrack.daemon.policies import EvictionPolicy, make_policy
from kvrack.daemon.policies.clock import EntryFlags
from kvrack.daemon.progress import ProgressSignal
from kvrack.daemon.session import Session
from kvrack.protocol import ErrorCode, TierId
from kvrack.tiers.base import Segment
from kvrack.tiers.nvme import NvmeTier, Record, Recovery

if TYPE_CHECKING:
    from kvrack.daemon.store import KeysResult, Store

log = logging.getLogger("kvrack.mover")
# blocks per write batch, whatever their size: bounds the batch's transient memory and its latency
MAX_BATCH_BLOCKS = 4096


def _unpinned(e: Any) -> bool:
    return not e.pins


class Mover(Retries, CopyingTier):
    """Owns the NVMe tier's copies: write-through, demotion, promotion, removal, NVMe eviction."""

    name = "nvme"
    tier_id = int(TierId.NVME)

    def __init__(self, store: Store, nvme: NvmeTier, write_batch_bytes: int = 64 << 20,
                 retry_s: float = 30.0, policy: str = "clock", typical_block_bytes: int = 2 << 20,
                 keep_unpersisted: bool = True) -> None:
        self.store = store
        self.nvme = nvme
        self.dram = store.tier
        self.write_batch_bytes = write_batch_bytes
        self.retry_s = retry_s
        self.loop: asyncio.AbstractEventLoop | None = None
        # one thread, FIFO: index deletes and write batches keep their order
        self.ordered = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvrack-mover")
        self.queue: collections.deque[Entry] = collections.deque()
        self.in_flight = 0  # blocks in the batch being written
        # NVMe eviction order over durable copies (nvme.policy): CLOCK by default, whose bits live in the
        # entries (8 bytes a block for its ring), or a named policy and its per-block bookkeeping
        capacity = max(1, nvme.capacity // max(1, typical_block_bytes))
        self.order: EvictionPolicy = make_policy(policy, capacity, flags=EntryFlags()) if policy == "clock" \
            else make_policy(policy, capacity)
        self.promoting: dict[Entry, asyncio.Future[str | None]] = {}
        self.writing = False
        self._unindex: list[tuple[Entry, Segment, int]] = []
        self._retry_at = 0.0
        self.keep_unpersisted = keep_unpersisted
        # written-through blocks without their NVMe copy (a failed write, a degraded tier), pinned by the mover
        # until a retry writes them (nvme.keep_unpersisted); an ordered set
        self.unpersisted: dict[Entry, None] = {}
        self.probing = False
        self.blocks = 0
        self.bytes = 0
        self.recovery: Recovery | None = None
        self.orphans = 0
        self.counters = NvmeCounters()
        self.closed = False
        self._progress = ProgressSignal()  # fired when a write batch finishes
        self.demoting: set[Entry] = set()  # queued because DRAM evicts them (write-back admission)
        self.demoting_bytes = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._kick()  # blocks queued before the loop ran (re-adopted DRAM blocks without an NVMe copy)

    # ------------------------------------------------------------- recovery
    def adopt(self, recovery: Recovery, blocks: list[tuple[str, bytes, Segment, int, Record]]) -> None:
        """Index entries for every block the NVMe tier recovered, oldest first in its LRU."""
        self.recovery = recovery
        store = self.store
        blocks.sort(key=lambda b: b[4].created)
        for ns_name, key, seg, slot, rec in blocks:
            ns = store.namespaces.get(ns_name)
            if ns is None:  # its namespace is no longer configured: keep the bytes, serve nothing
                self.orphans += 1
                continue
            e = Entry(key, ns, None, 0, store.intern_size(rec.length), None)
            e.state = COMMITTED
            e.nseg = seg
            e.nslot = slot
            ns.entries[key] = e
            ns.blocks += 1
            ns.bytes += rec.length
            self._track(e)
            if store.events is not None:  # recovered: announced after the start's AllBlocksCleared
                store.events.stored(e, self.tier_id)
            self.blocks += 1
            self.bytes += rec.length
            ns.nvme_blocks += 1
            ns.nvme_bytes += rec.length
        if self.orphans:
            log.warning("nvme: %d recovered block(s) belong to namespaces no longer configured; they stay on disk, "
                        "unserved, until the namespace is configured again", self.orphans)

    # ---------------------------------------------------------- write-through
    def enqueue(self, e: Entry) -> bool:
        """Queue a freshly committed block for its NVMe copy (True), or keep it pinned in DRAM for the retry while
        the tier is degraded (True); False when it stays DRAM-only and evictable (too large for the tier, the tier
        closing, or nvme.keep_unpersisted off)."""
        if self.closed or e.nbytes > self.nvme.max_block_bytes:
            self.counters.not_persisted += 1
            return False
        self.store.pin(e)
        if self.nvme.degraded is not None and time.monotonic() < self._retry_at:
            return self._hold(e)
        self.queue.append(e)
        self._kick()
        return True

    def demote(self, e: Entry) -> bool:
        """Write a block DRAM is evicting (admission said it is worth it); its DRAM copy goes once the
        write is durable. False when the NVMe tier cannot take it now."""
        if not self.enqueue(e):
            return False
        self.demoting.add(e)
        self.demoting_bytes += e.nbytes
        return True

    def _undemote(self, e: Entry) -> bool:
        if e not in self.demoting:
            return False
        self.demoting.discard(e)
        self.demoting_bytes -= e.nbytes
        return True

    def _kick(self) -> None:
        if not self.writing and (self.queue or self._unindex) and self.loop is not None:
            self.writing = True
            self.loop.call_soon(self._write_next)  # one batch per loop turn: a commit of many keys is one batch

    def _write_next(self) -> None:
        store = self.store
        batch: list[tuple[Entry, Segment, int]] = []
        unindex: list[tuple[str, bytes]] = []
        freed: list[tuple[Segment, int]] = []
        self._take_unindex(unindex, freed)
        nbytes = 0
        while self.queue and len(batch) < MAX_BATCH_BLOCKS and (
                not batch or nbytes + self.queue[0].nbytes <= self.write_batch_bytes):
            e = self.queue.popleft()
            if e.state != COMMITTED or e.seg is None:  # deleted while queued
                self._undemote(e)
                store.unpin(e)
                continue
            placement = self._place(e, unindex)
            if placement is None:  # no NVMe room (its blocks pinned): a written-through block is kept for a retry
                if self._undemote(e):
                    self.counters.not_persisted += 1
                    store.unpin(e)
                else:
                    self._retry_at = time.monotonic() + self.retry_s
                    self._hold(e)
                continue
            batch.append((e, placement[0], placement[1]))
            nbytes += e.nbytes
        if not batch and not unindex:  # every queued block was deleted or found no slot
            self._batch_done()
            return
        items = [(e.ns.name, e.key, seg, slot, self.dram.view(e.seg, e.slot, e.nbytes)) for e, seg, slot in batch]
        self.in_flight = len(batch)
        fut = asyncio.wrap_future(self.ordered.submit(self._write_job, unindex, items), loop=self.loop)
        fut.add_done_callback(lambda f: self._written(batch, freed, f))

    def _write_job(self, unindex: list[tuple[str, bytes]], items: list[Any]) -> list[Exception | None]:
        """On the ordered thread: unindex what this batch overwrites (durably), then write."""
        if unindex:
            self.nvme.remove(unindex)
        return self.nvme.write(items)  # type: ignore[return-value]

    def _written(self, batch: list[tuple[Entry, Segment, int]], freed: list[tuple[Segment, int]],
                 fut: asyncio.Future[list[Exception | None]]) -> None:
        self.in_flight = 0
        try:
            results = fut.result()
            for seg, slot in freed:  # removed records are durable: their slots may be reused now
                self.nvme.free(seg, slot)
        except Exception as exc:  # the unindex step failed: nothing was written, no freed slot is safe to reuse
            log.error("nvme: write batch failed before writing: %s", exc)
            self.nvme.degraded = f"index update failed: {exc}"
            results = [exc] * len(batch)
        failed = 0
        events = self.store.events
        for (e, seg, slot), err in zip(batch, results):
            if err is None:
                e.nseg = seg
                e.nslot = slot
                if events is not None:
                    events.stored(e, self.tier_id)
                self._track(e)
                self.blocks += 1
                self.bytes += e.nbytes
                self.counters.written_blocks += 1
                self.counters.written_bytes += e.nbytes
            else:
                failed += 1
                self.nvme.free(seg, slot)
                e.ns.nvme_blocks -= 1  # counted when its slot was taken (_place)
                e.ns.nvme_bytes -= e.nbytes
            demoted = self._undemote(e)
            if err is not None and not demoted and e.state == COMMITTED and e.seg is not None:
                self._hold(e)  # written through and acknowledged: kept (pinned) for the retry
                continue
            self.store.unpin(e)  # a block deleted meanwhile now loses its copies
            if demoted and err is None:
                self.counters.demoted_blocks += 1
                self.store.drop_dram_copy(e)  # it was on its way out of DRAM: now it may go
        if failed:
            self.counters.write_errors += failed
            self._retry_at = time.monotonic() + self.retry_s
            log.error("nvme: %d of %d block(s) not persisted (%s); %s; retrying in %.0f s", failed, len(batch),
                      self.nvme.degraded, "kept in DRAM for the retry" if self.keep_unpersisted else
                      "they stay in DRAM only, evictable (nvme.keep_unpersisted = false)", self.retry_s)
        elif batch and self.nvme.degraded is not None:
            log.warning("nvme tier healthy again after: %s", self.nvme.degraded)
            self.nvme.degraded = None
        self._batch_done()

    def _batch_done(self) -> None:
        """Wake whoever waits for room or for the queue to drain, then start the next batch."""
        self.writing = False
        self._progress.fire()
        self._kick()

    async def wait_for_progress(self, timeout: float) -> bool:
        """Wait until the batch being written finishes (its blocks become evictable); False if none is."""
        if not (self.writing or self.queue) or self.loop is None:
            return False
        return await self._progress.wait(self.loop, timeout)

    def _place(self, e: Entry, unindex: list[tuple[str, bytes]]) -> tuple[Segment, int] | None:
        """An NVMe slot, evicting the order's victims until one frees up: the namespace's own copies while it is
        over its NVMe quota, anyone's otherwise. The slot counts toward the namespace's use from here on."""
        ns = e.ns
        while ns.quota and ns.over_quota("nvme", e.nbytes, 1):
            victim = self.order.victim(lambda x: not x.pins and x.ns is ns)  # type: ignore[attr-defined]
            if victim is None:
                return None
            assert isinstance(victim, Entry)
            self.counters.quota_evictions += 1
            self._evict(victim, unindex)
        while True:
            placement = self.nvme.allocate(ns.name, e.nbytes)
            if placement is not None:
                ns.nvme_blocks += 1
                ns.nvme_bytes += e.nbytes
                return placement
            victim = self._victim()
            if victim is None:
                return None
            self._evict(victim, unindex)

    def _evict(self, victim: Entry, unindex: list[tuple[str, bytes]]) -> None:
        unindex.append((victim.ns.name, victim.key))
        self.counters.evictions += 1
        self.counters.evicted_bytes += victim.nbytes
        # freed now, before its record is deleted: safe only because this slot is written by the
        # batch whose job deletes that record first (see _write_job)
        self.nvme.free(victim.nseg, victim.nslot)
        self._forget_copy(victim)

    def _track(self, e: Entry) -> None:
        self.order.insert(e, None)

    def _victim(self) -> Entry | None:
        """The order's victim among the unpinned copies (CLOCK: read ones get a second chance)."""
        victim = self.order.victim(_unpinned)
        assert victim is None or isinstance(victim, Entry)
        return victim

    def _forget_copy(self, e: Entry) -> None:
        """The entry no longer has an NVMe copy; an entry with no copy left leaves the index."""
        e.nseg = None
        if self.store.events is not None:
            self.store.events.removed(e, self.tier_id)
        self.order.remove(e)
        self.blocks -= 1
        self.bytes -= e.nbytes
        e.ns.nvme_blocks -= 1
        e.ns.nvme_bytes -= e.nbytes
        if e.seg is None and e.state == COMMITTED:
            self.store.forget(e)

    # ---------------------------------------------------------------- removal
    def discard(self, e: Entry) -> None:
        """Drop a block's NVMe copy: its record goes (durably) with the next batch, then its slot is free."""
        self._unindex.append((e, e.nseg, e.nslot))
        self.counters.unindexed += 1
        self._forget_copy(e)
        self._kick()

    def _take_unindex(self, unindex: list[tuple[str, bytes]], freed: list[tuple[Segment, int]]) -> None:
        for e, seg, slot in self._unindex:
            unindex.append((e.ns.name, e.key))
            freed.append((seg, slot))
        self._unindex.clear()

    # -------------------------------------------------------------- promotion
    def referenced(self, e: Entry) -> None:
        """A read of a block with an NVMe copy: the order hears of it (CLOCK: its reference bit)."""
        self.order.hit(e)

    async def promote(self, session: Session, keys: Sequence[bytes], res: KeysResult,
                      todo: list[tuple[int, Entry]]) -> list[int]:
        """Bring NVMe-only blocks that ``acquire`` pinned into DRAM and fill in their descriptors. Blocks with
        no DRAM room to come into are NO_SPACE (the reader may ask again); returns the positions of those that
        were lost meanwhile (NOT_FOUND now). Either way their pins are released."""
        assert self.loop is not None
        store = self.store
        reads: list[tuple[Entry, Segment, int, asyncio.Future[str | None]]] = []
        waits: list[tuple[int, Entry, asyncio.Future[str | None] | None]] = []
        lost: list[int] = []
        for i, e in todo:
            if e.seg is not None:  # promoted by another reader meanwhile
                waits.append((i, e, None))
                continue
            fut = self.promoting.get(e)
            if fut is None:
                ns = e.ns
                if ns.quota and ns.over_quota("dram", e.nbytes, 1):
                    # room among its own blocks first; if all are pinned, the read still comes up (pinned by its
                    # reader, it is the first to go once released)
                    store.shed(ns, e.nbytes, 1)
                placement = store.make_room(ns.name, e.nbytes)
                if placement is None:
                    res.codes[i] = int(ErrorCode.NO_SPACE)
                    res.message = (f"dram tier full: no free or evictable slot to read a block from nvme into "
                                   f"({store.pinned_blocks} blocks pinned)")
                    store.release(session, [keys[i]])
                    continue
                fut = self.loop.create_future()
                self.promoting[e] = fut
                store.pin(e)  # our own pin: the copy stays put even if the client goes away mid-read
                ns.reserved_blocks += 1  # the slot counts toward the DRAM quota while the read is in flight
                ns.reserved_bytes += e.nbytes
                reads.append((e, placement[0], placement[1], fut))
            waits.append((i, e, fut))
        if reads:
            pending = [asyncio.wrap_future(self.nvme.pool.submit(
                self.nvme.read_into, e.ns.name, e.key, self.dram.view(seg, slot, seg.slot_size)), loop=self.loop)
                for e, seg, slot, _fut in reads]
            results = await asyncio.gather(*pending, return_exceptions=True)
            for (e, seg, slot, fut), result in zip(reads, results):
                del self.promoting[e]
                e.ns.reserved_blocks -= 1
                e.ns.reserved_bytes -= e.nbytes
                if isinstance(result, BaseException):
                    self.dram.free(seg, slot)
                    self.counters.read_errors += 1
                    log.error("nvme: cannot read a block of namespace %r back (%s); dropping that copy",
                              e.ns.name, result)
                    if e.nseg is not None:
                        self.discard(e)
                    fut.set_result(f"its nvme copy is unreadable: {result}")
                else:
                    store.add_dram_copy(e, seg, slot)
                    self.counters.promoted_blocks += 1
                    self.counters.promoted_bytes += e.nbytes
                    fut.set_result(None)
                store.unpin(e)
        for i, e, fut in waits:
            err = await fut if fut is not None else None
            if err is None and e.seg is not None:
                res.descriptors[i] = store.descriptor(e)
            else:
                res.codes[i] = int(ErrorCode.NOT_FOUND)
                res.message = f"block {i} was lost: {err or 'evicted'}"
                store.release(session, [keys[i]])
                lost.append(i)
        return lost

    # --------------------------------------------------------------- lifecycle
    def pending(self) -> int:
        return len(self.queue) + self.in_flight

    async def flush(self, timeout: float) -> bool:
        """Wait (bounded) until every queued block is on NVMe; True when nothing is left."""
        deadline = time.monotonic() + timeout
        while await self.wait_for_progress(max(deadline - time.monotonic(), 0.0)):
            pass
        return not (self.writing or self.queue)

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        s = self.nvme.stats()
        s.update(tier_id=int(self.nvme.tier_id), blocks=self.blocks, used_bytes=self.bytes,
                 pending_writes=self.pending(), unpersisted_blocks=len(self.unpersisted), orphaned_blocks=self.orphans,
                 **self.counters.as_dict())
        if self.recovery is not None:
            r = self.recovery
            s["recovered"] = {"blocks": r.blocks, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                              "dropped": r.dropped}
        return s

    def moves(self) -> dict[str, dict[str, int]]:
        c = self.counters
        return {"dram_to_nvme": {"blocks": c.written_blocks, "bytes": c.written_bytes},
                "nvme_to_dram": {"blocks": c.promoted_blocks, "bytes": c.promoted_bytes}}

    def close(self) -> None:
        self.closed = True
        self.ordered.shutdown(wait=True)
        self.nvme.close()
