"""What the NVMe mover does besides writing through: keep the blocks whose write failed and write them again once
the retry interval passed, probe a degraded tier, say what is not on NVMe at shutdown, and the evictions an
operator asks for. Part of ``Mover`` (kvrack.daemon.mover)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from kvrack.daemon.counters import NvmeCounters
from kvrack.daemon.index import COMMITTED, Entry, Namespace
from kvrack.tiers.nvme import NvmeTier

if TYPE_CHECKING:
    from kvrack.daemon.store import Store

log = logging.getLogger("kvrack.mover")


class Retries:
    """Part of ``Mover``: the attributes and methods below are the mover's."""

    store: Store
    nvme: NvmeTier
    loop: asyncio.AbstractEventLoop | None
    closed: bool
    queue: collections.deque[Entry]
    in_flight: int
    writing: bool
    probing: bool
    keep_unpersisted: bool
    unpersisted: dict[Entry, None]
    retry_s: float
    _retry_at: float
    counters: NvmeCounters
    order: Any
    ordered: Any

    def _kick(self) -> None: ...

    def _victim(self) -> Entry | None: ...

    def discard(self, e: Entry) -> None: ...

    def _hold(self, e: Entry) -> bool:
        """``e`` (pinned by the mover) missed its NVMe copy: keep it for the retry, or let it go evictable and say
        so (nvme.keep_unpersisted off). Whether it is kept."""
        self.counters.not_persisted += 1
        if not self.keep_unpersisted:
            self.store.unpin(e)
            return False
        self.unpersisted[e] = None
        return True

    def retry_now(self) -> int:
        """Queue the blocks kept for a retry (still committed, still without an NVMe copy); their pins go with
        them. How many were queued."""
        kept = list(self.unpersisted)
        self.unpersisted.clear()
        n = 0
        for e in kept:
            if e.state == COMMITTED and e.seg is not None and e.nseg is None:
                self.queue.append(e)
                n += 1
            else:  # deleted (or copied) meanwhile
                self.store.unpin(e)
        if n:
            self._kick()
        return n

    def not_on_nvme(self) -> tuple[int, int]:
        """Acknowledged written-through blocks with no NVMe copy yet (queued, in flight or kept for a retry)."""
        held = [e for e in (*self.queue, *self.unpersisted) if e.state == COMMITTED and e.nseg is None]
        return len(held) + self.in_flight, sum(e.nbytes for e in held)

    def tick(self) -> None:
        """The sweeper's cadence: once the retry interval has passed, write the blocks kept for it; with none, probe
        a degraded tier, so that it reports healthy again without waiting for a put."""
        if self.loop is None or self.closed or time.monotonic() < self._retry_at:
            return
        if self.unpersisted:
            n = self.retry_now()
            if n:
                log.info("nvme: retrying %d block(s) not yet on nvme", n)
        elif self.nvme.degraded is not None and not (self.writing or self.queue or self.probing):
            self.probing = True
            fut = asyncio.wrap_future(self.ordered.submit(self.nvme.probe), loop=self.loop)
            fut.add_done_callback(self._probed)

    def _probed(self, fut: asyncio.Future[str | None]) -> None:
        self.probing = False
        err = fut.exception() or fut.result()
        if err is None and self.nvme.degraded is not None:
            log.warning("nvme tier healthy again (a probe write succeeded) after: %s", self.nvme.degraded)
            self.nvme.degraded = None
        elif err is not None:
            self._retry_at = time.monotonic() + self.retry_s

    def created(self, e: Entry) -> float | None:
        """When ``e``'s NVMe copy was written (unix time, from its index record), for the admin API."""
        if e.nseg is None:
            return None
        rec = self.nvme.index.get(e.ns.name, e.key)
        return None if rec is None else float(rec.created)

    def evict(self, nbytes: int, max_blocks: int) -> tuple[int, int]:
        """The admin API's eviction: drop the order's victims (unpinned NVMe copies) until ``nbytes`` went or
        ``max_blocks``; their records go durably with the next batch, then their slots are free. A block
        with no DRAM copy leaves the index. Returns (blocks, bytes)."""
        blocks = freed = 0
        while freed < nbytes and blocks < max_blocks:
            victim = self._victim()
            if victim is None:
                break
            self.counters.evictions += 1
            self.counters.evicted_bytes += victim.nbytes
            self.counters.admin_evictions += 1
            blocks += 1
            freed += victim.nbytes
            self.discard(victim)
        return blocks, freed

    def shed(self, ns: Namespace) -> int:
        """Bring ``ns`` within its NVMe quota now (it was lowered): drop its own unpinned copies, the order's
        victims first. Returns how many went."""
        n = 0
        while ns.over_quota("nvme"):
            victim = self.order.victim(lambda x: not x.pins and x.ns is ns)
            if victim is None:
                break
            assert isinstance(victim, Entry)
            self.counters.evictions += 1
            self.counters.evicted_bytes += victim.nbytes
            self.counters.admin_evictions += 1
            self.discard(victim)
            n += 1
        return n
