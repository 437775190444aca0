"""Regression tests of the six defects found under hostile load and in the code (issue 24), each against the
real thing: a daemon process, or the NVMe mover over injected faults."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time

import pytest

from kvrack import protocol as P
from kvrack.bench.spawn import DaemonProcess, process_cpu_s, rss_anon_bytes
from kvrack.clients import Client
from kvrack.protocol import ErrorCode, TierId
from tests.conftest import SMALL, RawConn, eventually
from tests.test_mover import FaultPlan, Rig, key, payload


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# 1 ----------------------------------------------------------------------------------- out of descriptors

def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning():
    d = DaemonProcess(SMALL, command_prefix=["prlimit", "--nofile=64:64", "--"])
    socks: list[socket.socket] = []
    try:
        spare = 64 - open_fds(d.pid)
        assert spare > 4, f"the daemon uses {open_fds(d.pid)} fds at rest"
        for _ in range(spare + 40):  # more connections than it has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            socks.append(s)
        time.sleep(0.5)
        t0, c0 = time.monotonic(), process_cpu_s(d.pid)
        time.sleep(2.0)
        busy = (process_cpu_s(d.pid) - c0) / (time.monotonic() - t0)
        assert busy < 0.25, f"the daemon spins at {busy:.0%} of a core while out of descriptors"
        assert d.log().count("accept:") <= 2, "logged once per 10 s, not per attempt"
        assert "file descriptor limit 64" in d.log()
        for s in socks:
            s.close()
        socks.clear()
        deadline = time.monotonic() + 10  # descriptors free again: new clients get in
        while True:
            try:
                with Client.connect(d.socket_path, timeout=2.0) as c:
                    keys = [os.urandom(32)]
                    c.put(keys, [b"ok" * 100])
                    assert c.lookup(keys).prefix == 1
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert d.admin().stats()["server"]["accept_pauses"] >= 1
    finally:
        for s in socks:
            s.close()
        d.stop()


# 2 ----------------------------------------------------------------------------- replies nobody reads

def flood_without_reading(path: str, seconds: float) -> RawConn:
    """Hello, then pipeline stats requests without reading a reply, until the daemon stops reading ours."""
    c = RawConn(path)
    c.hello()
    c.sock.settimeout(0.05)
    frame = P.encode_frame(P.Stats(id=7)) * 64
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            c.sock.sendall(frame)
        except (TimeoutError, BlockingIOError):
            break
        except OSError:
            break
    return c


def test_clients_that_never_read_replies_cannot_grow_daemon_memory():
    d = DaemonProcess({**SMALL, "server.max_queued_reply_bytes": "256KiB",
                       "server.max_total_queued_reply_bytes": "2MiB", "server.stalled_client_timeout_s": "2"})
    floods: list[RawConn] = []
    try:
        with Client.connect(d.socket_path) as c:
            c.stats()
        before = rss_anon_bytes(d.pid)
        floods = [flood_without_reading(d.socket_path, 2.0) for _ in range(16)]
        grown = rss_anon_bytes(d.pid) - before
        assert grown < 64 << 20, f"daemon memory grew {grown >> 20} MiB under 16 clients that read no reply"
        stats = d.admin().stats()["server"]
        assert stats["queued_reply_bytes"] <= (2 << 20) + 16 * (64 << 10)
        with Client.connect(d.socket_path, timeout=5.0) as c:  # a well-behaved client is served meanwhile
            keys = [os.urandom(32)]
            c.put(keys, [b"x" * 1000])
            assert c.get_into(keys, [bytearray(1000)]) == [True]
        assert eventually(lambda: d.admin().stats()["server"]["stalled_closed"] >= 16, timeout=15)
        assert d.admin().stats()["server"]["queued_reply_bytes"] == 0
        assert "reads none; closing the connection" in d.log()
    finally:
        for f in floods:
            f.close()
        d.stop()


# 3 ---------------------------------------------------------------------- failed NVMe writes are retried

def test_blocks_whose_nvme_write_failed_stay_in_dram_and_are_written_on_the_retry(tmp_path):
    plan = FaultPlan()
    rig = Rig(tmp_path, plan)
    try:
        plan.write_errno = errno.ENOSPC
        rig.put([1, 2])
        rig.settle()
        s = rig.mover.stats()
        assert s["degraded"] and s["write_errors"] == 2 and s["not_persisted"] == 2 and s["unpersisted_blocks"] == 2
        held = [rig.store.namespaces["a"].entries[key(i)] for i in (1, 2)]
        assert all(e.pins and not rig.store.order.holds(e) for e in held), "kept out of DRAM eviction"
        rig.put([3, 4, 5, 6, 7, 8])  # DRAM is full: others go, not the two without an NVMe copy
        rig.settle()
        assert rig.tiers([1, 2])[:2] == bytes([TierId.DRAM] * 2)
        plan.write_errno = 0
        rig.mover.tick()  # the retry interval (0 here) has passed: the kept blocks are written
        rig.settle()
        assert rig.mover.stats()["unpersisted_blocks"] == 0 and rig.mover.stats()["degraded"] is None
        assert all(rig.nvme.index.get("a", key(i)) is not None for i in (1, 2))
        assert all(e.pins == 0 for e in held)
        rig.put([9, 10, 11, 12, 13, 14, 15, 16])  # now they may leave DRAM: NVMe has them
        rig.settle()
        assert rig.get([1, 2]) == [payload(1), payload(2)]
    finally:
        rig.close()


def test_a_degraded_tier_is_probed_and_reports_healthy_without_new_puts(tmp_path):
    plan = FaultPlan()
    rig = Rig(tmp_path, plan)
    try:
        rig.mover.keep_unpersisted = False  # nothing kept to retry with: the probe is what finds it healthy
        plan.write_errno = errno.ENOSPC
        rig.put([1])
        rig.settle()
        assert rig.mover.stats()["degraded"]
        plan.write_errno = 0
        rig.mover.tick()
        assert eventually(lambda: rig.loop.run_until_complete(_idle()) or rig.mover.stats()["degraded"] is None,
                          timeout=5)
    finally:
        rig.close()


async def _idle() -> None:
    import asyncio
    await asyncio.sleep(0.05)


# 4 ----------------------------------------------------------------- a clean stop says what it could not keep

@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (root only), removed after: the NVMe index's file system, filled up by the test."""
    path = tmp_path / "fs"
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.daemon_tracebacks
def test_sigterm_reports_acknowledged_blocks_it_could_not_persist_and_keeps_them(tmp_path, small_fs):
    settings = {"dram.capacity_bytes": "16MiB", "dram.segment_bytes": "1MiB", "nvme.dir": str(tmp_path / "nvme"),
                "nvme.capacity_bytes": "64MiB", "nvme.index_dir": str(small_fs / "index"),
                "dram.shm_dir": str(tmp_path / "shm"), "server.drain_timeout_s": "1", "nvme.retry_interval_s": "0.2"}
    d = DaemonProcess(settings)
    keys = [os.urandom(32) for _ in range(24)]
    try:
        filler = small_fs / "filler"
        with open(filler, "wb") as fh:  # the index's file system full: every write batch fails
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        with Client.connect(d.socket_path) as c:
            c.put(keys, [bytes([i]) * 65536 for i in range(24)])
        assert eventually(lambda: d.admin().tiers()[1]["degraded"] is not None)
        assert d.stop() == 0
    finally:
        d.stop()
    log = d.log()
    assert "acknowledged block(s)" in log and "not on nvme at shutdown" in log and "kept in dram.shm_dir" in log
    os.unlink(small_fs / "filler")  # room again: the next start writes them through
    with DaemonProcess(settings) as again, Client.connect(again.socket_path) as c:
        assert c.lookup(keys).prefix == 24
        assert eventually(lambda: again.admin().namespaces()[0]["nvme_blocks"] == 24)
        out = [bytearray(65536) for _ in keys]
        assert c.get_into(keys, out) == [True] * 24 and all(o == bytes([i]) * 65536 for i, o in enumerate(out))
    shutil.rmtree(tmp_path / "shm", ignore_errors=True)


# 5 ----------------------------------------------------------- an expired lease's slot is not reused under it

def reserve(c: RawConn, keys: list[bytes], size: int, rid: int) -> dict:
    c.send({"op": "reserve", "id": rid, "keys": keys, "sizes": [size] * len(keys)})
    return c.recv()


def slots(reply: dict) -> set[tuple[int, int]]:
    return {(d[1], d[2]) for d in reply["descriptors"] if d is not None}


def test_an_expired_reservation_keeps_its_slot_until_its_session_ends():
    d = DaemonProcess({**SMALL, "leases.reserve_timeout_s": "0.3", "leases.sweep_interval_s": "0.05"})
    late, other = RawConn(d.socket_path), RawConn(d.socket_path)
    try:
        late.hello()
        other.hello()
        k = os.urandom(32)
        mine = slots(reserve(late, [k], 65536, 2))
        assert eventually(lambda: d.admin().stats()["counters"]["expired_reservations"] == 1)
        # DRAM is 128 slots of 64 KiB: the other client takes every slot it can, never the expired one
        taken: set[tuple[int, int]] = set()
        for i in range(4):
            r = reserve(other, [os.urandom(32) for _ in range(40)], 65536, 10 + i)
            taken |= slots(r)
        assert len(taken) == 127 and not taken & mine, "a slot the late writer may still be filling was handed out"
        late.send({"op": "commit", "id": 3, "keys": [k]})
        assert late.recv()["codes"] == [ErrorCode.NOT_RESERVED]
        late.close()  # its session ends: the slot may be reused now
        assert eventually(lambda: slots(reserve(other, [os.urandom(32)], 65536, 99)) == mine, timeout=5)
    finally:
        late.close()
        other.close()
        d.stop()


def test_an_expired_pin_keeps_the_bytes_under_a_reader_until_its_session_ends():
    d = DaemonProcess({**SMALL, "leases.pin_timeout_s": "0.3", "leases.sweep_interval_s": "0.05"})
    try:
        with Client.connect(d.socket_path) as reader, Client.connect(d.socket_path) as writer:
            k = os.urandom(32)
            writer.put([k], [b"A" * 65536])
            lease = reader.get([k])
            assert eventually(lambda: d.admin().stats()["counters"]["expired_pins"] == 1)
            writer.delete([k])
            for _ in range(8):  # fill and refill DRAM with other blocks: evictions, slots reused
                writer.put([os.urandom(32) for _ in range(32)], [b"B" * 65536] * 32, raise_on_error=False)
            assert bytes(lease.views[0]) == b"A" * 65536, "the slot under a reader's view was reused"
            lease.release()  # no longer its pin to release: NOT_PINNED, quietly
    finally:
        d.stop()


# 6 ------------------------------------------------------------------ a key twice in one reserve

def test_a_key_twice_in_one_reserve_with_another_size_is_refused(daemon):
    c = RawConn(daemon.socket_path)
    try:
        c.hello()
        k = os.urandom(32)
        r = reserve(c, [k, k], 100, 2)
        assert r["codes"] == [0, 0] and r["descriptors"][0] == r["descriptors"][1]  # the same block, asked twice
        c.send({"op": "reserve", "id": 3, "keys": [k, k], "sizes": [100, 200]})
        r = c.recv()
        assert r["codes"] == [0, ErrorCode.INVALID_SIZE] and "reserved with 100 bytes" in r["message"]
        c.send({"op": "commit", "id": 4, "keys": [k]})
        assert c.recv()["codes"] == [0]
        with Client.connect(daemon.socket_path) as client:
            assert client.get_into([k], [bytearray(100)]) == [True]
    finally:
        c.close()


def _partial_frame(c: RawConn, announced: int, sent: int) -> None:
    """A frame header for ``announced`` body bytes, then only ``sent`` of them (or fewer: the daemon may close
    the connection on the way, its reply already sent)."""
    try:
        c.send_raw(P.HEADER.pack(announced) + b"\x00" * sent)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_incomplete_frames_are_bounded_in_total_and_a_stopped_sender_is_closed():
    settings = {"dram.capacity_bytes": "64MiB", "nvme.enabled": "false", "server.max_frame_bytes": "8MiB",
                "server.max_total_partial_frame_bytes": "1MiB", "server.stalled_client_timeout_s": "1",
                "leases.sweep_interval_s": "0.2"}
    with DaemonProcess(settings) as d:
        first, second = RawConn(d.socket_path), RawConn(d.socket_path)
        try:
            assert first.hello()["code"] == 0 and second.hello()["code"] == 0
            _partial_frame(first, 4 << 20, 700 << 10)
            assert eventually(lambda: d.admin().stats()["server"]["partial_frame_bytes"] >= 700 << 10)
            _partial_frame(second, 4 << 20, 700 << 10)  # together past 1 MiB: the one that took it past goes
            try:  # the reply says why, unless the close (with our bytes unread) reset the connection first
                reply = second.recv()
                assert reply is None or (reply["code"] == ErrorCode.FRAME_TOO_LARGE
                                         and "max_total_partial_frame_bytes" in reply["message"])
                assert second.recv() is None
            except ConnectionResetError:
                pass
            assert eventually(lambda: "max_total_partial_frame_bytes" in open(d.log_path).read())
            with Client.connect(d.socket_path) as good:  # everyone else is served meanwhile
                assert good.put([b"g" * 32], [b"x" * 100]).stored == 1
            # the first sends no further byte of its frame: closed after server.stalled_client_timeout_s
            assert first.recv() is None
            stats = d.admin().stats()["server"]
            assert stats["partial_frame_bytes"] == 0 and stats["stalled_closed"] >= 1
        finally:
            first.sock.close()
            second.sock.close()


def test_leases_expire_under_load_and_the_clients_working_meanwhile_see_no_error():
    """A client that reserves and pins and never finishes, while others put, read and delete: its leases run
    out and are swept (counted), its late commit is refused, the others see no error and no wrong byte, and
    nothing stays pinned once it is gone."""
    import threading

    import numpy as np

    d = DaemonProcess({**SMALL, "leases.reserve_timeout_s": "0.3", "leases.pin_timeout_s": "0.3",
                       "leases.sweep_interval_s": "0.05"})
    errors: list[str] = []
    rounds = 6

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client.connect(d.socket_path) as c:
                for _ in range(150):
                    keys = [rng.bytes(32) for _ in range(4)]
                    data = [rng.integers(0, 256, 16384, dtype=np.uint8) for _ in keys]
                    c.put(keys, data)
                    outs = [np.zeros(16384, np.uint8) for _ in keys]
                    hits = c.get_into(keys, outs)
                    if not all(hits) or not all(np.array_equal(o, w) for o, w in zip(outs, data)):
                        errors.append(f"worker {seed}: a block it just stored did not read back")
                    c.delete(keys)
        except Exception as exc:  # noqa: BLE001 - any error is a failure the test reports
            errors.append(f"worker {seed}: {exc!r}")

    hog = RawConn(d.socket_path)
    try:
        hog.hello()
        with Client.connect(d.socket_path) as seeder:
            pinned = [os.urandom(32) for _ in range(8)]
            seeder.put(pinned, [b"p" * 16384] * 8)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        late: list[bytes] = []
        for r in range(rounds):  # reserve and pin, never commit nor release; let each lease run out
            late = [os.urandom(32) for _ in range(8)]
            hog.send({"op": "reserve", "id": 10 + r, "keys": late, "sizes": [16384] * 8})
            assert hog.recv()["codes"] == [0] * 8
            hog.send({"op": "acquire", "id": 100 + r, "keys": pinned})
            assert hog.recv()["codes"] == [0] * 8
            want = (r + 1) * 8
            assert eventually(lambda want=want: (lambda c: c["expired_reservations"] >= want
                                                 and c["expired_pins"] >= want)(d.admin().stats()["counters"]),
                              timeout=30)
        hog.send({"op": "commit", "id": 999, "keys": late})
        assert hog.recv()["codes"] == [ErrorCode.NOT_RESERVED] * 8
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        hog.close()
        with Client.connect(d.socket_path) as c:
            assert eventually(lambda: c.stats()["tiers"][0]["pinned_blocks"] == 0, timeout=10)
    finally:
        hog.close()
        d.stop()
