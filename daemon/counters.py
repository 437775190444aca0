"""Integer counters with one owner each: the store's, the NVMe tier's. Every stats view reads them through
the registry (``kvrack.daemon.stats``); only their owner changes them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Counters:
    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(slots=True)
class StoreCounters(Counters):
    """Operations on the index and the DRAM tier."""

    lookup_keys: int = 0
    lookup_hits: int = 0
    get_keys: int = 0
    get_hits: int = 0
    puts: int = 0
    put_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    aborted: int = 0
    deleted: int = 0
    no_space: int = 0
    prefetch_keys: int = 0
    prefetched_blocks: int = 0
    background_evictions: int = 0
    quota_evictions: int = 0  # a namespace over its quota made room among its own blocks
    admin_evictions: int = 0  # an operator asked (POST /v1/tiers/dram/evict, a quota lowered)


@dataclasses.dataclass(slots=True)
class LeaseCounters(Counters):
    """Leases that ran out before their holder ended them."""

    expired_reservations: int = 0
    expired_pins: int = 0


@dataclasses.dataclass(slots=True)
class NvmeCounters(Counters):
    """The NVMe tier's copies."""

    written_blocks: int = 0
    written_bytes: int = 0
    write_errors: int = 0
    not_persisted: int = 0  # times a block missed its NVMe copy (a failed write, a degraded or full tier, too large)
    evicted_unpersisted: int = 0  # written-through blocks DRAM evicted before their NVMe copy existed (keep off)
    promoted_blocks: int = 0
    promoted_bytes: int = 0
    read_errors: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    unindexed: int = 0
    demoted_blocks: int = 0
    quota_evictions: int = 0  # of ``evictions``: a namespace over its NVMe quota made room among its own copies
    admin_evictions: int = 0  # of ``evictions``: an operator asked (POST /v1/tiers/nvme/evict)
