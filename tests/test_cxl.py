"""The CXL region: layout, reads without locks, writes under the two-level lock, recovery from dead hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrack import _native
from kvrack.tiers.cxl import CxlFull, CxlRegion
from kvrack.tiers.cxl_layout import OFF_LOCK, READY, Geometry, loc_word, meta_word
from kvrack.tiers.cxl_lock import LockTimeout, lock_word, now_ms32
from tests import cxl_stress

ROOT = Path(__file__).resolve().parent.parent


def key(i: int) -> bytes:
    return cxl_stress.key_of(i)


def test_geometry_plan_fits_and_round_trips():
    g = Geometry.plan(64 << 20, 2 << 20)
    assert g.data_offset % (2 << 20) == 0 and g.data_offset + g.nchunks * g.chunk_bytes <= 64 << 20
    assert g.nslots >= 2 * g.nchunks and g.index_offset % 64 == 0
    assert Geometry.unpack(g.pack(), 64 << 20) == g
    with pytest.raises(ValueError, match="cannot hold"):
        Geometry.plan(1 << 20, 2 << 20)
    with pytest.raises(ValueError, match="multiple of 64"):
        Geometry.plan(64 << 20, 1000)
    with pytest.raises(ValueError, match="no kvrack header"):
        Geometry.unpack(bytes(4096), 4096)


def test_put_lookup_read_delete(region_path):
    w = CxlRegion.create(region_path, 16 << 20, 64 << 10, "ns-a")
    w.register_host()
    blocks = {key(i): os.urandom(100 + 997 * i) for i in range(20)}
    for k, v in blocks.items():
        assert w.put(k, v) is True
    assert w.put(key(3), b"other bytes") is False  # idempotent: the first copy stays
    r = CxlRegion.open(region_path, "ns-a")  # a reader: read-only mapping, no host id, no lock
    leading, slots = r.lookup([key(0), key(1), key(99), key(2)])
    assert leading == 2 and slots[2] == -1 and slots[3] >= 0
    for k, v in blocks.items():
        assert r.get(k) == v
    dst = bytearray(200_000)
    assert r.read(key(5), dst, 1000) == len(blocks[key(5)])
    assert bytes(dst[1000: 1000 + len(blocks[key(5)])]) == blocks[key(5)]
    assert w.delete(key(5)) and not w.delete(key(5))
    assert r.get(key(5)) is None and r.get(key(6)) == blocks[key(6)]
    with pytest.raises(ValueError, match="destination"):
        r.read(key(6), bytearray(10))
    with pytest.raises(ValueError, match="exceeds"):
        w.put(key(100), bytes((64 << 10) + 1))
    with pytest.raises(ValueError, match="32 bytes"):
        w.put(b"short", b"x")
    with pytest.raises(PermissionError, match="read-only"):
        r.register_host()
    assert r.stats()["blocks"] == 19 and r.stats()["tombstones"] == 0
    r.close()
    w.close()


def test_namespace_and_format_checks(region_path):
    CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a").close()
    with pytest.raises(PermissionError, match="belongs to namespace 'ns-a'"):
        CxlRegion.open(region_path, "ns-b")
    Path(region_path).write_bytes(bytes(8 << 20))
    with pytest.raises(ValueError, match="not formatted"):
        CxlRegion.open(region_path, "ns-a")
    for small in (b"", b"x" * 100):  # an empty or truncated file: said so, never a bare mmap error
        Path(region_path).write_bytes(small)
        with pytest.raises(ValueError, match=f"{len(small)} bytes, too small to hold a region header"):
            CxlRegion.open(region_path, "ns-a")


def test_blocks_survive_reattach_and_geometry_change_reformats(region_path):
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a")
    w.register_host()
    w.put(key(1), b"kept")
    w.close()
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a")
    assert w.get(key(1)) == b"kept"
    w.close()
    w = CxlRegion.create(region_path, 8 << 20, 32 << 10, "ns-a")  # new chunk size: a fresh layout
    assert w.get(key(1)) is None
    w.close()


READ_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import sys, blake3
    from kvrack.tiers.cxl import CxlRegion
    r = CxlRegion.open(sys.argv[1], "ns-h")
    data = r.get(bytes.fromhex(sys.argv[2]))
    print(blake3.blake3(data).hexdigest() if data is not None else "missing")
    r.close()
""")


def test_a_region_on_hugetlbfs_rounds_up_to_whole_pages_and_other_processes_read_it(hugetlbfs_dir):
    """hugetlbfs files are whole huge pages: a size that is not one grows to the next, and the region maps,
    reads, and re-adopts there as on tmpfs."""
    path = os.path.join(hugetlbfs_dir, "region")
    asked = (16 << 20) + 4096
    w = CxlRegion.create(path, asked, 2 << 20, "ns-h")
    assert os.path.getsize(path) == 18 << 20
    w.register_host()
    block = np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    assert w.put(key(1), block)
    proc = subprocess.run([sys.executable, "-c", READ_IN_ANOTHER_PROCESS, path, key(1).hex()], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == blake3.blake3(block).hexdigest()
    w.close()
    w = CxlRegion.create(path, asked, 2 << 20, "ns-h")  # the same request again: same size, blocks kept
    assert w.get(key(1)) == block
    w.close()


def test_a_region_file_that_cannot_be_backed_or_laid_out_is_not_left_behind(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.statvfs(shm).f_blocks == 0:
        pytest.skip("needs /dev/shm with a size limit, so that an oversized region is refused at once")
    st = os.statvfs(shm)
    path = shm / f"kvrack-test-cxl-{os.getpid()}-{tmp_path.name}-huge"
    with pytest.raises(OSError, match="cannot back a .*-byte segment with a cxl region file"):
        CxlRegion.create(str(path), 2 * st.f_blocks * st.f_frsize, 2 << 20, "ns-a")
    assert not path.exists()
    with pytest.raises(ValueError, match="cannot hold one 67108864-byte chunk"):  # backed, but no room for a chunk
        CxlRegion.create(str(path), 16 << 20, 64 << 20, "ns-a")
    assert not path.exists()


def writer_and_reader(path: str, blocks: dict[bytes, bytes], size: int = 8 << 20) -> tuple[CxlRegion, CxlRegion]:
    """A region holding ``blocks``, its writer (registered host) and a read-only reader of it."""
    w = CxlRegion.create(path, size, 64 << 10, "ns-a")
    w.register_host()
    for k, v in blocks.items():
        w.put(k, v)
    return w, CxlRegion.open(path, "ns-a")


def test_read_many_reads_each_key_into_its_buffer_in_one_call(region_path):
    blocks = {key(i): os.urandom(1 + 4099 * i) for i in range(12)}
    w, r = writer_and_reader(region_path, blocks, 16 << 20)
    keys = [key(3), key(99), key(0), key(11), key(98)]
    outs = [bytearray(64 << 10) for _ in keys]
    assert r.read_many(keys, outs) == [len(blocks[key(3)]), None, 1, len(blocks[key(11)]), None]
    for k, out in zip(keys, outs):
        if k in blocks:
            assert bytes(out[: len(blocks[k])]) == blocks[k]
    assert r.read_many([], []) == []
    assert r.stats()["reads_invalidated"] == 3
    assert r.read_many(keys[:1], outs[:1]) == [len(blocks[key(3)])] and r.stats()["reads_unchanged_since_last_read"] == 1
    with pytest.raises(ValueError, match="room for 100"):
        r.read_many([key(0), key(5)], [bytearray(100), bytearray(100)])
    with pytest.raises(ValueError, match="2 keys but 1 destinations"):
        r.read_many([key(0), key(5)], [bytearray(100)])
    with pytest.raises((TypeError, BufferError)):
        r.read_many([key(0)], [b"read-only"])
    r.close()
    w.close()


def test_an_entry_naming_a_chunk_outside_the_region_is_an_error_not_a_read(region_path):
    w, r = writer_and_reader(region_path, {key(1): b"fine"})
    slot = int(w.lookup(key(1))[1][0])
    _native.cxl_publish(w.mm, w.g.entry(slot), meta_word(READY, w.host), key(1), loc_word(w.g.nchunks + 5, 4), 0)
    with pytest.raises(RuntimeError, match="corrupt region"):
        r.read(key(1), bytearray(64))
    with pytest.raises(RuntimeError, match="corrupt region"):
        r.read_many([key(2), key(1)], [bytearray(64), bytearray(64)])
    r.close()
    w.close()


def test_a_block_read_again_unchanged_skips_the_invalidation_and_a_replaced_one_does_not(region_path):
    w, r = writer_and_reader(region_path, {key(1): b"first"})

    def counts() -> tuple[int, int]:
        st = r.stats()
        return st["reads_invalidated"], st["reads_unchanged_since_last_read"]

    assert r.get(key(1)) == b"first" and counts() == (1, 0)
    assert r.get(key(1)) == b"first" and counts() == (1, 1)  # same slot, same version: lines already this block's
    assert w.delete(key(1)) and w.put(key(1), b"second")  # the slot's version moved on: drop the lines again
    assert r.get(key(1)) == b"second" and counts() == (2, 1)
    assert r.get(key(1)) == b"second" and counts() == (2, 2)
    r.forget_reads()
    assert r.get(key(1)) == b"second" and counts() == (3, 2)
    assert r.get(key(99)) is None and counts() == (3, 2)
    coherent = CxlRegion.open(region_path, "ns-a", coherent=True)
    assert coherent.get(key(1)) == b"second" and coherent.get(key(1)) == b"second"
    assert (coherent.stats()["reads_invalidated"], coherent.stats()["reads_unchanged_since_last_read"]) == (0, 0)
    coherent.close()
    # the daemon formats the same file again (another namespace, same geometry) while this reader still maps
    # it: slot versions start from a new random base, so the block put anew at the same slot is not taken
    # for the one this process read before
    w.close()
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-b")
    w.register_host()
    for data in (b"x", None, b"third!"):  # as many publishes at the slot as before: versions counted from 0 meet
        assert w.put(key(1), data) if data else w.delete(key(1))
    assert r.get(key(1)) == b"third!" and counts() == (4, 2)
    slot = int(w.lookup(key(1))[1][0])
    assert w.stats()["index_slots"] == r.g.nslots and w._entry(slot)[0] >= 1 << 61
    r.close()
    w.close()


def test_full_region_evicts_and_reports_full_when_nothing_is_evictable(region_path):
    w = CxlRegion.create(region_path, 4 << 20, 256 << 10, "ns-a")
    w.register_host()
    n = w.g.nchunks
    for i in range(3 * n):
        assert w.put(key(i), bytes([i % 251]) * 1000)
    s = w.stats()
    assert s["blocks"] <= n and s["evictions"] >= 2 * n - 8
    assert w.get(key(3 * n - 1)) == bytes([(3 * n - 1) % 251]) * 1000  # the newest block is there
    # every chunk held by an unpublished block: nothing to evict
    w2 = CxlRegion.create(region_path, 4 << 20, 256 << 10, "ns-a")
    w2.register_host()
    held = []
    with pytest.raises(CxlFull):
        for i in range(10_000, 10_000 + n + 8):
            held.append((i, w2.reserve(key(i), 10)[0]))
    for i, slot in held:
        w2.abort(slot, key(i))
    assert w2.stats()["writing"] == 0
    w2.close()
    w.close()


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "delete", "evict"]), st.integers(0, 40)), max_size=120))
def test_index_agrees_with_a_model_under_any_op_sequence(ops):
    path = f"/dev/shm/kvrack-test-cxl-model-{os.getpid()}"
    w = CxlRegion.create(path, 4 << 20, 64 << 10, "m", max_hosts=4)
    try:
        w.register_host()
        model: dict[bytes, bytes] = {}
        for op, i in ops:
            k = key(i)
            if op == "put":
                v = k[:4] * (i + 1)
                if w.put(k, v):
                    model[k] = v
            elif op == "delete":
                assert w.delete(k) == (k in model)
                model.pop(k, None)
            else:
                w.evict(1 + i % 3)
                present = {e[2] for e in w.entries()}
                model = {k2: v2 for k2, v2 in model.items() if k2 in present}
        present = {e[2]: e for e in w.entries()}
        assert set(present) == set(model)
        for k, v in model.items():
            assert w.get(k) == v
        assert len({e[3] for e in present.values()}) == len(present)  # no chunk shared by two blocks
        assert w.stats()["tombstones"] == 0
    finally:
        w.close()
        os.unlink(path)


def test_colliding_keys_stay_reachable_after_deletes(region_path):
    """Backward-shift deletion: keys that probed past a deleted one are moved, never lost."""
    w = CxlRegion.create(region_path, 4 << 20, 32 << 10, "ns-a")
    w.register_host()
    nslots = w.g.nslots
    same_home = [bytes([0] * 8) + os.urandom(24) for _ in range(6)]  # all hash to slot 0
    wrap = [(nslots - 1).to_bytes(8, "little") + os.urandom(24) for _ in range(3)]
    for k in same_home + wrap:
        w.put(k, k)
    for victim in (same_home[0], wrap[1], same_home[3]):
        assert w.delete(victim)
    for k in same_home + wrap:
        expect = None if k in (same_home[0], wrap[1], same_home[3]) else k
        assert w.get(k) == expect
    assert w.stats()["tombstones"] == 0
    w.close()


HOLD_LOCK_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from kvrack.tiers.cxl import CxlRegion
    r = CxlRegion.open(sys.argv[1], writable=True)
    r.register_host()
    {action}
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _die_holding(path: str, action: str) -> None:
    code = HOLD_LOCK_AND_DIE.format(action=action)
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL and "holding" in proc.stdout, proc.stderr


def test_a_process_killed_holding_the_lock_does_not_wedge_others(region_path):
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a")
    w.register_host()
    _die_holding(region_path, "r.lock.acquire()")
    assert _native.load64(w.mm, OFF_LOCK) != 0  # the dead process's lock word is still there
    w.lock.timeout_s = 10
    assert w.put(key(1), b"after")  # the owner's pid is gone: taken over at once, not after the lease
    assert w.lock.takeovers == 1 and w.get(key(1)) == b"after"
    w.close()


def test_lease_decides_for_owners_on_other_machines(region_path):
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a")
    w.register_host()
    foreign = 7  # a host line never claimed here: not on this machine, so its pid cannot be checked
    w.lock.timeout_s = 0.3
    _native.store64(w.mm, OFF_LOCK, lock_word(foreign, 12345, (now_ms32() + 60_000) & 0xFFFFFFFF))
    with pytest.raises(LockTimeout, match="host 7 pid 12345"):
        w.put(key(1), b"x")
    _native.store64(w.mm, OFF_LOCK, lock_word(foreign, 12345, (now_ms32() - 1) & 0xFFFFFFFF))
    assert w.put(key(1), b"x") and w.lock.takeovers == 1
    w.close()


def test_reclaim_frees_what_a_dead_writer_left(region_path):
    w = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns-a")
    w.register_host()
    _die_holding(region_path, f"r.reserve({key(1)!r}, 1000)")  # dies with an unpublished block and a heap
    s = w.stats()
    assert s["writing"] == 1 and w.get(key(1)) is None
    assert w.reclaim() == 1
    s = w.stats()
    assert s["writing"] == 0 and s["reaped_hosts"] == 1
    table = np.frombuffer(w.mm, dtype="<u8", count=w.g.nchunks, offset=w.g.chunks_offset)
    assert set(np.unique(table).tolist()) <= {0, w.host + 1}  # the dead host's heap is free again
    del table
    assert w.put(key(1), b"now")
    w.close()


def test_verifier_detects_torn_and_wrong_blocks():
    good = cxl_stress.make_block(key(1), 5, 4096)
    assert cxl_stress.verify(key(1), memoryview(good))
    torn = good[:2000] + cxl_stress.make_block(key(1), 6, 4096)[2000:]
    assert not cxl_stress.verify(key(1), memoryview(torn))
    assert not cxl_stress.verify(key(2), memoryview(good))


def _stress(path: str, seconds: float, nproc: int, min_ops: int = 0) -> list[dict[str, int]]:
    region = CxlRegion.create(path, 32 << 20, 256 << 10, "stress")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.cxl_stress", path, str(seconds), str(i),
                               "reader" if i == 0 else "writer", str(min_ops)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
             for i in range(nproc)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + cxl_stress.OVERTIME_S + 60)
        assert p.returncode == 0
        results.append(json.loads(out))
    # after the storm: every published block is reachable through the index and intact
    entries = list(region.entries())
    assert all(state == "ready" for _s, state, *_ in entries)
    assert len({chunk for *_x, chunk, _n in entries}) == len(entries)
    for _slot, _state, k, _chunk, _n in entries:
        data = region.get(k)
        assert data is not None and cxl_stress.verify(k, memoryview(data))
    region.close()
    return results


def test_processes_hammering_one_region_never_read_a_torn_block(region_path):
    # each process runs 4 s and 4,000 operations at least (a loaded machine takes longer, never does less)
    results = _stress(region_path, 4.0, 4, min_ops=4000)
    assert sum(r["bad"] for r in results) == 0
    assert sum(r["hits"] for r in results) > 100 and sum(r["puts"] for r in results) > 100
    assert sum(r["evictions"] + r["deletes"] for r in results) > 50
    # both read paths ran under churn: blocks replaced since this process read them, and blocks unchanged
    assert sum(r["reads_invalidated"] for r in results) > 100 and sum(r["reads_unchanged"] for r in results) > 100
    assert sum(r["reads_invalidated"] + r["reads_unchanged"] for r in results) == sum(r["hits"] for r in results)


@pytest.mark.stress
def test_cxl_stress_long(region_path):
    seconds = float(os.environ.get("KVRACK_STRESS_SECONDS", "60"))
    nproc = int(os.environ.get("KVRACK_STRESS_PROCS", "6"))
    results = _stress(region_path, seconds, nproc)
    print(json.dumps({"seconds": seconds, "processes": nproc, "totals": {
        k: sum(r[k] for r in results) for k in results[0]}}))
    assert sum(r["bad"] for r in results) == 0
