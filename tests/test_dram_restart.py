"""DRAM segments kept over a clean restart (dram.shm_dir): re-adopted after SIGTERM, cold after kill -9."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile

import msgspec
import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client
from kvrack.protocol import TierId
from kvrack.tiers.dram_state import (
    MAPPED_MAGIC,
    MAPPED_STATE,
    STATE_FILE,
    ShmDirBacking,
    read_state_bytes,
    take_state,
    write_state_bytes,
)

from .conftest import eventually

BLOCK = 256 * 1024  # the DRAM tier below holds 32 of them


@pytest.fixture
def shm_dir():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="kvrack-test-", dir=base)
    yield os.path.join(path, "dram")
    shutil.rmtree(path, ignore_errors=True)


def settings(shm_dir: str, tmp_path, nvme: bool = False, **extra) -> dict:
    s = {"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB", "dram.shm_dir": shm_dir,
         "nvme.enabled": str(nvme).lower(), "nvme.dir": str(tmp_path / "nvme"), "nvme.capacity_bytes": "64MiB",
         "nvme.region_bytes": "1MiB", "dram.evict_high_watermark": "1.0"}  # exact LRU order, full capacity
    s.update(extra)
    return s


def blocks(n: int, seed: int) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)], [rng.integers(0, 255, BLOCK, dtype=np.uint8) for _ in range(n)]


def segment_files(shm_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(shm_dir) if n.endswith(".seg"))


def read_all(c: Client, keys: list[bytes]) -> tuple[list[bool], list[np.ndarray]]:
    outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
    return c.get_into(keys, outs), outs


def test_clean_restart_re_adopts_dram_blocks_bit_identical_in_lru_order(shm_dir, tmp_path):
    keys, data = blocks(20, 1)
    with DaemonProcess(settings(shm_dir, tmp_path)) as d, Client.connect(d.socket_path) as c:
        c.put(keys, data)
        c.get_into(keys[:2], [np.zeros(BLOCK, np.uint8)] * 2)  # the two oldest become the most recent
    assert os.path.exists(os.path.join(shm_dir, STATE_FILE))
    files = segment_files(shm_dir)
    assert len(files) == 8  # every segment kept while the daemon is down
    with DaemonProcess(settings(shm_dir, tmp_path)) as d2, Client.connect(d2.socket_path) as c:
        assert "re-adopted 20 block(s), 5MiB" in d2.log()
        assert not os.path.exists(os.path.join(shm_dir, STATE_FILE))  # taken at start: a crash now starts cold
        kept = set(segment_files(shm_dir)) & set(files)
        assert len(kept) == 5 and len(segment_files(shm_dir)) == 8  # the 5 holding blocks; empty ones made anew
        res = c.lookup(keys)
        assert res.prefix == 20 and set(res.tiers) == {TierId.DRAM}
        # recency survived: 20 new blocks need 8 slots, taken from the least recently used
        more, more_data = blocks(20, 2)
        c.put(more, more_data)
        tiers = c.lookup(keys).tiers
        assert [i for i, t in enumerate(tiers) if t == 0] == list(range(2, 10))
        survivors = keys[:2] + keys[10:]
        hits, outs = read_all(c, survivors)
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, data[:2] + data[10:]))


def test_kill_9_starts_cold_and_removes_the_stale_segments(shm_dir, tmp_path):
    keys, data = blocks(8, 3)
    d = DaemonProcess(settings(shm_dir, tmp_path))
    try:
        with Client.connect(d.socket_path) as c:
            c.put(keys, data)
        old = segment_files(shm_dir)
    finally:
        d.kill()
    with DaemonProcess(settings(shm_dir, tmp_path)) as d2, Client.connect(d2.socket_path) as c:
        assert "starting cold: no clean-shutdown state" in d2.log()
        assert "removed 8 stale segment file(s)" in d2.log()
        assert not set(old) & set(segment_files(shm_dir)) and len(segment_files(shm_dir)) == 8
        assert c.lookup(keys).prefix == 0
        c.put(keys, data)  # the tier works normally after a cold start
        hits, outs = read_all(c, keys)
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, data))


def test_clean_restart_with_nvme_merges_dram_copies_with_recovered_nvme_blocks(shm_dir, tmp_path):
    keys, data = blocks(48, 4)  # more than DRAM holds: the oldest 16 are on NVMe only at shutdown

    def persisted(c: Client) -> bool:
        return next(t for t in c.stats()["tiers"] if t["tier"] == "nvme")["pending_writes"] == 0

    with DaemonProcess(settings(shm_dir, tmp_path, nvme=True)) as d, Client.connect(d.socket_path) as c:
        for i in range(0, 48, 16):
            c.put(keys[i: i + 16], data[i: i + 16])
            assert eventually(lambda: persisted(c))
        before = c.lookup(keys).tiers
    with DaemonProcess(settings(shm_dir, tmp_path, nvme=True)) as d2, Client.connect(d2.socket_path) as c:
        log = d2.log()
        assert "recovered 48 block(s)" in log and "re-adopted 32 block(s), 8MiB" in log
        assert c.lookup(keys).tiers == before
        assert before[:16] == bytes([TierId.NVME]) * 16 and before[16:] == bytes([TierId.DRAM]) * 32
        hits, outs = read_all(c, keys)
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, data))
        nvme = next(t for t in c.stats()["tiers"] if t["tier"] == "nvme")
        assert nvme["written_blocks"] == 0  # re-adopted blocks already had their NVMe copy: nothing rewritten


def test_changed_segment_size_starts_cold_with_the_reason(shm_dir, tmp_path):
    keys, data = blocks(4, 5)
    with DaemonProcess(settings(shm_dir, tmp_path)) as d, Client.connect(d.socket_path) as c:
        c.put(keys, data)
    with DaemonProcess(settings(shm_dir, tmp_path, **{"dram.segment_bytes": "2MiB"})) as d2:
        assert "starting cold: dram.segment_bytes changed (1048576 -> 2097152)" in d2.log()
        assert len(segment_files(shm_dir)) == 4


def test_a_missing_segment_file_starts_cold(shm_dir, tmp_path):
    keys, data = blocks(4, 6)
    with DaemonProcess(settings(shm_dir, tmp_path)) as d, Client.connect(d.socket_path) as c:
        c.put(keys, data)
    for name in segment_files(shm_dir):  # the one holding the blocks among them
        os.unlink(os.path.join(shm_dir, name))
    with DaemonProcess(settings(shm_dir, tmp_path)) as d2, Client.connect(d2.socket_path) as c:
        assert "segments not re-adoptable" in d2.log()
        assert c.lookup(keys).prefix == 0


def test_a_second_daemon_on_the_same_directory_is_refused(shm_dir, tmp_path):
    with DaemonProcess(settings(shm_dir, tmp_path)):
        with pytest.raises(RuntimeError, match="in use by another kvrackd"):
            DaemonProcess(settings(shm_dir, tmp_path))


def test_unreadable_or_foreign_state_files_are_not_trusted(shm_dir):
    backing = ShmDirBacking(shm_dir)
    try:
        with open(backing.state_path, "wb") as fh:
            fh.write(b"\x93garbage")
        state, why = take_state(backing, 1 << 20, 8 << 20)
        assert state is None and "unreadable" in why
        assert not os.path.exists(backing.state_path)
        state, why = take_state(backing, 1 << 20, 8 << 20)
        assert state is None and "no clean-shutdown state" in why
    finally:
        backing.close_lock()


def test_state_files_written_through_a_mapping_read_back_and_bad_ones_are_not_trusted(shm_dir):
    """hugetlbfs takes no write(): there the state file is filled through a mapping, in whole pages, its
    payload behind a header. Both ways read back the same bytes; a header that claims more than the file
    holds is unreadable, not trusted."""
    os.makedirs(shm_dir)
    plain, mapped = os.path.join(shm_dir, "plain"), os.path.join(shm_dir, "mapped")
    payload = msgspec.msgpack.encode({"blocks": list(range(1000))})
    write_state_bytes(plain, payload, mapped=False)
    write_state_bytes(mapped, payload, mapped=True)
    assert os.path.getsize(plain) == len(payload)
    assert os.path.getsize(mapped) % mmap.PAGESIZE == 0 and os.path.getsize(mapped) > len(payload)
    assert read_state_bytes(plain) == read_state_bytes(mapped) == payload
    backing = ShmDirBacking(shm_dir)
    try:
        write_state_bytes(backing.state_path, b"\x93" * 10, mapped=True)
        with open(backing.state_path, "r+b") as fh:  # the header now claims more than the file holds
            fh.write(MAPPED_STATE.pack(MAPPED_MAGIC, 1 << 30))
        state, why = take_state(backing, 1 << 20, 8 << 20)
        assert state is None and "unreadable" in why and "payload" in why
        assert not os.path.exists(backing.state_path)
    finally:
        backing.close_lock()


def test_clean_restart_re_adopts_dram_blocks_on_hugetlbfs(hugetlbfs_dir, tmp_path):
    shm_dir = os.path.join(hugetlbfs_dir, "dram")
    s = settings(shm_dir, tmp_path, **{"dram.segment_bytes": "2MiB"})  # whole huge pages
    keys, data = blocks(12, 4)
    with DaemonProcess(s) as d, Client.connect(d.socket_path) as c:
        c.put(keys, data)
    assert os.path.exists(os.path.join(shm_dir, STATE_FILE)), "the clean-shutdown state was written on hugetlbfs"
    with DaemonProcess(s) as d2, Client.connect(d2.socket_path) as c:
        assert "re-adopted 12 block(s), 3MiB" in d2.log()
        hits, outs = read_all(c, keys)
        assert all(hits) and all(np.array_equal(o, x) for o, x in zip(outs, data))


def test_segments_that_are_not_whole_huge_pages_are_refused_with_the_page_size(hugetlbfs_dir, tmp_path):
    s = settings(os.path.join(hugetlbfs_dir, "dram"), tmp_path, **{"dram.segment_bytes": "3MiB",
                                                                  "dram.capacity_bytes": "6MiB"})
    with pytest.raises(RuntimeError, match="not a whole number of its 2048 KiB huge pages"):
        DaemonProcess(s)
