"""Replays a trace of requests against a DRAM tier and an optional NVMe tier, block counts only.

A request is a chain of block keys (each key's parent is the one before it).
It is served from the leading run of its blocks that is cached (in DRAM, or
on NVMe and then promoted): that run is its prefix hit; the rest is
recomputed and stored, except a partial last block (engines cache only full
blocks). While a request is served its blocks are pinned, and eviction is
leaf first in every tier: when the policy names a block that still has a
child cached in the same or a faster tier, that child's subtree goes first,
deepest block first. The policy ranks subtrees; the tier keeps chains whole.

NVMe writes follow the admission rule: ``all`` writes every new block through
at store time (what the daemon does by default); the others write a block
only when DRAM evicts it and the rule accepts it (demotion).
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrack.bench.sim.traces import Request
from kvrack.daemon.policies import EvictionPolicy, make_policy
from kvrack.daemon.policies.admission import Admission, make_admission
from kvrack.daemon.policies.base import LeafFirst
from kvrack.daemon.policies.chains import Chains


@dataclass
class TierCounts:
    capacity_blocks: int
    hits: int = 0  # prefix-hit blocks served from this tier
    inserted: int = 0
    evicted: int = 0
    refused: int = 0  # new blocks not stored: every resident block pinned or an ancestor


@dataclass
class SimResult:
    policy: str
    admission: str
    requests: int = 0
    accesses: int = 0
    prefix_hits: int = 0
    promoted: int = 0  # NVMe -> DRAM block copies
    demoted: int = 0  # DRAM -> NVMe copies written on eviction
    nvme_writes: int = 0  # every block written to NVMe (through or demoted)
    tiers: dict[str, TierCounts] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        return self.prefix_hits / self.accesses if self.accesses else 0.0

    def as_dict(self, block_bytes: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy, "admission": self.admission, "requests": self.requests,
            "block_accesses": self.accesses, "hit_ratio": round(self.hit_ratio, 6),
            "hit_ratio_by_tier": {n: round(t.hits / self.accesses, 6) if self.accesses else 0.0
                                  for n, t in self.tiers.items()},
            "promoted_blocks": self.promoted, "demoted_blocks": self.demoted, "nvme_write_blocks": self.nvme_writes,
            "tiers": {n: vars(t) for n, t in self.tiers.items()},
        }
        if block_bytes:
            out["bytes_moved"] = {"nvme_to_dram": self.promoted * block_bytes,
                                  "dram_to_nvme": self.demoted * block_bytes}
            out["nvme_write_bytes"] = self.nvme_writes * block_bytes
        return out


class _Tier:
    """Residency, resident-children counts and the policy of one simulated tier."""

    __slots__ = ("name", "capacity", "policy", "resident", "counts", "leaf_first")
    leaf_first: LeafFirst[Any]  # set by the Simulator, which knows the chains

    def __init__(self, name: str, capacity: int, policy: EvictionPolicy) -> None:
        self.name = name
        self.capacity = capacity
        self.policy = policy
        self.resident: set[Any] = set()
        self.counts = TierCounts(capacity)


class Simulator:
    """One policy x admission x tier-size configuration; feed it requests with ``serve``."""

    def __init__(self, dram_blocks: int, policy: str = "lru", nvme_blocks: int = 0, nvme_policy: str | None = None,
                 admission: str = "all", seed: int = 0) -> None:
        rng = random.Random(seed)
        self.dram = _Tier("dram", max(1, dram_blocks), make_policy(policy, max(1, dram_blocks), rng))
        self.nvme = _Tier("nvme", nvme_blocks, make_policy(nvme_policy or policy, nvme_blocks, rng)) \
            if nvme_blocks > 0 else None
        self.admission: Admission = make_admission(admission, max(1, dram_blocks))
        self.write_through = admission == "all"
        self.parent: dict[Any, Any] = {}
        self.kids_dram: Chains[Any] = Chains()  # resident children in DRAM
        self.kids_any: Chains[Any] = Chains()  # resident children in DRAM or on NVMe
        self.pinned: set[Any] = set()
        for tier in (self.dram, self.nvme):
            if tier is not None:
                tier.leaf_first = LeafFirst(functools.partial(self._leaf_under, tier), self.parent.get)
        self.result = SimResult(policy if nvme_policy is None else f"{policy}/{nvme_policy}", admission)
        self.result.tiers["dram"] = self.dram.counts
        if self.nvme is not None:
            self.result.tiers["nvme"] = self.nvme.counts

    # --------------------------------------------------------------- residency
    def _cached(self, key: Any) -> bool:
        return key in self.dram.resident or (self.nvme is not None and key in self.nvme.resident)

    def _link(self, key: Any, was_cached: bool, in_dram_before: bool) -> None:
        """Keep the parent's children counts in step with ``key``'s residency."""
        p = self.parent.get(key)
        if p is None:
            return
        now_dram = key in self.dram.resident
        now_any = self._cached(key)
        if now_dram != in_dram_before:
            (self.kids_dram.add if now_dram else self.kids_dram.drop)(p, key)
        if now_any != was_cached:
            (self.kids_any.add if now_any else self.kids_any.drop)(p, key)

    def _unpinned(self, key: Any) -> bool:
        return key not in self.pinned

    def _leaf_under(self, tier: _Tier, key: Any) -> Any | None:
        """The first evictable leaf of ``key``'s cached subtree (``key`` itself when it is a leaf)."""
        kids = self.kids_dram if tier is self.dram else self.kids_any
        if not kids.has_kids(key):  # the common case: the victim is a leaf
            return key if key in tier.resident and key not in self.pinned else None
        stack = [key]
        seen = set()  # a trace's parents may form a cycle: visit each block once
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            children = kids.get(k)
            if not children:
                if k in tier.resident and k not in self.pinned:
                    return k
                continue
            stack.extend(reversed(children))  # oldest child first
        return None

    def _choose_victim(self, tier: _Tier) -> Any | None:
        """The policy's victim, or the first evictable leaf of its cached subtree. A policy names a chain's
        head again while the chain goes from its tail, so the descent resumes at the parent of the last
        leaf taken: O(depth) per chain instead of O(depth²)."""
        victim = tier.policy.victim(self._unpinned)
        if victim is None:
            return None
        leaf = tier.leaf_first(victim)
        if leaf is not None:
            return leaf
        # the subtree is held by a pinned block or a copy in a faster tier: ask for a true leaf
        kids = self.kids_dram if tier is self.dram else self.kids_any
        return tier.policy.victim(lambda k: k not in self.pinned and not kids.has_kids(k))

    def _make_room(self, tier: _Tier) -> bool:
        while len(tier.resident) >= tier.capacity:
            victim = self._choose_victim(tier)
            if victim is None:
                return False
            self._drop(tier, victim)
        return True

    def _drop(self, tier: _Tier, key: Any) -> None:
        was_cached = self._cached(key)
        in_dram = key in self.dram.resident
        if tier is self.dram and self.nvme is not None and key not in self.nvme.resident \
                and self.admission.admit_on_eviction(key):
            self.result.demoted += 1
            self._store(self.nvme, key)
        tier.resident.discard(key)
        tier.policy.remove(key)
        tier.counts.evicted += 1
        self._link(key, was_cached, in_dram)

    def _store(self, tier: _Tier, key: Any) -> bool:
        """Make ``key`` resident in ``tier``; False when nothing could be evicted for it."""
        if key in tier.resident:
            return True
        was_cached = self._cached(key)
        in_dram = key in self.dram.resident
        if not self._make_room(tier):
            tier.counts.refused += 1
            return False
        tier.resident.add(key)
        tier.policy.insert(key, self.parent.get(key))
        tier.counts.inserted += 1
        if tier is self.nvme:
            self.result.nvme_writes += 1
        self._link(key, was_cached, in_dram)
        return True

    # ------------------------------------------------------------------ serving
    def serve(self, keys: Sequence[Any], partial_tail: bool = False, parents: Sequence[Any] | None = None) -> int:
        """Serve one request; returns its prefix-hit length in blocks.

        ``partial_tail``: the last block is not full, so it is counted as an
        access but never stored (it can still hit if a full copy exists).
        """
        res = self.result
        res.requests += 1
        res.accesses += len(keys)
        dram, nvme = self.dram, self.nvme
        if parents is None:
            for i in range(1, len(keys)):
                self.parent.setdefault(keys[i], keys[i - 1])
        else:
            for key, parent in zip(keys, parents):
                if parent is not None:
                    self.parent.setdefault(key, parent)
        prefix = 0
        for key in keys:
            if key in dram.resident:
                dram.counts.hits += 1
            elif nvme is not None and key in nvme.resident:
                nvme.counts.hits += 1
            else:
                break
            prefix += 1
        res.prefix_hits += prefix
        self.pinned.update(keys)
        try:
            for i, key in enumerate(keys):
                self.admission.record(key)
                if key in dram.resident:
                    dram.policy.hit(key)
                    self.admission.hit_in_dram(key)
                    if nvme is not None and key in nvme.resident:
                        nvme.policy.hit(key)
                elif nvme is not None and key in nvme.resident:
                    nvme.policy.hit(key)
                    if i < prefix and self._store(dram, key):  # promoted for this reader
                        res.promoted += 1
                        self.admission.hit_in_dram(key)
                elif partial_tail and i == len(keys) - 1:
                    break
                elif self._store(dram, key) and nvme is not None and self.write_through:
                    self._store(nvme, key)
        finally:
            self.pinned.difference_update(keys)
        return prefix


def simulate(requests: Iterable[Request], dram_blocks: int, policy: str, nvme_blocks: int = 0,
             admission: str = "all", seed: int = 0) -> SimResult:
    """One configuration over a whole trace."""
    sim = Simulator(dram_blocks, policy, nvme_blocks, admission=admission, seed=seed)
    for r in requests:
        sim.serve(r.keys, r.partial_tail, r.parents)
    return sim.result


def belady(requests: Sequence[Request], capacity: int) -> float:
    """Prefix-hit ratio when the block evicted is always the one needed furthest in the future.

    Knows the future, so no policy can do it; ignores pins and leaf-first. A
    reference for how much room a trace leaves above LRU at this size.
    """
    next_use: list[list[int]] = [[]] * len(requests)
    last: dict[Any, int] = {}
    never = len(requests) + 1
    for t in range(len(requests) - 1, -1, -1):
        keys = requests[t].keys
        next_use[t] = [last.get(k, never) for k in keys]
        for k in keys:
            last[k] = t
    cache: dict[Any, int] = {}
    heap: list[tuple[int, int, Any]] = []
    order = 0
    hits = accesses = 0
    for t, r in enumerate(requests):
        keys = r.keys
        k = 0
        while k < len(keys) and keys[k] in cache:
            k += 1
        hits += k
        accesses += len(keys)
        stored = len(keys) - 1 if r.partial_tail else len(keys)
        for key, nu in zip(keys[:stored], next_use[t]):
            if key not in cache:
                while len(cache) >= capacity and heap:
                    far, _, victim = heapq.heappop(heap)
                    if cache.get(victim) == -far:
                        del cache[victim]
            cache[key] = nu
            order += 1
            heapq.heappush(heap, (-nu, order, key))
    return hits / accesses if accesses else 0.0
