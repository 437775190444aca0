"""Real kvrackd processes and clients in separate processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import AsyncClient, Client, ErrorCode, KeyBuilder, KvrackError, Layout, TierId

from .conftest import SMALL, eventually

LAYOUT = Layout(layers=4, kv_heads=2, head_dim=64, block_tokens=16)  # 32 KiB blocks


def blocks(n: int, seed: int = 0, size: int = LAYOUT.block_nbytes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(n)]


def run_py(code: str, *args: str, timeout: float = 60) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_one_process_puts_another_reads_the_same_bytes(daemon):
    with Client.connect(daemon.socket_path) as writer:
        kb = KeyBuilder(writer.namespace_salt, "model", LAYOUT)
        keys = kb.chain(list(range(16 * 8)))
        data = blocks(len(keys))
        res = writer.put(keys, data, KeyBuilder.parents(keys))
        assert res.stored == 8
        assert writer.put(keys, data).existing == 8, "a second put is a no-op"
    digest = hashlib.sha256(b"".join(d.tobytes() for d in data)).hexdigest()
    out = run_py("""
        import sys, hashlib
        from kvrack.clients import Client, KeyBuilder, Layout
        layout = Layout(layers=4, kv_heads=2, head_dim=64, block_tokens=16)
        with Client.connect(sys.argv[1]) as c:
            keys = KeyBuilder(c.namespace_salt, "model", layout).chain(list(range(16 * 8)))
            assert c.lookup(keys).prefix == 8
            with c.get(keys) as lease:
                print(hashlib.sha256(b"".join(bytes(v) for v in lease.views)).hexdigest())
    """, daemon.socket_path)
    assert out.strip() == digest


@pytest.mark.parametrize("spin_us", [0, 50], ids=["blocking", "polling"])
def test_get_into_numpy_bytearray_and_misses(daemon, spin_us):
    with Client.connect(daemon.socket_path, spin_us=spin_us) as c:
        keys = [os.urandom(32) for _ in range(3)]
        data = blocks(2, seed=1)
        c.put(keys[:2], data)
        outs = [np.zeros(LAYOUT.block_nbytes, np.uint8), bytearray(LAYOUT.block_nbytes), bytearray(10)]
        assert c.get_into(keys, outs) == [True, True, False]
        assert np.array_equal(outs[0], data[0]) and bytes(outs[1]) == data[1].tobytes()
        res = c.lookup(keys)
        assert res.prefix == 2 and res.tier(0) == TierId.DRAM and res.tiers[2] == 0
        with pytest.raises(ValueError, match="smaller than"):
            c.get_into(keys[:1], [bytearray(5)])
        assert c.stats()["tiers"][0]["evictable_blocks"] == 2, "a failed get_into still released its pins"


def test_torch_tensors_in_and_out(daemon):
    torch = pytest.importorskip("torch", reason="torch is an optional extra (kvrack[torch])")
    with Client.connect(daemon.socket_path) as c:
        src = torch.randn(16, 2, 64, dtype=torch.bfloat16)
        key = [os.urandom(32)]
        c.put(key, [src])
        dst = torch.zeros_like(src)
        assert c.get_into(key, [dst]) == [True]
        assert torch.equal(src, dst)


def test_pins_prevent_eviction(daemon):
    # 8 MiB of 1 MiB segments, 32 KiB blocks: 256 blocks fit
    with Client.connect(daemon.socket_path) as a, Client.connect(daemon.socket_path) as b:
        pinned_keys = [os.urandom(32) for _ in range(32)]
        pinned_data = blocks(32, seed=2)
        a.put(pinned_keys, pinned_data)
        with a.get(pinned_keys) as lease:
            for round_ in range(4):  # 4 × 256 blocks through a 256-block tier
                keys = [os.urandom(32) for _ in range(256)]
                res = b.put(keys, blocks(256, seed=10 + round_), raise_on_error=False)
                assert res.stored >= 200
            assert a.lookup(pinned_keys).prefix == 32
            assert all(bytes(v) == d.tobytes() for v, d in zip(lease.views, pinned_data))
        stats = b.stats()
        assert stats["ops"]["evictions"] > 0 and stats["tiers"][0]["used_bytes"] <= stats["tiers"][0]["capacity_bytes"]


def test_no_space_is_a_clear_error_when_everything_is_pinned(daemon):
    with Client.connect(daemon.socket_path) as c:
        keys = [os.urandom(32) for _ in range(256)]
        c.put(keys, blocks(256, seed=3))
        with c.get(keys) as lease:
            assert lease.hits == 256
            with pytest.raises(KvrackError) as info:
                c.put([os.urandom(32)], blocks(1))
            assert info.value.code == ErrorCode.NO_SPACE and "dram tier full" in info.value.message
            assert c.lookup(keys).prefix == 256, "nothing committed was disturbed"
        c.put([os.urandom(32)], blocks(1))  # room again once the pins end


def test_killed_client_reservations_and_pins_are_reclaimed(daemon):
    with Client.connect(daemon.socket_path) as c:
        held = os.urandom(32)
        c.put([held], blocks(1))
        key = os.urandom(32)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from kvrack.clients import Client
            from kvrack import protocol as P
            c = Client.connect(sys.argv[1])
            c._channel.call("reserve", P.encode_frame(P.Reserve(id=99, keys=[bytes.fromhex(sys.argv[2])], sizes=[4096])))
            lease = c.get([bytes.fromhex(sys.argv[3])])
            print("holding", flush=True)
            time.sleep(60)
        """), daemon.socket_path, key.hex(), held.hex()], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "holding"
            assert c.put([key], blocks(1), raise_on_error=False).codes == [ErrorCode.IN_PROGRESS]
            assert c.stats()["tiers"][0]["evictable_blocks"] == 0
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            child.kill()
        assert eventually(lambda: c.put([key], blocks(1), raise_on_error=False).codes == [0])
        assert c.stats()["tiers"][0]["evictable_blocks"] == 2, "the dead client's pin ended"


def test_concurrent_writer_can_be_waited_for(daemon):
    with Client.connect(daemon.socket_path) as a, Client.connect(daemon.socket_path) as b:
        from kvrack import protocol as P

        key = os.urandom(32)
        reply, _ = a._channel.call("reserve", P.encode_frame(P.Reserve(id=1, keys=[key], sizes=[4096])))
        assert b.put([key], [bytes(4096)], raise_on_error=False).in_progress == 1
        a._channel.call("commit", P.encode_frame(P.Commit(id=2, keys=[key])))
        res = b.put([key], [bytes(4096)], wait_timeout=2.0)
        assert res.existing == 1


def test_reservation_lease_expires():
    with DaemonProcess({**SMALL, "leases.reserve_timeout_s": 0.3, "leases.sweep_interval_s": 0.05}) as d, \
            Client.connect(d.socket_path) as a, Client.connect(d.socket_path) as b:
        from kvrack import protocol as P

        key = os.urandom(32)
        a._channel.call("reserve", P.encode_frame(P.Reserve(id=1, keys=[key], sizes=[4096])))
        assert eventually(lambda: b.put([key], [bytes(4096)], raise_on_error=False).stored == 1, timeout=5)
        reply, _ = a._channel.call("commit", P.encode_frame(P.Commit(id=2, keys=[key])))
        assert reply.codes == [ErrorCode.ALREADY_EXISTS]
        assert b.stats()["ops"]["expired_reservations"] == 1


def test_async_client(daemon):
    async def main() -> None:
        async with await AsyncClient.connect(daemon.socket_path) as c:
            keys = [os.urandom(32) for _ in range(4)]
            data = blocks(4, seed=5)
            assert (await c.put(keys, data)).stored == 4
            assert (await c.lookup(keys)).prefix == 4
            outs = [np.zeros(LAYOUT.block_nbytes, np.uint8) for _ in keys]
            results = await asyncio.gather(c.get_into(keys[:2], outs[:2]), c.get_into(keys[2:], outs[2:]))
            assert results == [[True, True], [True, True]]
            assert all(np.array_equal(o, d) for o, d in zip(outs, data))
            async with await c.get(keys + [os.urandom(32)]) as lease:
                assert lease.hits == 4 and lease.views[4] is None
                assert bytes(lease.views[3]) == data[3].tobytes()
                assert (await c.stats())["tiers"][0]["pinned_blocks"] == 4
            assert (await c.stats())["tiers"][0]["pinned_blocks"] == 0
            assert (await c.put(keys, data, wait_timeout=1.0)).existing == 4
            assert await c.delete(keys) == 4
            assert (await c.stats())["tiers"][0]["blocks"] == 0

    asyncio.run(main())


def test_large_batches_are_split_to_the_daemon_limits():
    with DaemonProcess({**SMALL, "server.max_batch_keys": 100}) as d, Client.connect(d.socket_path) as c:
        keys = [os.urandom(32) for _ in range(250)]
        assert c.put(keys, [bytes(64)] * 250).stored == 250
        assert c.lookup(keys).prefix == 250
        assert c.get_into(keys, [bytearray(64) for _ in keys]) == [True] * 250
        assert c.delete(keys) == 250


def test_large_batches_stream_in_and_out_byte_exact(monkeypatch):
    """A put of a megabyte or more goes into the tier with streaming stores, a get_into of eight or more into
    the caller's buffers; lengths that are no multiple of the vector width, unaligned buffers and pieces
    arrive byte for byte; smaller batches take the ordinary copy."""
    from kvrack.clients import blocks as client_blocks
    from kvrack.clients.blocks import Pieces

    streamed: list[int] = []
    real_stream = client_blocks.stream

    def counting(dst, dst_offset, src, src_offset, nbytes):
        streamed.append(nbytes)
        real_stream(dst, dst_offset, src, src_offset, nbytes)

    monkeypatch.setattr(client_blocks, "stream", counting)
    size = (1 << 20) + 4099
    with DaemonProcess({**SMALL, "dram.capacity_bytes": "32MiB", "dram.segment_bytes": "4MiB"}) as d, \
            Client.connect(d.socket_path) as c:
        keys = [os.urandom(32) for _ in range(9)]
        data = blocks(8, seed=5, size=size)
        raw = bytearray(size + 1)
        raw[1:] = data[0].tobytes()
        sources = [memoryview(raw)[1:], *data[1:7], Pieces([data[7][:1000], data[7][1000:]])]
        assert c.put(keys[:8], sources).stored == 8
        assert len(streamed) == 9, "eight blocks, the last in two pieces"
        arena = bytearray(8 * size + 3)
        outs = [memoryview(arena)[3 + i * size: 3 + (i + 1) * size] for i in range(8)]
        streamed.clear()
        assert c.get_into(keys[:8], outs) == [True] * 8
        assert len(streamed) == 8
        assert all(bytes(o) == b.tobytes() for o, b in zip(outs, data))
        streamed.clear()
        small = blocks(1, seed=6, size=4096)
        assert c.put(keys[8:], small).stored == 1
        out = bytearray(4096)
        assert c.get_into(keys[:1] + keys[8:], [bytearray(size), out]) == [True, True]
        assert bytes(out) == small[0].tobytes() and streamed == []


def test_large_requests_share_their_copies_between_threads_byte_exact():
    """With two copy threads, a put and a get_into of 16 MiB or more each split their blocks between the caller
    and a helper; every byte arrives, and the client's stats count those requests."""
    size = (1 << 20) + 12345
    with DaemonProcess({**SMALL, "dram.capacity_bytes": "48MiB", "dram.segment_bytes": "4MiB"}) as d, \
            Client.connect(d.socket_path, copy_threads=2) as c:
        keys = [os.urandom(32) for _ in range(20)]
        data = blocks(20, seed=7, size=size)
        assert c.put(keys, data).stored == 20
        outs = [np.zeros(size, np.uint8) for _ in keys]
        assert c.get_into(keys, outs) == [True] * 20
        assert all(np.array_equal(o, b) for o, b in zip(outs, data))
        client = c.stats()["client"]
        assert client["copy_threads"] == 2 and client["parallel_copies"] == 2
        assert c.get_into(keys[:2], outs[:2]) == [True, True]
        assert c.stats()["client"]["parallel_copies"] == 2, "a small request stays on the caller's thread"


def test_sigterm_drains_and_exits_cleanly():
    d = DaemonProcess(SMALL)
    try:
        c = Client.connect(d.socket_path)
        c.put([os.urandom(32)], [bytes(100)])
        assert d.stop() == 0
        assert not os.path.exists(d.socket_path)
        assert "kvrackd stopped" in d.log()
        with pytest.raises(ConnectionError):
            c.lookup([os.urandom(32)])
        c.close()
    finally:
        d.stop()


def test_a_second_daemon_on_the_same_socket_refuses(daemon):
    res = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--socket", daemon.socket_path,
                          "--set", "dram.capacity_bytes=1MiB", "--set", "dram.segment_bytes=1MiB"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "already listening" in res.stderr


def test_status_command(daemon):
    with Client.connect(daemon.socket_path) as c:
        c.put([os.urandom(32)], [bytes(1000)])
    out = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", daemon.socket_path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "dram" in out.stdout and "8MiB" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", "/nonexistent.sock"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "cannot reach kvrackd" in missing.stdout


@pytest.mark.parametrize("spin_us", [0, 50], ids=["blocking", "polling"])
def test_a_daemon_that_does_not_answer_times_out(tmp_path, spin_us):
    import socket
    import time

    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)  # accepts into the backlog, never replies
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer hello"):
            Client.connect(path, timeout=0.3, spin_us=spin_us)
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()


def test_more_segments_than_one_message_can_carry_fds_for():
    # 300 segments of 64 KiB: more than SCM_RIGHTS carries in one message
    with DaemonProcess({"dram.capacity_bytes": 300 * 65536, "dram.segment_bytes": 65536}) as d:
        with Client.connect(d.socket_path) as writer:
            keys = [os.urandom(32) for _ in range(300)]
            data = [bytes([i % 251]) * 65536 for i in range(300)]
            assert writer.put(keys, data).stored == 300
            assert len(writer._core.segments.maps) == 300
        with Client.connect(d.socket_path) as reader:  # hello hands out a first batch, map the rest
            outs = [bytearray(65536) for _ in keys]
            assert reader.get_into(keys, outs) == [True] * 300
            assert all(o == b for o, b in zip(outs, data))


def test_background_eviction_keeps_dram_below_the_high_watermark():
    from kvrack.bench.spawn import DaemonProcess

    from .conftest import eventually

    settings = {"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB", "nvme.enabled": "false",
                "dram.evict_high_watermark": "0.75", "dram.evict_low_watermark": "0.5"}
    with DaemonProcess(settings) as d, Client.connect(d.socket_path) as c:
        for _ in range(4):  # 4 × 4 MiB of fresh blocks through an 8 MiB tier
            c.put([os.urandom(32) for _ in range(128)], blocks(128))
        cap = 8 << 20

        def below_high() -> bool:
            s = c.stats()
            return s["tiers"][0]["used_bytes"] <= 0.75 * cap and s["ops"]["background_evictions"] > 0
        assert eventually(below_high)
        stats = c.stats()
        assert stats["ops"]["evictions"] >= stats["ops"]["background_evictions"] > 0
