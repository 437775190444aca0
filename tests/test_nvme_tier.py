"""NVMe tier: durable writes, checksummed reads, warm recovery, injected faults, crash between data and index."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xxhash

from kvrack.tiers.blockio import ALIGN, DirectFile, FaultPlan, FaultyFile, aligned_buffer
from kvrack.tiers.nvme import BackingPath, ChecksumError, NvmeTier
from kvrack.tiers.nvme_index import GeometryMismatch, Record

REGION = 1 << 20
MiB = 1 << 20


def make(tmp_path, capacity=8 * MiB, plan: FaultPlan | None = None, nfiles=1, region=REGION) -> NvmeTier:
    paths = [BackingPath(str(tmp_path / f"data{i}.kvr"), capacity) for i in range(nfiles)]
    opener = DirectFile if plan is None else (lambda p, c: FaultyFile(DirectFile(p, c), plan))
    return NvmeTier(paths, str(tmp_path / "index"), region_bytes=region, io_threads=2, open_file=opener,
                    map_size=64 * MiB)


def put(tier: NvmeTier, ns: str, blocks: dict[bytes, bytes]) -> list:
    items = []
    for key, data in blocks.items():
        seg, slot = tier.allocate(ns, len(data))
        items.append((ns, key, seg, slot, memoryview(data)))
    return tier.write(items)


def rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8).tobytes()


def test_round_trip_direct_and_bounce_paths(tmp_path):
    tier = make(tmp_path)
    blocks = {b"a" * 32: rand(256 * 1024, 1), b"b" * 32: rand(1000, 2), b"c" * 32: rand(5000, 3)}
    assert put(tier, "ns", blocks) == [None, None, None]
    for key, data in blocks.items():
        assert bytes(tier.read_into("ns", key)) == data
        aligned = memoryview(aligned_buffer(len(data)))
        assert bytes(tier.read_into("ns", key, aligned)) == data  # straight into an aligned buffer
        plain = bytearray(len(data))
        tier.read_into("ns", key, memoryview(plain))
        assert bytes(plain) == data
    with pytest.raises(KeyError):
        tier.read_into("other-ns", b"a" * 32)
    s = tier.stats()
    assert s["degraded"] is None and s["bytes_written"] == sum(map(len, blocks.values()))
    tier.close()


def test_many_reads_in_flight(tmp_path):
    tier = make(tmp_path, nfiles=2, capacity=4 * MiB)
    blocks = {bytes([i]) * 32: rand(64 * 1024, i) for i in range(80)}  # spans both files
    assert put(tier, "ns", blocks) == [None] * 80
    assert {tier.location(*tier.allocate("ns", 4096))[0] for _ in range(1)} <= {0, 1}
    got = tier.read_many([("ns", k, None) for k in blocks])
    assert [bytes(g) for g in got] == list(blocks.values())
    tier.close()


def test_warm_recovery_serves_everything_and_keeps_slots_taken(tmp_path):
    tier = make(tmp_path)
    blocks = {os.urandom(32): rand(64 * 1024, i) for i in range(20)}
    put(tier, "a", blocks)
    put(tier, "b", {b"k" * 32: rand(4096, 99)})
    tier.close()
    again = make(tmp_path)
    report, live = again.recover()
    assert report.blocks == 21 and report.dropped == 0 and report.bytes == 20 * 64 * 1024 + 4096
    assert {(ns, key) for ns, key, *_ in live} == {("a", k) for k in blocks} | {("b", b"k" * 32)}
    taken = {again.location(seg, slot) for _ns, _k, seg, slot, _r in live}
    for _ in range(50):  # new allocations never land on a recovered block
        placement = again.allocate("a", 64 * 1024)
        if placement is None:
            break
        assert again.location(*placement) not in taken
    for key, data in blocks.items():
        assert bytes(again.read_into("a", key)) == data
    again.close()


def test_checksum_corruption_is_a_miss_not_data(tmp_path):
    tier = make(tmp_path)
    key = os.urandom(32)
    put(tier, "ns", {key: rand(8192, 5)})
    rec = tier.index.get("ns", key)
    with open(tmp_path / "data0.kvr", "r+b") as fh:  # flip bytes behind the daemon's back
        fh.seek(rec.offset + 100)
        fh.write(b"\xff\x00\xff")
    with pytest.raises(ChecksumError):
        tier.read_into("ns", key)
    assert tier.stats()["errors"]["checksum"] == 1
    tier.close()


def test_injected_enospc_and_eio_lose_nothing_committed(tmp_path):
    plan = FaultPlan()
    tier = make(tmp_path, plan=plan)
    good = {os.urandom(32): rand(4096, i) for i in range(3)}
    assert put(tier, "ns", good) == [None] * 3
    plan.write_errno = errno.ENOSPC
    bad_key = os.urandom(32)
    results = put(tier, "ns", {bad_key: rand(4096, 9)})
    assert isinstance(results[0], OSError) and results[0].errno == errno.ENOSPC
    assert tier.index.get("ns", bad_key) is None, "a failed write is never indexed"
    assert "write failed" in tier.stats()["degraded"]
    plan.write_errno = 0
    plan.sync_errno = errno.EIO
    results = put(tier, "ns", {os.urandom(32): rand(4096, 10)})
    assert results[0].errno == errno.EIO and tier.stats()["errors"]["sync"] == 1
    plan.sync_errno = 0
    plan.read_errno = errno.EIO
    with pytest.raises(OSError):
        tier.read_into("ns", next(iter(good)))
    plan.read_errno = 0
    for key, data in good.items():
        assert bytes(tier.read_into("ns", key)) == data
    tier.close()


def test_a_process_killed_between_data_and_index_never_serves_the_block(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        from kvrack.tiers.nvme import BackingPath, NvmeTier
        d = sys.argv[1]
        tier = NvmeTier([BackingPath(d + "/data0.kvr", 8 << 20)], d + "/index", region_bytes=1 << 20, map_size=64 << 20)
        tier.recover()
        def put(key, fill):
            seg, slot = tier.allocate("ns", 65536)
            return tier.write([("ns", key, seg, slot, memoryview(bytes([fill]) * 65536))])
        assert put(b"1" * 32, 1) == [None]
        tier.index.put_many = lambda items: os._exit(9)  # die after the data is durable, before the index
        put(b"2" * 32, 2)
    """)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 9, res.stderr
    tier = make(tmp_path)
    report, live = tier.recover()
    assert report.blocks == 1 and [k for _, k, *_ in live] == [b"1" * 32]
    assert bytes(tier.read_into("ns", b"1" * 32)) == b"\x01" * 65536
    with pytest.raises(KeyError):
        tier.read_into("ns", b"2" * 32)
    tier.close()


def test_changed_geometry_is_refused(tmp_path):
    tier = make(tmp_path)
    tier.recover()
    tier.close()
    other = make(tmp_path, region=2 * REGION)
    with pytest.raises(GeometryMismatch, match="move the index directory away"):
        other.recover()
    other.close()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NvmeTier([BackingPath(str(tmp_path / "nope" / "data.kvr"), MiB)], str(tmp_path / "index"))


def test_recovery_time_for_100k_indexed_blocks(tmp_path, capsys):
    n = 100_000
    region = 64 * MiB
    tier = make(tmp_path, capacity=n * ALIGN + region, region=region)
    tier.recover()
    per_region = region // ALIGN
    records = []
    for i in range(n):
        r, s = divmod(i, per_region)
        records.append(("ns", i.to_bytes(32, "big"), Record(0, r * region + s * ALIGN, ALIGN, ALIGN, r * region, 0,
                                                           time.time())))
    for i in range(0, n, 20_000):
        tier.index.put_many(records[i : i + 20_000])
    tier.close()
    again = make(tmp_path, capacity=n * ALIGN + region, region=region)
    report, live = again.recover()
    assert report.blocks == n and len(live) == n
    with capsys.disabled():
        print(f"\nnvme recovery of {n} indexed blocks: {report.seconds:.2f} s")
    again.close()


def test_two_records_for_one_slot_keep_the_newer(tmp_path):
    tier = make(tmp_path)
    tier.recover()
    old, new = b"o" * 32, b"n" * 32
    put(tier, "ns", {old: rand(4096, 1)})
    rec = tier.index.get("ns", old)
    data = rand(4096, 2)  # rewrite the same slot under another key, as if unindexing ``old`` had failed
    buf = aligned_buffer(4096)
    buf[:] = data
    tier.files[rec.file].pwrite(buf, rec.offset)
    tier.index.put_many([("ns", new, Record(rec.file, rec.offset, 4096, rec.slot_size, rec.region,
                                            xxhash.xxh3_64_intdigest(data), rec.created + 1))])
    tier.close()
    again = make(tmp_path)
    report, live = again.recover()
    assert [k for _, k, *_ in live] == [new] and report.dropped == 1
    assert again.index.get("ns", old) is None
    assert bytes(again.read_into("ns", new)) == data
    again.close()
