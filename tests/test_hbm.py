"""The HBM tier: absent without a GPU (the daemon says so and serves from the other tiers); with one, blocks
read often are copied into a GPU arena that clients read device to device through CUDA IPC."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client
from kvrack.clients.gpu import device_span
from kvrack.tiers.hbm_ipc import probe

BLOCK = 256 * 1024
PRESENT, WHY_ABSENT = probe(0)
gpu = pytest.mark.skipif(not PRESENT, reason=f"HBM tier needs a CUDA GPU and cupy: {WHY_ABSENT}")


def start(**extra: object) -> DaemonProcess:
    settings = {"dram.capacity_bytes": "64MiB", "dram.segment_bytes": "4MiB", "nvme.enabled": "false",
                "hbm.enabled": "true", "hbm.capacity_bytes": "32MiB", "hbm.segment_bytes": "8MiB",
                "hbm.promote_after_hits": "1", **extra}
    return DaemonProcess(settings)


def blocks(n: int, seed: int = 0) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)], [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n)]


def hbm_stats(c: Client) -> dict:
    return next(t for t in c.stats()["tiers"] if t["tier"] == "hbm")


# ------------------------------------------------------------------ no GPU needed
def test_probe_gives_a_reason_when_absent():
    present, why = probe(0)
    assert present or why  # never absent without saying why
    present, why = probe(63)
    assert not present and why


@pytest.mark.skipif(PRESENT, reason="a GPU is present: the tier starts (see the GPU tests)")
def test_daemon_without_a_gpu_says_so_and_serves_from_dram():
    with start() as d:
        keys, data = blocks(4)
        with Client.connect(d.socket_path) as c:
            assert c.put(keys, data).stored == 4
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            assert c.get_into(keys, outs) == [True] * 4
            assert all(np.array_equal(a, b) for a, b in zip(outs, data))
            tier = hbm_stats(c)
            assert tier["present"] is False and tier["reason"]
            assert c.stats()["client"]["hbm_segments"] == 0
        assert "hbm tier absent:" in d.log()


def test_daemon_with_the_tier_off_says_so():
    with start(**{"hbm.enabled": "false"}) as d:
        with Client.connect(d.socket_path) as c:
            tier = hbm_stats(c)
            assert tier["present"] is False and "hbm.enabled" in tier["reason"]
        assert "hbm tier off" in d.log()


def test_arena_allocator_recarves_an_empty_segment_in_place():
    """HBM segments keep their id and memory for the daemon's life (clients hold IPC mappings of them)."""
    from kvrack.protocol import TierId
    from kvrack.tiers.dram import HeapBacking
    from kvrack.tiers.hbm import ArenaAllocator

    alloc = ArenaAllocator(TierId.HBM, 2 << 20, 1 << 20, HeapBacking())
    alloc.prefill()
    ids = {s.id: s.handle for s in alloc.segments()}
    big = [alloc.allocate("a", 512 << 10) for _ in range(4)]  # both segments, 512 KiB slots
    assert all(p is not None for p in big) and alloc.allocate("a", 512 << 10) is None
    for seg, slot in big[:2]:
        alloc.free(seg, slot)  # one segment empty again
    small = alloc.allocate("a", 64 << 10)
    assert small is not None and small[0].slot_size == 64 << 10
    assert {s.id: s.handle for s in alloc.segments()} == ids and alloc.retired == 0


def test_host_buffers_are_not_device_spans():
    assert device_span(np.zeros(8, np.uint8)) is None
    assert device_span(bytearray(8)) is None


# ------------------------------------------------------------------ GPU
def _wait_promoted(c: Client, n: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        tier = hbm_stats(c)
        if (tier["promoted_blocks"] + tier["skipped_blocks"] >= n and not tier["copies_in_flight"]) \
                or time.monotonic() > deadline:
            return tier
        time.sleep(0.02)


@gpu
def test_gpu_buffers_round_trip_through_dram_then_hbm():
    import cupy as cp

    with start() as d:
        keys, data = blocks(16)
        with Client.connect(d.socket_path) as c:
            src = [cp.asarray(a) for a in data]
            assert c.put(keys, src).stored == 16  # device to host into the reserved slots
            outs = [cp.zeros(BLOCK, cp.uint8) for _ in keys]
            assert c.get_into(keys, outs) == [True] * 16  # host to device; counts the read
            assert all(np.array_equal(cp.asnumpy(o), a) for o, a in zip(outs, data))
            tier = _wait_promoted(c, 16)
            assert tier["promoted_blocks"] == 16 and tier["blocks"] == 16
            before = c.stats()["client"]["hbm_reads"]
            outs = [cp.zeros(BLOCK, cp.uint8) for _ in keys]
            assert c.get_into(keys, outs) == [True] * 16  # device to device from the arena
            assert c.stats()["client"]["hbm_reads"] - before == 16
            assert all(np.array_equal(cp.asnumpy(o), a) for o, a in zip(outs, data))
            assert c.stats()["moves"]["dram_to_hbm"]["blocks"] == 16
            assert c.stats()["client"]["hbm_segments"] == 4


@gpu
def test_full_arena_drops_cold_copies_and_never_serves_wrong_bytes():
    import cupy as cp

    with start(**{"hbm.capacity_bytes": "16MiB", "hbm.segment_bytes": "2MiB"}) as d:  # 64 slots of 256 KiB
        keys, data = blocks(96, seed=1)
        with Client.connect(d.socket_path) as c:
            assert c.put(keys, data).stored == 96
            outs = [cp.zeros(BLOCK, cp.uint8) for _ in keys]
            for _ in range(3):  # batches of 16: a batch's own blocks are pinned while it is read
                for i in range(0, 96, 16):
                    assert c.get_into(keys[i:i + 16], outs[i:i + 16]) == [True] * 16
                    _wait_promoted(c, 0)
                assert all(np.array_equal(cp.asnumpy(o), a) for o, a in zip(outs, data))
            tier = hbm_stats(c)
            assert tier["blocks"] <= 64 and tier["dropped_blocks"] > 0


@gpu
def test_delete_and_dram_eviction_take_the_hbm_copy_along():
    import cupy as cp

    with start(**{"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "2MiB"}) as d:
        keys, data = blocks(8, seed=2)
        with Client.connect(d.socket_path) as c:
            assert c.put(keys, data).stored == 8
            outs = [cp.zeros(BLOCK, cp.uint8) for _ in keys]
            assert c.get_into(keys, outs) == [True] * 8
            assert _wait_promoted(c, 8)["blocks"] == 8
            c.delete(keys[:4])
            assert hbm_stats(c)["blocks"] == 4
            more, more_data = blocks(40, seed=3)  # pushes the rest out of DRAM
            for i in range(0, 40, 8):
                c.put(more[i:i + 8], more_data[i:i + 8])
            assert c.get_into(keys[4:], outs[4:]) == [False] * 4
            assert hbm_stats(c)["blocks"] == 0
