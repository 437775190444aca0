"""The CXL tier in the daemon: regions per namespace, copies behind commits, clients reading without requests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client, TierId
from kvrack.clients.core import TOUCH_BATCH
from kvrack.tiers.cxl import CxlRegion
from tests.conftest import eventually

BLOCK = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def region_dir():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="kvrack-cxl-test-", dir=base) as d:
        yield d


def start(region_dir: str, config: str | None = None, **extra: object) -> DaemonProcess:
    settings = {"dram.capacity_bytes": "16MiB", "dram.segment_bytes": "2MiB", "nvme.enabled": "false",
                "cxl.enabled": "true", "cxl.dir": region_dir, "cxl.capacity_bytes": "96MiB",
                "cxl.chunk_bytes": "1MiB", **extra}
    return DaemonProcess(settings, config_path=config)


def blocks(n: int, seed: int = 0) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)], [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n)]


def settle(client: Client, want_blocks: int, timeout: float = 60.0) -> dict:
    """Wait until the daemon has copied (or given up on) ``want_blocks`` blocks into CXL in all."""
    deadline = time.monotonic() + timeout
    while True:
        cxl = next(t for t in client.stats()["tiers"] if t["tier"] == "cxl")
        if cxl["copied_blocks"] + cxl["skipped_blocks"] >= want_blocks and not cxl["copies_in_flight"]:
            return cxl
        if time.monotonic() > deadline:
            raise AssertionError(f"{want_blocks} CXL copies not settled after {timeout} s: {cxl}")
        time.sleep(0.02)


def fill(d: DaemonProcess, n: int) -> tuple[list[bytes], list[np.ndarray]]:
    """Store n blocks in batches that fit DRAM while they are written, and wait for their CXL copies."""
    keys, data = blocks(n)
    with Client.connect(d.socket_path) as c:
        for i in range(0, n, 8):
            c.put(keys[i:i + 8], data[i:i + 8])
        settle(c, n)
    return keys, data


def requests(client: Client) -> int:
    """Requests this client has sent (the stats call that asks included)."""
    return client.stats()["client"]["requests"]


def test_hits_in_cxl_are_read_without_asking_the_daemon(region_dir):
    d = start(region_dir)
    try:
        keys, data = blocks(40)  # 40 MiB: more than DRAM (16 MiB) holds
        with Client.connect(d.socket_path) as writer:
            for i in range(0, 40, 8):
                writer.put(keys[i:i + 8], data[i:i + 8])
            cxl = settle(writer, 40)
            assert cxl["blocks"] == 40 and cxl["copied_blocks"] == 40
        with Client.connect(d.socket_path) as reader:
            before = requests(reader)
            found = reader.lookup(keys)
            assert found.prefix == 40 and set(found.tiers) == {TierId.CXL}
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            assert reader.get_into(keys, outs) == [True] * 40
            assert all(np.array_equal(o, w) for o, w in zip(outs, data))
            assert requests(reader) == before + 1, "only the stats call itself reached the daemon"
            # a put of blocks the region holds sends nothing
            assert reader.put(keys[:4], data[:4]).existing == 4
    finally:
        d.stop()


def test_delete_removes_the_cxl_copy_too(region_dir):
    d = start(region_dir)
    try:
        keys, data = fill(d, 24)
        with Client.connect(d.socket_path) as c:
            # the first keys left DRAM (16 MiB); the last are in both tiers
            assert c.delete(keys[:3] + keys[-3:]) == 6
            assert c.lookup(keys[:3]).prefix == 0 and c.lookup(keys[-3:]).prefix == 0
            outs = [np.zeros(BLOCK, np.uint8) for _ in range(6)]
            assert c.get_into(keys[:3] + keys[-3:], outs) == [False] * 6
            assert c.lookup(keys[3:-3]).prefix == 18
    finally:
        d.stop()


READER = textwrap.dedent("""
    import sys, numpy as np, xxhash
    from kvrack.clients import Client
    path, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    keys = [rng.bytes(32) for _ in range(n)]
    want = [xxhash.xxh3_64_hexdigest(rng.integers(0, 256, 1 << 20, dtype=np.uint8)) for _ in range(n)]
    with Client.connect(path) as c:
        before = c.stats()["client"]["requests"]
        outs = [np.zeros(1 << 20, np.uint8) for _ in keys]
        hits = c.get_into(keys, outs)
        ok = all(hits) and [xxhash.xxh3_64_hexdigest(o) for o in outs] == want
        print("ok" if ok else "BAD", c.stats()["client"]["requests"] - before - 1)  # this client's requests
""")


def test_other_processes_read_the_region_directly(region_dir):
    d = start(region_dir)
    try:
        keys, data = blocks(20)
        with Client.connect(d.socket_path) as c:
            for i in range(0, 20, 5):  # a batch must fit DRAM (16 MiB) while it is being written
                c.put(keys[i:i + 5], data[i:i + 5])
            settle(c, 20)
        procs = [subprocess.Popen([sys.executable, "-c", READER, d.socket_path, "20"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert out.split() == ["ok", "0"]
    finally:
        d.stop()


def test_each_namespace_has_its_own_region(region_dir, tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[[namespaces]]\nname = "a"\n[[namespaces]]\nname = "b"\n')
    d = start(region_dir, str(cfg))
    try:
        keys, data = blocks(4)
        with Client.connect(d.socket_path, namespace="a") as a:
            a.put(keys, data)
            settle(a, 4)
            assert a._core.cxl.namespace == "a"
        with Client.connect(d.socket_path, namespace="b") as b:
            assert b._core.cxl.namespace == "b"
            assert b.lookup(keys).prefix == 0
            assert b.get_into(keys, [np.zeros(BLOCK, np.uint8) for _ in keys]) == [False] * 4
            cxl = next(t for t in b.stats()["tiers"] if t["tier"] == "cxl")
            assert list(cxl["regions"]) == ["b"] and cxl["blocks"] == 0, "b sees its own region's figures only"
        with pytest.raises(PermissionError, match="belongs to namespace 'a'"):
            CxlRegion.open(os.path.join(region_dir, "kvrack-cxl-a"), namespace="b")
    finally:
        d.stop()


def test_region_blocks_outlive_a_restart(region_dir):
    keys, data = blocks(6)
    d = start(region_dir)
    try:
        with Client.connect(d.socket_path) as c:
            c.put(keys, data)
            settle(c, 6)
    finally:
        d.stop()
    d = start(region_dir)
    try:
        with Client.connect(d.socket_path) as c:
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            assert c.get_into(keys, outs) == [True] * 6
            assert all(np.array_equal(o, w) for o, w in zip(outs, data))
            region = next(t for t in c.stats()["tiers"] if t["tier"] == "cxl")["regions"]["default"]
            assert region["tracked_blocks"] == 6, "the re-adopted blocks are in the eviction order"
        assert "adopted" in d.log()
    finally:
        d.stop()


def test_remote_client_on_the_same_fabric_opens_the_region_by_path(region_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "cxl-remote-token-0123456789abcdef"
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[[namespaces]]\nname = "default"\ntoken = "{token}"\n')
    d = start(region_dir, str(cfg), **{"tcp.enabled": "true", "tcp.host": "127.0.0.1", "tcp.port": port,
                                       "tcp.nixl": "off"})
    try:
        keys, data = blocks(5)
        with Client.connect(d.socket_path) as c:
            c.put(keys, data)
            settle(c, 5)
        with Client.connect(f"tcp://127.0.0.1:{port}", token=token) as r:
            assert r._core.cxl is not None
            before = requests(r)
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            assert r.get_into(keys, outs) == [True] * 5
            assert all(np.array_equal(o, w) for o, w in zip(outs, data))
            assert requests(r) == before + 1
    finally:
        d.stop()


def test_clients_that_cannot_map_the_region_are_served_from_it(region_dir):
    """A block DRAM evicted lives on in CXL: a client without the region (the TCP byte stream, a host off
    the fabric) still finds it (lookup says CXL) and gets it (the daemon copies it back up into DRAM)."""
    import socket as _socket

    from kvrack import protocol as P
    from tests.conftest import recv_exact as exact
    from tests.conftest import recv_frame as recv
    from tests.conftest import send_frame as send

    d = start(region_dir)
    try:
        keys, data = fill(d, 24)
        gone = keys[:4]  # the oldest blocks left DRAM (16 MiB holds 16)
        s = _socket.socket(_socket.AF_UNIX)
        s.connect(d.socket_path)
        send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
        recv(s)
        send(s, {"op": "lookup", "id": 2, "keys": keys})
        found = recv(s)
        assert found["prefix"] == 24 and set(found["tiers"][:4]) == {P.TierId.CXL}
        send(s, {"op": "read", "id": 3, "keys": gone})
        reply = recv(s)
        assert reply["codes"] == [0] * 4 and reply["lengths"] == [BLOCK] * 4
        for i in range(4):
            assert exact(s, BLOCK) == data[i].tobytes()
        send(s, {"op": "lookup", "id": 4, "keys": gone})
        assert set(recv(s)["tiers"]) == {P.TierId.DRAM}, "copied back up into DRAM"
        s.close()
        with Client.connect(d.socket_path) as c:
            assert next(t for t in c.stats()["tiers"] if t["tier"] == "cxl")["promoted_blocks"] == 4
    finally:
        d.stop()


def test_status_shows_the_cxl_tier(region_dir):
    d = start(region_dir)
    try:
        res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", d.socket_path],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "cxl" in res.stdout and "dram" in res.stdout
    finally:
        d.stop()


def test_a_full_region_evicts_and_what_it_holds_reads_back_intact(region_dir):
    d = start(region_dir, **{"cxl.capacity_bytes": "24MiB"})  # room for about 20 blocks of 1 MiB
    try:
        keys, data = fill(d, 48)
        with Client.connect(d.socket_path) as c:
            cxl = next(t for t in c.stats()["tiers"] if t["tier"] == "cxl")
            region = cxl["regions"]["default"]
            # the daemon's order chose every victim ahead of the copies: the region's own clock never had to
            assert cxl["policy_evictions"] > 0 and region["evictions"] == 0 and cxl["blocks"] <= region["chunks"]
            assert region["policy"] == "lru" and region["tracked_blocks"] == cxl["blocks"]
            assert cxl["copied_blocks"] + cxl["skipped_blocks"] == 48
            outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
            hits = c.get_into(keys, outs)  # from CXL, DRAM, or not at all: never wrong bytes
            for hit, out, want in zip(hits, outs, data):
                assert not hit or np.array_equal(out, want)
            assert sum(hits) >= 16 + 1  # the DRAM tier alone holds 16
    finally:
        d.stop()


def test_region_eviction_follows_reads_clients_report_and_keeps_chains_whole(region_dir):
    """Clients read the region without asking the daemon, and report those reads in batches (touch): a chain
    read again and again outlives blocks stored after it, and a chain leaves the region tail first."""
    d = start(region_dir, **{"cxl.capacity_bytes": "24MiB"})  # room for about 20 blocks of 1 MiB
    try:
        keys, data = blocks(60)
        hot, cold_chain, rest = keys[:4], keys[4:8], keys[8:]
        with Client.connect(d.socket_path) as c:
            c.put(hot, data[:4], parents=[None] + hot[:-1])
            c.put(cold_chain, data[4:8], parents=[None] + cold_chain[:-1])
            settle(c, 8)
            outs = [np.zeros(BLOCK, np.uint8) for _ in hot]
            for i in range(0, 52, 4):  # 4 blocks at a time behind the chains; the hot chain is read in between,
                for _ in range(TOUCH_BATCH // 4):  # often enough that each round's reads are reported
                    assert c.get_into(hot, outs) == [True] * 4
                c.put(rest[i:i + 4], data[8 + i:12 + i])
                settle(c, 12 + i)
            assert c.stats()["client"]["touch_reports"] >= 1
            # the hot chain's blocks stay put between reads: after the first read of each, no invalidation
            client = c.stats()["client"]
            assert client["cxl_reads_invalidated"] >= 4 and client["cxl_reads_unchanged"] > client["cxl_reads_invalidated"]
            cxl = next(t for t in c.stats()["tiers"] if t["tier"] == "cxl")
            region = cxl["regions"]["default"]
            assert cxl["policy_evictions"] > 0 and region["touches"] >= 4
        region = CxlRegion.open(os.path.join(region_dir, "kvrack-cxl-default"))
        try:
            held = [region.size_of(k) is not None for k in keys]
        finally:
            region.close()
        assert held[:4] == [True] * 4, "the chain read all along stays"
        assert not any(held[4:8]), "the chain nobody read went, as the oldest"
        assert not all(held[8:]) and any(held[8:])
        # within a chain the tail goes first: never a kept block behind an evicted head
        for chain in (held[:4], held[4:8]):
            assert chain == sorted(chain, reverse=True)
    finally:
        d.stop()


def test_blocks_copied_back_up_from_cxl_count_toward_the_namespaces_dram_quota(region_dir):
    """A read that brings blocks up from the region into DRAM makes room among the namespace's own blocks
    when it is at its DRAM quota, as a read from NVMe does: the quota holds."""
    import socket as _socket

    from kvrack import protocol as P
    from tests.conftest import recv_exact as exact
    from tests.conftest import recv_frame as recv
    from tests.conftest import send_frame as send

    d = start(region_dir)
    try:
        keys, data = fill(d, 24)
        d.admin().set_quota("default", dram_blocks=12)
        assert eventually(lambda: d.admin().quota("default")["dram_blocks"] <= 12)
        with Client.connect(d.socket_path) as c:
            tiers = c.lookup(keys).tiers
        cxl_only = [i for i, t in enumerate(tiers) if t == P.TierId.CXL][:4]
        assert len(cxl_only) == 4
        s = _socket.socket(_socket.AF_UNIX)  # a client that cannot map the region: the daemon copies them up
        s.connect(d.socket_path)
        send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
        recv(s)
        send(s, {"op": "read", "id": 2, "keys": [keys[i] for i in cxl_only]})
        reply = recv(s)
        assert reply["codes"] == [0] * 4
        for i in cxl_only:
            assert exact(s, BLOCK) == data[i].tobytes()
        s.close()
        with Client.connect(d.socket_path) as c:
            assert next(t for t in c.stats()["tiers"] if t["tier"] == "cxl")["promoted_blocks"] == 4
        assert d.admin().quota("default")["dram_blocks"] <= 12, "the promotion made room among its own blocks"
    finally:
        d.stop()
