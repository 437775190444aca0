"""Eviction policies by name, and the admission rules that sit in front of a tier."""

from __future__ import annotations

import random

from kvrack.daemon.policies.base import Evictable, EvictionPolicy, Key
from kvrack.daemon.policies.chain import ChainPolicy
from kvrack.daemon.policies.lru import LruPolicy
from kvrack.daemon.policies.s3fifo import S3FifoPolicy
from kvrack.daemon.policies.sieve import SievePolicy
from kvrack.daemon.policies.tinylfu import TinyLfuPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LruPolicy, S3FifoPolicy, SievePolicy, TinyLfuPolicy, ChainPolicy)}


def make_policy(name: str, capacity: int, rng: random.Random | None = None) -> EvictionPolicy:
    """A policy by its config name."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return cls(capacity, rng)


__all__ = ["EvictionPolicy", "Evictable", "Key", "POLICIES", "make_policy"]
