"""Conformance suite every eviction policy passes, inside the simulator's tiers (leaf-first, pins)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrack.bench.sim.replay import Simulator
from kvrack.daemon.policies import POLICIES, make_policy
from kvrack.daemon.policies.admission import make_admission
from kvrack.daemon.policies.chains import Chains

ALL = sorted(POLICIES)


def random_requests(rng: random.Random, n: int) -> list[list[int]]:
    """Chains over a small tree: shared heads, branching tails, some one-shot chains."""
    out, next_id, chains = [], 1_000_000, [[i] for i in range(5)]
    for _ in range(n):
        base = list(rng.choice(chains))
        if rng.random() < 0.6:
            base = base[: rng.randint(1, len(base))]
        tail = list(range(next_id, next_id + rng.randint(0, 6)))
        next_id += len(tail)
        req = base + tail
        chains.append(req)
        out.append(req)
    return out


class CheckedSimulator(Simulator):
    """Checks each invariant at every eviction."""

    def _drop(self, tier, key):  # type: ignore[no-untyped-def]
        assert key not in self.pinned, "a pinned block was evicted"
        assert key in tier.resident
        kids = self.kids_dram if tier is self.dram else self.kids_any
        assert not kids.get(key), "a block was evicted before its cached descendants (leaf-first broken)"
        super()._drop(tier, key)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cap=st.integers(1, 40), nvme=st.sampled_from([0, 10, 60]),
       admission=st.sampled_from(["all", "reused", "demote"]))
def test_capacity_pins_and_leaf_first(name: str, seed: int, cap: int, nvme: int, admission: str) -> None:
    sim = CheckedSimulator(cap, name, nvme, admission=admission, seed=seed)
    for req in random_requests(random.Random(seed), 150):
        prefix = sim.serve(req)
        assert 0 <= prefix <= len(req)
        assert len(sim.dram.resident) <= cap, "DRAM over capacity"
        assert len(sim.dram.policy) == len(sim.dram.resident), "policy and tier disagree on residency"
        assert set(sim.dram.policy) == sim.dram.resident
        if sim.nvme is not None:
            assert len(sim.nvme.resident) <= nvme, "NVMe over capacity"
            assert len(sim.nvme.policy) == len(sim.nvme.resident)
    res = sim.result
    assert res.prefix_hits <= res.accesses


@pytest.mark.parametrize("name", ALL)
def test_deterministic_with_injected_rng(name: str) -> None:
    reqs = random_requests(random.Random(7), 400)

    def run() -> tuple[int, int, int]:
        sim = Simulator(25, name, 50, admission="reused", seed=3)
        for r in reqs:
            sim.serve(r)
        return sim.result.prefix_hits, sim.result.nvme_writes, sim.result.promoted

    assert run() == run()


@pytest.mark.parametrize("name", ALL)
def test_victims_only_from_evictable(name: str) -> None:
    policy = make_policy(name, 8, random.Random(0))
    for k in range(8):
        policy.insert(k)
    policy.hit(3)
    allowed = {2, 5}
    for _ in range(4):
        v = policy.victim(lambda k: k in allowed)
        assert v in allowed
    assert policy.victim(lambda k: False) is None
    for k in range(8):
        policy.remove(k)
    assert len(policy) == 0 and policy.victim(lambda k: True) is None
    policy.remove(99)  # unknown keys are ignored


@pytest.mark.parametrize("name", ALL)
def test_every_policy_keeps_what_fits(name: str) -> None:
    """With room for the whole working set nothing is evicted: every repeat is a full hit."""
    reqs = random_requests(random.Random(1), 200)
    unique = len({k for r in reqs for k in r})
    sim = Simulator(unique, name)
    seen: set[int] = set()
    for r in reqs:
        expect = 0
        while expect < len(r) and r[expect] in seen:
            expect += 1
        assert sim.serve(r) == expect
        seen.update(r)
    assert sim.dram.counts.evicted == 0


def test_unknown_names_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru", 10)
    with pytest.raises(ValueError, match="unknown admission rule"):
        make_admission("sometimes", 10)
    with pytest.raises(ValueError, match="at least one block"):
        make_policy("lru", 0)


def test_lru_leaf_first_evicts_a_tail_not_a_shared_head() -> None:
    sim = CheckedSimulator(6, "lru")
    sim.serve([1, 2, 3])  # shared head 1,2 with tail 3
    sim.serve([1, 2, 4])
    sim.serve([10, 11, 12])  # needs room: LRU's oldest is 1, yet its descendants must go first
    assert 1 in sim.dram.resident and 2 in sim.dram.resident
    assert 3 not in sim.dram.resident


def test_chain_protects_reused_blocks_from_a_scan() -> None:
    hot = [[0, 1, 2, 3]] * 3
    scan = [[100 + 4 * i + j for j in range(4)] for i in range(40)]
    results = {}
    for name in ("lru", "chain"):
        sim = Simulator(20, name)
        for r in hot:
            sim.serve(r)
        for r in scan:
            sim.serve(r)
        results[name] = sim.serve([0, 1, 2, 3])
    assert results["lru"] == 0  # the scan flushed LRU
    assert results["chain"] == 4  # the reused chain survived it


def test_tinylfu_moves_window_blocks_into_an_empty_main_space() -> None:
    policy = make_policy("lfu", 100)
    for k in range(100):
        policy.insert(k)
    v = policy.victim(lambda k: True)
    assert v is not None
    assert len(policy.queues[1]) + len(policy.queues[2]) > 0  # type: ignore[attr-defined]


# ------------------------------------------------------------- in the daemon's store
@pytest.mark.parametrize("name", ALL)
def test_store_evicts_through_the_configured_policy(name: str) -> None:
    from kvrack.daemon.session import Session
    from kvrack.daemon.settings import NamespaceConfig
    from kvrack.daemon.store import Store
    from kvrack.protocol import ErrorCode, TierId
    from kvrack.tiers.dram import HeapBacking, MemoryTier

    seg, block = 64 * 1024, 16 * 1024
    tier = MemoryTier(TierId.DRAM, 2 * seg, seg, HeapBacking())  # 8 blocks
    store = Store(tier, [NamespaceConfig("a")], policy=name, typical_block_bytes=block)
    s = Session(1, None)
    s.namespace = store.namespaces["a"]

    def k(i: int) -> bytes:
        return i.to_bytes(32, "big")

    def put(keys: list[bytes]) -> list[int]:
        res = store.reserve(s, keys, [block] * len(keys), None)
        store.commit(s, [kk for kk, c in zip(keys, res.codes) if c == 0])
        return res.codes

    assert put([k(i) for i in range(8)]) == [0] * 8
    assert store.acquire(s, [k(0), k(1)]).codes == [0, 0]  # pinned: never a victim
    for i in range(100, 130):
        assert put([k(i)]) == [0]
        assert store.dram_blocks <= 8
    assert store.lookup(s.namespace, [k(0), k(1)])[0] == 2
    assert store.counters.evictions == 30
    store.release(s, [k(0), k(1)])
    assert store.order.size == store.dram_blocks == 8
    assert store.reserve(s, [k(999)], [block], None).codes == [ErrorCode.OK]


# ------------------------------------------------------------- cost of leaf-first descents
DEEP = 2000  # blocks in one chain: far past PLAIN_DEPTH, as a 1M-token prompt in 512-token blocks


def test_leaf_first_resumes_so_a_deep_chain_goes_in_linear_steps() -> None:
    """The policy names the chain's head at every eviction; the descent must not walk the whole chain
    each time (that was O(depth²): ~2M steps here, seconds on the event loop)."""
    from kvrack.daemon.policies.base import LeafFirst, leaf_first

    parent = {i: (i - 1 if i else None) for i in range(DEEP)}
    kids: dict[int, int] = {i - 1: i for i in range(1, DEEP)}
    members = set(parent)
    steps = 0

    def next_kid(k: int) -> int | None:
        nonlocal steps
        steps += 1
        return kids.get(k)

    descend = LeafFirst(lambda k: leaf_first(k, next_kid), parent.get, members.__contains__)
    order = []
    while members:
        victim = descend(min(members))  # an LRU: the head is always the oldest
        assert victim is not None and victim not in kids, "only a block with no member child may go"
        order.append(victim)
        members.discard(victim)
        kids.pop(parent[victim], None)
    assert order == list(range(DEEP - 1, -1, -1)), "tail first"
    assert steps <= 3 * DEEP, f"{steps} descent steps for a chain of {DEEP}"


def test_leaf_first_starts_again_from_the_victim_when_the_resume_point_cannot_go() -> None:
    from kvrack.daemon.policies.base import LeafFirst, leaf_first

    parent = {0: None, 1: 0, 2: 1, 3: 0}
    kids = {0: [1, 3], 1: [2]}
    members = {0, 1, 2, 3}
    descend = LeafFirst(lambda v: leaf_first(v, lambda k: next(iter(kids.get(k, [])), None)), parent.get,
                        members.__contains__)
    assert descend(0) == 2
    members.discard(2)
    del kids[1]
    members.discard(1)  # the resume point (2's parent) was pinned meanwhile: not a member
    kids[0].remove(1)
    assert descend(0) == 3, "the descent starts again at the victim and finds the other branch"
    assert descend(None) is None and descend.resume is None


def test_the_simulator_evicts_a_deep_chain_in_linear_steps() -> None:
    class CountingKids(Chains):
        gets = 0

        def _load(self, parent):  # type: ignore[no-untyped-def]
            CountingKids.gets += 1
            return super()._load(parent)

    sim = CheckedSimulator(DEEP, "lru")
    sim.kids_dram = CountingKids()
    sim.serve(list(range(DEEP)))
    CountingKids.gets = 0
    sim.serve(list(range(10**6, 10**6 + DEEP)))  # replaces the whole chain, tail first
    assert sim.dram.resident == set(range(10**6, 10**6 + DEEP))
    assert CountingKids.gets <= 10 * DEEP, f"{CountingKids.gets} lookups to evict a chain of {DEEP}"
