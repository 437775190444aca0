"""Eviction policies by name, and the admission rules that sit in front of a tier."""

from __future__ import annotations

import random
from typing import Any

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key
from kvrack.daemon.policies.chain import ChainPolicy
from kvrack.daemon.policies.clock import ClockPolicy
from kvrack.daemon.policies.lru import LruPolicy
from kvrack.daemon.policies.s3fifo import S3FifoPolicy
from kvrack.daemon.policies.sieve import SievePolicy
from kvrack.daemon.policies.tinylfu import TinyLfuPolicy

# the policies any tier may name (dram.policy, cxl.policy, nvme.policy) and the simulator compares
POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LruPolicy, S3FifoPolicy, SievePolicy, TinyLfuPolicy, ChainPolicy)}
# and the NVMe tier's default, CLOCK (nvme.policy = "clock"), which keeps its bits in the index entries there
NVME_POLICIES: dict[str, type[EvictionPolicy]] = {"clock": ClockPolicy, **POLICIES}


def make_policy(name: str, capacity: int, rng: random.Random | None = None, **options: Any) -> EvictionPolicy:
    """A policy by its config name (``options``: what that policy takes besides, e.g. CLOCK's ``flags``)."""
    try:
        cls = NVME_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(sorted(NVME_POLICIES))}") from None
    return cls(capacity, rng, **options)


__all__ = ["EvictionPolicy", "Evictable", "Key", "NVME_POLICIES", "POLICIES", "make_policy"]
