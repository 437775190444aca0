"""The store's eviction from DRAM: the policy's victim, leaf first, evicted inline by a reserve that needs room
or in the background between the watermarks; demoted to NVMe first when the admission rule wants a copy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvrack.daemon.counters import StoreCounters
from kvrack.daemon.index import COMMITTED, Entry, Namespace
from kvrack.daemon.order import NamespaceOrders
from kvrack.daemon.policies.admission import Admission
from kvrack.daemon.policies.base import leaf_first
from kvrack.daemon.policies.chains import EntryChains
from kvrack.tiers.base import Segment
from kvrack.tiers.dram import MemoryTier

if TYPE_CHECKING:
    from kvrack.daemon.mover import Mover


class Eviction:
    """Part of ``Store`` (kvrack.daemon.store): the attributes below are the store's."""

    tier: MemoryTier
    order: NamespaceOrders
    chains: EntryChains
    counters: StoreCounters
    nvme: Mover | None
    admission: Admission
    write_through: bool
    high_water: int
    low_water: int
    namespaces: dict[str, Namespace]

    def _free_dram_copy(self, e: Entry) -> None: ...

    def forget(self, e: Entry) -> None: ...

    def make_room(self, owner: str, size: int) -> tuple[Segment, int] | None:
        """A slot, evicting the policy's victims until one frees up (O(1) each). Victims the NVMe admission
        wants are written there first (demotion): up to a few times ``size`` of them are queued, then None
        says to wait for those writes."""
        demoting = 0
        while True:
            placement = self.tier.allocate(owner, size)
            if placement is not None:
                return placement
            victim = self._victim()
            if victim is None or demoting > 4 * size:
                return None
            if not self._evict_or_demote(victim):
                demoting += victim.nbytes

    def _evict_or_demote(self, v: Entry) -> bool:
        """Drop the victim's DRAM copy now (True), or queue its write to NVMe first (False): it has no
        NVMe copy yet and the admission rule says it is worth one."""
        nvme = self.nvme
        if (v.nseg is None and not self.write_through and nvme is not None
                and self.admission.admit_on_eviction(v.key) and nvme.demote(v)):
            return False
        self._evict(v)
        return True

    def drop_dram_copy(self, e: Entry) -> None:
        """A demoted block is on NVMe now: free its DRAM copy unless someone pinned it meanwhile."""
        if e.state == COMMITTED and e.seg is not None and e.nseg is not None and e.pins == 0:
            self.order.remove(e)
            self.counters.evictions += 1
            self.counters.evicted_bytes += e.nbytes
            self._free_dram_copy(e)

    def set_watermarks(self, high: float, low: float) -> None:
        """Shares of the DRAM capacity between which the background evictor works (high 1.0: off)."""
        cap = self.tier.capacity
        self.high_water = int(cap * high) if high < 1.0 else cap
        self.low_water = min(int(cap * low), self.high_water)

    def evict_background(self, limit: int) -> int:
        """Evict up to ``limit`` unpinned blocks, least valuable first, while DRAM is above the low watermark."""
        allocator = self.tier.allocator
        n = 0
        window = self.high_water - self.low_water
        while n < limit and allocator.used_bytes > self.low_water:
            if self.nvme is not None and self.nvme.demoting_bytes > window:
                break  # enough on its way to NVMe; their DRAM copies go when the writes land
            victim = self._victim()
            if victim is None:
                break
            self._evict_or_demote(victim)
            n += 1
        self.counters.background_evictions += n
        return n

    def _victim(self) -> Entry | None:
        """The policy's victim, leaf first, in the namespace the tier evicts from (``NamespaceOrders.pick``): a
        block whose descendants still have DRAM copies goes after them (deepest first), so chains shrink from
        their tails and shared heads stay. The descent resumes under the last victim, so a chain goes in
        O(depth) steps, not O(depth²)."""
        for ns in self.order.pick():
            victim = ns.leaf(ns.order.victim())
            if victim is not None:
                return victim
        return None

    def shed(self, ns: Namespace, nbytes: int = 0, blocks: int = 0, admin: bool = False) -> bool:
        """Evict ``ns``'s own blocks (leaf first, by its policy) until ``nbytes`` in ``blocks`` more fit its DRAM
        quota; never another namespace's. False when none of its blocks can go and it is still over."""
        leaving = 0  # bytes of victims on their way to NVMe (demoted): their DRAM copies go when written
        while ns.over_quota("dram", nbytes - leaving, blocks):
            victim = ns.leaf(ns.order.victim())
            if victim is None:
                return False
            if admin:
                self.counters.admin_evictions += 1
            else:
                self.counters.quota_evictions += 1
            if not self._evict_or_demote(victim):
                leaving += victim.nbytes
        return True

    def evict_dram(self, nbytes: int, max_blocks: int) -> tuple[int, int]:
        """The admin API's eviction: the policy's victims (leaf first, demoted to NVMe as the admission rule
        says) until ``nbytes`` are on their way out or ``max_blocks`` went. Returns (blocks, bytes)."""
        blocks = freed = 0
        while freed < nbytes and blocks < max_blocks:
            victim = self._victim()
            if victim is None:
                break
            self._evict_or_demote(victim)
            self.counters.admin_evictions += 1
            blocks += 1
            freed += victim.nbytes
        return blocks, freed

    def _evict(self, e: Entry) -> None:
        """Drop a block's DRAM copy; a block with no NVMe copy leaves the index."""
        if e.nseg is None and self.write_through and self.nvme is not None:
            self.nvme.counters.evicted_unpersisted += 1  # acknowledged as written through, never written: lost
        self.order.remove(e)
        self.counters.evictions += 1
        self.counters.evicted_bytes += e.nbytes
        self._free_dram_copy(e)
        if e.nseg is None:
            self.forget(e)

    def _deepest_evictable(self, e: Entry) -> Entry | None:
        """The deepest descendant of ``e`` (or ``e``) that may go now (leaf first)."""
        return leaf_first(e, lambda p: self.chains.first(p, self.order.holds))

    def _dram_parent(self, e: Entry) -> Entry | None:
        return None if e.parent is None else e.ns.entries.get(e.parent)
