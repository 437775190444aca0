"""The NVMe tier inside a real daemon: warm restart after kill -9, reads of NVMe-only blocks, corruption, faults."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client
from kvrack.protocol import TierId

from .conftest import eventually

BLOCK = 256 * 1024


def settings(tmp_path, **extra) -> dict:
    s = {"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB", "nvme.dir": str(tmp_path / "nvme"),
         "nvme.capacity_bytes": "64MiB", "nvme.region_bytes": "1MiB"}
    s.update(extra)
    return s


def blocks(n: int, seed: int) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)], [rng.integers(0, 255, BLOCK, dtype=np.uint8) for _ in range(n)]


def nvme_stats(c: Client) -> dict:
    return next(t for t in c.stats()["tiers"] if t["tier"] == "nvme")


def persisted(c: Client) -> bool:
    return nvme_stats(c)["pending_writes"] == 0


def put_persisted(c: Client, keys: list[bytes], data: list[np.ndarray], chunk: int = 16) -> None:
    for i in range(0, len(keys), chunk):  # the DRAM tier holds 32 blocks; writes in flight hold theirs
        c.put(keys[i : i + chunk], data[i : i + chunk])
        assert eventually(lambda: persisted(c))


def read_all(c: Client, keys: list[bytes]) -> tuple[list[bool], list[np.ndarray]]:
    outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
    return c.get_into(keys, outs), outs


def test_kill_9_then_restart_serves_every_committed_block_bit_identical(tmp_path):
    keys, data = blocks(48, 1)  # more than the DRAM tier holds: some are on NVMe only before the crash
    with DaemonProcess(settings(tmp_path)) as d:
        with Client.connect(d.socket_path) as c:
            put_persisted(c, keys, data)
            tiers = c.lookup(keys).tiers
            assert set(tiers) == {TierId.DRAM, TierId.NVME} and c.lookup(keys).prefix == 48
        d.kill()
    d2 = DaemonProcess(settings(tmp_path))
    try:
        assert "recovered 48 block(s), 12MiB" in d2.log()
        with Client.connect(d2.socket_path) as c:
            res = c.lookup(keys)
            assert res.prefix == 48 and set(res.tiers) == {TierId.NVME}
            hits, outs = read_all(c, keys)
            assert all(hits)
            assert all(np.array_equal(o, x) for o, x in zip(outs, data))
            s = nvme_stats(c)
            assert s["recovered"]["blocks"] == 48 and s["promoted_blocks"] == 48 and s["read_errors"] == 0
            assert TierId.DRAM in c.lookup(keys).tiers  # read back into DRAM: the next reader is served from memory
    finally:
        d2.stop()


@pytest.mark.parametrize("policy", ["lru", "chain"])
def test_dram_eviction_keeps_blocks_on_nvme_and_a_get_promotes_them(tmp_path, policy):
    keys, data = blocks(64, 2)
    with DaemonProcess(settings(tmp_path, **{"dram.policy": policy})) as d, Client.connect(d.socket_path) as c:
        put_persisted(c, keys, data)
        assert c.lookup(keys[:8]).tiers == bytes([TierId.NVME]) * 8  # the oldest left DRAM
        with c.get(keys[:4]) as lease:  # zero-copy lease of promoted blocks
            assert all(bytes(v) == data[i].tobytes() for i, v in enumerate(lease.views))
        assert c.lookup(keys[:4]).tiers == bytes([TierId.DRAM]) * 4
        stats = c.stats()
        assert stats["namespaces"]["default"]["blocks"] == 64
        dram = stats["tiers"][0]
        assert dram["blocks"] <= 32 and dram["pinned_blocks"] == 0


def test_sigterm_flushes_queued_writes_before_exit(tmp_path):
    keys, data = blocks(16, 3)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        c.put(keys, data)  # no wait: SIGTERM must finish the NVMe copies
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        hits, outs = read_all(c, keys)
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, data))


def test_deleted_blocks_stay_deleted_after_restart(tmp_path):
    keys, data = blocks(8, 4)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        put_persisted(c, keys, data)
        assert c.delete(keys[:3]) == 3
        assert eventually(lambda: persisted(c) and nvme_stats(c)["blocks"] == 5)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        assert c.lookup(keys).tiers == bytes([0] * 3 + [TierId.NVME] * 5)
        c.put(keys[:1], data[1:2])  # a deleted key can be stored again, with other bytes
        assert eventually(lambda: persisted(c))
        hits, outs = read_all(c, keys[:1])
        assert hits == [True] and np.array_equal(outs[0], data[1])


def test_flipped_bytes_on_disk_are_a_miss_and_an_error_metric(tmp_path):
    keys, data = blocks(4, 5)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        put_persisted(c, keys, data)
    path = tmp_path / "nvme" / "kvrack-nvme.data"
    raw = path.read_bytes()
    where = raw.find(data[2].tobytes())
    assert where >= 0
    with open(path, "r+b") as fh:
        fh.seek(where + 1000)
        fh.write(b"\x00\xff\x00\xff")
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        hits, outs = read_all(c, keys)
        assert hits == [True, True, False, True]
        assert np.array_equal(outs[3], data[3]) and not outs[2].any(), "corrupt bytes never reach the caller"
        s = nvme_stats(c)
        assert s["errors"]["checksum"] == 1 and s["read_errors"] == 1
        assert c.lookup(keys).tiers[2] == 0, "a block that failed its checksum is gone, not served later"


def test_a_missing_nvme_directory_stops_the_daemon_by_default(tmp_path):
    bad = settings(tmp_path, **{"nvme.paths": str(tmp_path / "no-such-dir" / "data=64MiB")})
    with pytest.raises(RuntimeError, match=r"exited with 1(.|\n)*the nvme tier cannot open(.|\n)*does not exist"
                                           r"(.|\n)*nvme.required = true") as err:
        DaemonProcess(bad)
    assert "dram tier ready" not in str(err.value), "nothing is allocated before the tier that cannot open"


def test_a_missing_nvme_directory_leaves_dram_serving(tmp_path):
    bad = settings(tmp_path, **{"nvme.paths": str(tmp_path / "no-such-dir" / "data=64MiB"), "nvme.required": "false"})
    keys, data = blocks(2, 6)
    with DaemonProcess(bad) as d, Client.connect(d.socket_path) as c:
        nvme = nvme_stats(c)
        assert nvme["available"] is False and "does not exist" in nvme["degraded"]
        c.put(keys, data)
        hits, outs = read_all(c, keys)
        assert all(hits) and np.array_equal(outs[1], data[1])
        assert "nvme tier unavailable, serving from DRAM only" in d.log()


def test_a_second_daemon_on_the_same_nvme_files_stops_before_allocating(tmp_path):
    with DaemonProcess(settings(tmp_path)) as first:
        with pytest.raises(RuntimeError, match=r"in use by pid \d+") as err:
            DaemonProcess(settings(tmp_path))
        assert "dram tier ready" not in str(err.value)
        with Client.connect(first.socket_path) as c:
            assert nvme_stats(c)["degraded"] is None


def test_two_daemons_never_share_nvme_files(tmp_path):
    with DaemonProcess(settings(tmp_path)) as first, \
            DaemonProcess(settings(tmp_path, **{"nvme.required": "false"})) as second:
        with Client.connect(second.socket_path) as c:
            assert "in use by pid" in nvme_stats(c)["degraded"]
        with Client.connect(first.socket_path) as c:
            assert nvme_stats(c)["degraded"] is None


def test_truncated_file_behind_our_back_is_degraded_not_fatal(tmp_path):
    keys, data = blocks(40, 7)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        put_persisted(c, keys, data)
        os.truncate(tmp_path / "nvme" / "kvrack-nvme.data", 4096)  # the oldest blocks are on NVMe only
        hits, _ = read_all(c, keys[:4])
        assert hits == [False] * 4
        s = nvme_stats(c)
        assert s["degraded"] and "truncated" in s["degraded"] and s["read_errors"] == 4
        more_keys, more = blocks(2, 8)
        c.put(more_keys, more)  # DRAM keeps serving
        hits, outs = read_all(c, more_keys)
        assert all(hits) and np.array_equal(outs[0], more[0])


def test_a_writer_faster_than_the_disk_is_slowed_not_refused(tmp_path):
    keys, data = blocks(84, 9)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        for i in range(0, 84, 28):  # each put nearly fills DRAM; the previous one is still being written
            c.put(keys[i : i + 28], data[i : i + 28])
        assert eventually(lambda: persisted(c))
        assert c.stats()["ops"]["no_space"] == 0 and nvme_stats(c)["blocks"] == 84
        hits, outs = read_all(c, keys[:8])
        assert all(hits) and np.array_equal(outs[7], data[7])


def test_status_shows_both_tiers_and_an_unavailable_one(tmp_path):
    import subprocess
    import sys

    for extra, expect in (({}, "nvme: pending writes 0"),
                          ({"nvme.paths": str(tmp_path / "none" / "x=64MiB"), "nvme.required": "false"},
                           "nvme tier unavailable")):
        with DaemonProcess(settings(tmp_path, **extra)) as d:
            out = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", d.socket_path],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
            assert out.returncode == 0, out.stderr
            assert "dram" in out.stdout and expect in out.stdout


def test_prefetch_brings_nvme_only_blocks_up_before_a_get(tmp_path):
    keys, data = blocks(48, 7)
    with DaemonProcess(settings(tmp_path)) as d, Client.connect(d.socket_path) as c:
        put_persisted(c, keys, data)
        cold = keys[:8]
        assert c.lookup(cold).tiers == bytes([TierId.NVME]) * 8
        assert c.prefetch(cold + [b"\x01" * 32], wait=True) == 8  # the unknown key is not counted
        assert c.lookup(cold).tiers == bytes([TierId.DRAM]) * 8
        stats = c.stats()
        assert stats["tiers"][0]["pinned_blocks"] == 0, "a prefetch leaves nothing pinned"
        assert stats["ops"]["prefetched_blocks"] == 8 and stats["ops"]["get_keys"] == 0
        assert stats["moves"]["nvme_to_dram"]["blocks"] == 8
        assert stats["moves"]["dram_to_nvme"]["blocks"] == 48
        # without wait: the reply comes at once, the blocks follow
        colder = [k for k, t in zip(keys, c.lookup(keys).tiers) if t == TierId.NVME][:4]
        assert c.prefetch(colder) == 4
        assert eventually(lambda: c.lookup(colder).tiers == bytes([TierId.DRAM]) * 4)
        hits, outs = read_all(c, cold + colder)
        assert all(hits) and all(np.array_equal(o, data[keys.index(k)]) for o, k in zip(outs, cold + colder))
        assert eventually(lambda: c.stats()["tiers"][0]["pinned_blocks"] == 0)


@pytest.mark.parametrize("high_watermark", ["1.0", "0.9"])  # evicting inline only, and in the background too
def test_reused_admission_demotes_read_blocks_and_drops_one_time_ones(tmp_path, high_watermark):
    """nvme.admission = reused: nothing is written at commit; DRAM's eviction writes the blocks that were
    read back to NVMe (demotion) and drops the ones nobody asked for again."""
    s = settings(tmp_path, **{"nvme.admission": "reused", "dram.evict_high_watermark": high_watermark,
                              "dram.evict_low_watermark": "0.8"})
    hot_keys, hot = blocks(8, 11)
    cold_keys, cold = blocks(24, 12)
    with DaemonProcess(s) as d, Client.connect(d.socket_path) as c:
        c.put(hot_keys, hot)
        assert nvme_stats(c)["written_blocks"] == 0, "no write-through under this rule"
        hits, _ = read_all(c, hot_keys)  # reused: these earn a place on NVMe
        assert all(hits)
        c.put(cold_keys[:16], cold[:16])
        for i in range(16, 24, 4):  # DRAM (32 blocks) overflows: the oldest are evicted
            c.put(cold_keys[i:i + 4], cold[i:i + 4])
        more_keys, more = blocks(24, 13)
        for i in range(0, 24, 4):
            c.put(more_keys[i:i + 4], more[i:i + 4])
        assert eventually(lambda: nvme_stats(c)["pending_writes"] == 0)
        n = nvme_stats(c)
        assert n["demoted_blocks"] >= 8 and n["written_blocks"] == n["demoted_blocks"]
        tiers = c.lookup(hot_keys).tiers
        assert set(tiers) == {TierId.NVME}, "the read blocks left DRAM for NVMe"
        hits, outs = read_all(c, hot_keys)  # promoted back, bytes identical
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, hot))
        # one-time blocks that were evicted are gone, not written
        dropped = [k for k, t in zip(cold_keys, c.lookup(cold_keys).tiers) if t == 0]
        assert dropped, "some one-time blocks were evicted"
        assert n["written_blocks"] < 8 + len(cold_keys) + len(more_keys) - 32
        assert c.stats()["tiers"][0]["pinned_blocks"] == 0
