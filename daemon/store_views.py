"""The store's figures for the stats registry: per tier, per namespace, hits by tier, leases held. Part of
``Store`` (kvrack.daemon.store)."""

from __future__ import annotations

from typing import Any

from kvrack.daemon.counters import StoreCounters
from kvrack.daemon.index import Namespace
from kvrack.daemon.leases import Leases
from kvrack.daemon.movement import Movement
from kvrack.daemon.order import NamespaceOrders
from kvrack.protocol import TierId
from kvrack.tiers.dram import MemoryTier


class StoreViews:
    """Part of ``Store``: the attributes below are the store's."""

    tier: MemoryTier
    counters: StoreCounters
    order: NamespaceOrders
    movement: Movement
    leases: Leases
    namespaces: dict[str, Namespace]
    absent: dict[str, dict[str, Any]]
    hits_by_tier: dict[int, int]
    dram_blocks: int
    dram_bytes: int
    pinned_blocks: int
    high_water: int
    low_water: int

    def tier_stats(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every tier's figures, DRAM first, then the copying tiers (and configured ones that are absent)."""
        c = self.counters
        dram = self.tier.stats()
        dram.update(tier_id=int(self.tier.tier_id), blocks=self.dram_blocks, used_bytes=self.dram_bytes,
                    evictable_blocks=self.order.size, pinned_blocks=self.pinned_blocks,
                    evict_high_water_bytes=self.high_water, evict_low_water_bytes=self.low_water,
                    hit_ratio=round(c.lookup_hits / c.lookup_keys, 4) if c.lookup_keys else None,
                    get_hit_ratio=round(c.get_hits / c.get_keys, 4) if c.get_keys else None)
        out = [dram]
        present = {t.name: t for t in self.movement.tiers}
        for name in ("nvme", "cxl", "hbm"):
            if name in present:
                out.append(present[name].stats(namespace))
            elif name in self.absent:
                out.append(self.absent[name])
        return out

    def namespace_stats(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        return {ns.name: {"blocks": ns.blocks, "bytes": ns.bytes, "entries": len(ns.entries),
                          "dram_blocks": ns.dram_blocks, "dram_bytes": ns.dram_bytes, "nvme_blocks": ns.nvme_blocks,
                          "nvme_bytes": ns.nvme_bytes, "quota": dict(ns.quota), "lookup_keys": ns.lookup_keys,
                          "lookup_hits": ns.lookup_hits}
                for ns in self.namespaces.values() if namespace in (None, ns.name)}

    def hit_stats(self, namespace: str | None = None) -> dict[str, int]:
        """Keys looked up that were cached, by the tier that held them (all namespaces: none in a tenant's
        view, which has its own namespace's lookups)."""
        if namespace is not None:
            return {}
        return {TierId(t).name.lower(): n for t, n in self.hits_by_tier.items()}

    def lease_stats(self, namespace: str | None = None) -> dict[str, int]:
        """Reservations and pins held now."""
        reservations = pins = 0
        for s in self.leases.holders:
            if namespace is None or (s.namespace is not None and s.namespace.name == namespace):
                reservations += len(s.reserved)
                pins += sum(p[0] for p in s.pins.values())
        return {"reservations": reservations, "pins": pins}

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """The store's sections of the stats (tiers, ops, namespaces, moves)."""
        return {"tiers": self.tier_stats(namespace), "ops": {**self.counters.as_dict(), **self.leases.counters.as_dict()},
                "namespaces": self.namespace_stats(namespace), "moves": self.movement.moves()}
