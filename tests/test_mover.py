"""Store + mover + NVMe tier in one process: write-through, promotion, NVMe eviction, faults on the file layer."""

from __future__ import annotations

import asyncio
import errno

import pytest

from kvrack.daemon.mover import Mover
from kvrack.daemon.session import Session
from kvrack.daemon.settings import NamespaceConfig
from kvrack.daemon.store import Store
from kvrack.protocol import ErrorCode, TierId
from kvrack.tiers.blockio import DirectFile, FaultPlan, FaultyFile
from kvrack.tiers.dram import HeapBacking, MemoryTier
from kvrack.tiers.nvme import BackingPath, NvmeTier

SEG = 256 * 1024
BLOCK = 64 * 1024  # 4 per DRAM segment, 4 per NVMe region


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def payload(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


class Rig:
    """A store with 8 DRAM slots and 16 NVMe slots, driven on a private event loop."""

    def __init__(self, tmp_path, plan: FaultPlan | None = None, nvme_bytes: int = 4 * SEG,
                 nvme_policy: str = "clock") -> None:
        self.loop = asyncio.new_event_loop()
        self.dram = MemoryTier(TierId.DRAM, 2 * SEG, SEG, HeapBacking())
        self.store = Store(self.dram, [NamespaceConfig("a")])
        opener = DirectFile if plan is None else (lambda p, c: FaultyFile(DirectFile(p, c), plan))
        self.nvme = NvmeTier([BackingPath(str(tmp_path / "data"), nvme_bytes)], str(tmp_path / "index"),
                             region_bytes=SEG, io_threads=2, open_file=opener, map_size=16 << 20)
        report, recovered = self.nvme.recover()
        self.mover = Mover(self.store, self.nvme, write_batch_bytes=4 * BLOCK, retry_s=0.0, policy=nvme_policy,
                           typical_block_bytes=BLOCK)
        self.mover.adopt(report, recovered)
        self.store.attach(self.mover)
        self.mover.start(self.loop)
        self.session = Session(1, None)
        self.session.namespace = self.store.namespaces["a"]

    def put(self, ids: list[int]) -> list[int]:
        s = self.session
        res = self.store.reserve(s, [key(i) for i in ids], [BLOCK] * len(ids), None)
        for i, d in zip(ids, res.descriptors):
            if d is not None:
                self.dram.view(self.dram.segment(d.segment), d.offset // BLOCK, BLOCK)[:] = payload(i)
        self.store.commit(s, [key(i) for i, c in zip(ids, res.codes) if c == 0])
        return res.codes

    def settle(self) -> None:
        assert self.loop.run_until_complete(self.mover.flush(10.0)), "NVMe writes still pending after 10 s"

    def get(self, ids: list[int]) -> list[bytes | None]:
        """acquire (+ promotion), copy out, release: what a client's get_into does."""
        keys = [key(i) for i in ids]
        res = self.store.acquire(self.session, keys)
        if res.promote:
            self.loop.run_until_complete(self.mover.promote(self.session, keys, res, res.promote))
        out: list[bytes | None] = []
        for d in res.descriptors:
            out.append(None if d is None else bytes(self.dram.view(self.dram.segment(d.segment), d.offset // BLOCK, BLOCK)))
        self.store.release(self.session, [k for k, d in zip(keys, res.descriptors) if d is not None])
        return out

    def tiers(self, ids: list[int]) -> bytes:
        return self.store.lookup(self.session.namespace, [key(i) for i in ids])[1]  # type: ignore[index]

    def close(self) -> None:
        self.mover.close()
        self.loop.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_write_through_then_dram_eviction_then_promotion(rig):
    for i in range(0, 12, 4):
        assert rig.put(list(range(i, i + 4))) == [0] * 4
        rig.settle()
    assert rig.mover.blocks == 12 and rig.store.dram_blocks == 8
    assert rig.tiers(list(range(12))) == bytes([TierId.NVME] * 4 + [TierId.DRAM] * 8)
    assert rig.get([0, 1]) == [payload(0), payload(1)]
    assert rig.tiers([0, 1]) == bytes([TierId.DRAM] * 2)
    assert rig.mover.counters.promoted_blocks == 2
    assert rig.store.pinned_blocks == 0 and rig.store.order.size == rig.store.dram_blocks


def test_nvme_eviction_drops_the_oldest_copies_and_forgets_nvme_only_blocks(rig):
    for i in range(0, 24, 4):  # 24 blocks, 16 NVMe slots, 8 DRAM slots
        rig.put(list(range(i, i + 4)))
        rig.settle()
    assert rig.mover.blocks == 16 and rig.mover.counters.evictions == 8
    ns = rig.store.namespaces["a"]
    assert ns.blocks == len(ns.entries)
    present = rig.tiers(list(range(24)))
    assert present[:8] == bytes(8), "the oldest blocks were on NVMe only and were evicted"
    assert all(present[8:])
    for i in range(8, 24, 4):
        assert rig.get(list(range(i, i + 4))) == [payload(j) for j in range(i, i + 4)]


def test_delete_then_put_again_keeps_the_new_copy(tmp_path):
    rig = Rig(tmp_path)
    rig.put([1])
    rig.settle()
    rig.store.delete(rig.session, [key(1)])
    rig.put([1])  # same key: its old record is removed before the new one is written
    rig.settle()
    rig.close()
    again = Rig(tmp_path)
    assert again.tiers([1]) == bytes([TierId.NVME])
    assert again.get([1]) == [payload(1)]
    again.close()


def test_enospc_and_eio_on_write_keep_dram_serving_and_lose_nothing_committed(tmp_path):
    plan = FaultPlan()
    rig = Rig(tmp_path, plan)
    rig.put([1, 2])
    rig.settle()
    plan.write_errno = errno.ENOSPC
    rig.put([3, 4])
    rig.settle()
    s = rig.mover.stats()
    assert s["degraded"] and "write failed" in s["degraded"] and s["write_errors"] == 2
    assert rig.tiers([3, 4]) == bytes([TierId.DRAM] * 2), "DRAM keeps the blocks the NVMe tier refused"
    assert rig.get([3, 4]) == [payload(3), payload(4)]
    plan.write_errno = 0
    plan.sync_errno = errno.EIO
    rig.put([5])
    rig.settle()
    assert rig.mover.counters.write_errors == 3 and rig.nvme.index.get("a", key(5)) is None
    plan.sync_errno = 0
    rig.put([6])  # the tier is retried and recovers
    rig.settle()
    assert rig.mover.stats()["degraded"] is None and rig.nvme.index.get("a", key(6)) is not None
    assert rig.get([1, 2, 3, 4, 5, 6]) == [payload(i) for i in range(1, 7)]
    rig.close()
    again = Rig(tmp_path)  # what was durable before the faults is still there
    assert again.get([1, 2, 6]) == [payload(1), payload(2), payload(6)]
    again.close()


def test_eio_on_promotion_is_a_miss_and_drops_the_bad_copy(tmp_path):
    plan = FaultPlan()
    rig = Rig(tmp_path, plan)
    for i in range(0, 12, 4):
        rig.put(list(range(i, i + 4)))
        rig.settle()
    plan.read_errno = errno.EIO
    keys = [key(0), key(1)]
    res = rig.store.acquire(rig.session, keys)
    rig.loop.run_until_complete(rig.mover.promote(rig.session, keys, res, res.promote))
    assert res.codes == [ErrorCode.NOT_FOUND] * 2 and "unreadable" in res.message
    assert not rig.session.pins and rig.store.pinned_blocks == 0
    assert rig.tiers([0, 1]) == bytes(2) and rig.mover.counters.read_errors == 2
    plan.read_errno = 0
    assert rig.get([2]) == [payload(2)]
    rig.close()


def test_a_get_larger_than_free_dram_says_no_space_for_the_rest(rig):
    for i in range(0, 16, 4):
        rig.put(list(range(i, i + 4)))
        rig.settle()
    keys = [key(i) for i in range(16)]
    res = rig.store.acquire(rig.session, keys)  # pins 16 blocks; DRAM has 8 slots
    rig.loop.run_until_complete(rig.mover.promote(rig.session, keys, res, res.promote))
    assert res.codes.count(ErrorCode.NO_SPACE) == 8 and "dram tier full" in res.message
    ok = [k for k, d in zip(keys, res.descriptors) if d is not None]
    assert len(ok) == 8
    rig.store.release(rig.session, ok)
    assert rig.store.pinned_blocks == 0 and not rig.session.pins


def test_nvme_eviction_gives_read_blocks_a_second_chance(rig):
    for i in range(0, 16, 4):  # fills the 16 NVMe slots
        rig.put(list(range(i, i + 4)))
        rig.settle()
    assert rig.get([0]) == [payload(0)]  # block 0: read since written
    rig.put([16, 17, 18, 19])
    rig.settle()
    nvme_copies = [i for i in range(20) if rig.store.namespaces["a"].entries.get(key(i)) is not None
                   and rig.store.namespaces["a"].entries[key(i)].nseg is not None]
    assert 0 in nvme_copies and not {1, 2, 3, 4} & set(nvme_copies)
    assert len(nvme_copies) == 16


def test_the_clock_ring_drops_copies_that_went_away(rig):
    rig.put([1, 2, 3, 4])
    rig.settle()
    gone = [rig.store.namespaces["a"].entries[key(i)] for i in (1, 2, 3)]
    rig.store.delete(rig.session, [key(1), key(2), key(3)])
    rig.settle()
    mover, clock = rig.mover, rig.mover.order
    assert len(clock.ring) == 4 and clock.stale == 3  # removal is lazy
    clock.compact()
    assert [e.key for e in clock.ring] == [key(4)] and clock.stale == 0
    assert all(e.nflags & 7 == 0 for e in gone)  # no CLOCK bits left (the bits above count hits)
    assert mover._victim().key == key(4) and [e.key for e in clock.ring] == [key(4)]  # until the tier removes it


@pytest.mark.parametrize("policy", ["lru", "chain", "s3fifo", "sieve", "lfu"])
def test_nvme_tier_evicts_by_a_named_policy(tmp_path, policy):
    rig = Rig(tmp_path, nvme_policy=policy)
    try:
        for i in range(0, 24, 4):  # 24 blocks through 16 NVMe slots
            rig.put(list(range(i, i + 4)))
            rig.settle()
            if i == 8:
                assert rig.get([8, 9]) == [payload(8), payload(9)]  # read: the policy hears of it
        assert rig.mover.blocks == 16 and rig.mover.counters.evictions == 8
        assert len(rig.mover.order) == 16 and rig.mover.order.name == policy
        ns = rig.store.namespaces["a"]
        assert ns.blocks == len(ns.entries)
        present = rig.tiers(list(range(24)))
        assert sum(1 for t in present if t) == len(ns.entries) >= 16
        for i in [j for j in range(24) if present[j]]:  # every block still indexed reads back intact
            assert rig.get([i]) == [payload(i)]
        assert rig.store.pinned_blocks == 0
    finally:
        rig.close()


def test_a_failed_index_update_keeps_the_blocks_for_the_retry_and_loses_nothing(rig):
    """The data is durable but the index cannot record it (LMDB full, I/O error): the blocks count as not
    persisted, stay in DRAM, and the retry writes and indexes them."""
    real = rig.nvme.index.put_many

    def failing(items):
        raise OSError(errno.EIO, "injected: the index cannot be updated")

    rig.nvme.index.put_many = failing
    try:
        assert rig.put([1, 2, 3]) == [0] * 3
        rig.settle()
        s = rig.mover.stats()
        assert s["degraded"] and s["unpersisted_blocks"] == 3 and s["write_errors"] >= 3
        assert all(rig.nvme.index.get("a", key(i)) is None for i in (1, 2, 3))
        assert rig.tiers([1, 2, 3]) == bytes([TierId.DRAM] * 3)
    finally:
        rig.nvme.index.put_many = real
    rig.mover.tick()
    rig.settle()
    assert rig.mover.stats()["unpersisted_blocks"] == 0 and rig.mover.stats()["degraded"] is None
    assert all(rig.nvme.index.get("a", key(i)) is not None for i in (1, 2, 3))
    assert rig.get([1, 2, 3]) == [payload(1), payload(2), payload(3)]


def test_two_sessions_reading_the_same_nvme_only_block_share_one_promotion(rig):
    for i in range(0, 12, 4):
        rig.put(list(range(i, i + 4)))
        rig.settle()
    assert rig.tiers([0]) == bytes([TierId.NVME])
    other = Session(2, None)
    other.namespace = rig.store.namespaces["a"]
    keys = [key(0)]
    first = rig.store.acquire(rig.session, keys)
    second = rig.store.acquire(other, keys)

    async def both() -> None:
        await asyncio.gather(rig.mover.promote(rig.session, keys, first, first.promote),
                             rig.mover.promote(other, keys, second, second.promote))

    rig.loop.run_until_complete(both())
    assert first.codes == [0] and second.codes == [0]
    assert first.descriptors[0] == second.descriptors[0], "one DRAM copy, both readers pinned on it"
    assert rig.mover.counters.promoted_blocks == 1
    d = first.descriptors[0]
    assert bytes(rig.dram.view(rig.dram.segment(d.segment), d.offset // BLOCK, BLOCK)) == payload(0)
    rig.store.release(rig.session, keys)
    rig.store.release(other, keys)
    assert rig.store.pinned_blocks == 0
