"""I/O faults injected into a running daemon's NVMe tier (``nvme.fault_plan``: EIO and torn writes, slow I/O,
EIO on reads) under load: puts keep succeeding, the tier says it is degraded and recovers, the blocks it could
not write are written on the retry, nothing hangs, a bad copy is a miss, and no read ever returns wrong bytes,
after a restart included."""

from __future__ import annotations

import json
import os

import blake3
import numpy as np

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client
from tests.conftest import eventually

SIZE = 64 << 10


def content(key: bytes) -> np.ndarray:
    """A block's bytes follow from its key: any read can be checked."""
    return np.frombuffer(blake3.blake3(key).digest(length=SIZE), dtype=np.uint8)


def keys_of(first: int, n: int) -> list[bytes]:
    return [blake3.blake3(f"fault-{i}".encode()).digest() for i in range(first, first + n)]


def put(c: Client, keys: list[bytes]) -> None:
    for i in range(0, len(keys), 16):
        assert c.put(keys[i:i + 16], [content(k) for k in keys[i:i + 16]]).stored == len(keys[i:i + 16])


def read_back(c: Client, keys: list[bytes]) -> list[bool]:
    """Hits per key; every hit is checked against the block's bytes."""
    outs = [np.zeros(SIZE, np.uint8) for _ in keys]
    hits = list(c.get_into(keys, outs))
    for key, out, hit in zip(keys, outs, hits):
        assert not hit or np.array_equal(out, content(key)), f"wrong bytes for {key.hex()}"
    return hits


def nvme(c: Client) -> dict:
    return next(t for t in c.stats()["tiers"] if t["tier"] == "nvme")


def test_io_faults_under_load_degrade_and_recover_without_losing_or_corrupting_a_block(tmp_path):
    plan = tmp_path / "faults.json"

    def inject(**faults: object) -> None:
        tmp = plan.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        os.replace(tmp, plan)

    inject()
    settings = {"dram.capacity_bytes": "16MiB", "dram.segment_bytes": "4MiB", "nvme.dir": str(tmp_path / "nvme"),
                "nvme.capacity_bytes": "256MiB", "nvme.region_bytes": "4MiB", "nvme.retry_interval_s": "0.5",
                "nvme.fault_plan": str(plan)}
    first = keys_of(0, 48)
    later = keys_of(1000, 400)
    with DaemonProcess(settings) as d, Client.connect(d.socket_path) as c:
        # writes fail (each after tearing half its bytes): puts succeed, the blocks stay in DRAM for the retry
        inject(write_errno="EIO", torn_writes=True)
        put(c, first)
        assert eventually(lambda: nvme(c)["write_errors"] > 0 and nvme(c)["degraded"], timeout=30)
        assert read_back(c, first) == [True] * len(first)
        # the disk heals: the retry writes every kept block, the tier reports healthy again
        inject()
        assert eventually(lambda: (lambda s: s["unpersisted_blocks"] == 0 and not s["degraded"]
                                   and s["pending_writes"] == 0)(nvme(c)), timeout=60)
        # more blocks than DRAM holds: the first ones leave DRAM, their NVMe copies stay
        put(c, later)
        assert eventually(lambda: nvme(c)["pending_writes"] == 0, timeout=60)
        on_nvme_only = [k for k, t in zip(first, c.lookup(first).tiers) if t == 4]
        assert len(on_nvme_only) >= 16, "enough of the first blocks live on NVMe only"
        # slow I/O: reads back from NVMe take long, and still complete with the right bytes
        inject(delay_s=0.2)
        assert read_back(c, on_nvme_only[:4]) == [True] * 4
        # reads fail: a miss, never wrong bytes; the unreadable copies are dropped
        inject(read_errno="EIO")
        assert read_back(c, on_nvme_only[4:12]) == [False] * 8
        inject()
        assert read_back(c, on_nvme_only[4:12]) == [False] * 8
        assert nvme(c)["read_errors"] >= 8
        assert all(read_back(c, later[-8:]))  # the rest of the cache serves on
    # a restart reads the index the faults left: every block it still names has its own bytes
    with DaemonProcess(settings) as d, Client.connect(d.socket_path) as c:
        everything = first + later
        dropped = set(on_nvme_only[4:12])
        assert read_back(c, everything) == [k not in dropped for k in everything], \
            "every block written through survives, the unreadable copies stay gone"
