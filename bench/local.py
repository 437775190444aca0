"""``kvrack bench local``: same-host put/get/lookup against memcpy, measured in one run.

Every kvrack figure is paired with a baseline taken in the same run on the
same buffers: put and get bandwidth against ``numpy.copyto`` of the same
block sizes and batches. Each figure is the best of ``repeats`` passes, for
the baseline and for kvrack alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvrack.bench.spawn import DaemonProcess, rss_anon_bytes, wait_until_paged_in
from kvrack.bench.targets import check_targets
from kvrack.clients.admin import find_admin
from kvrack.clients.client import Client

MiB = 1024 * 1024
SIZES = {"64KiB": 64 * 1024, "2MiB": 2 * MiB, "16MiB": 16 * MiB}
BATCH_BYTES = 64 * MiB  # bytes per put/get request batch
WORKING_SET = 256 * MiB  # bytes per size per pass


def _best(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def _keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def bench_bandwidth(client: Client, size: int, repeats: int, working_set: int = WORKING_SET) -> dict[str, float]:
    """GB/s of memcpy, put and get_into for blocks of ``size`` bytes."""
    n = max(1, working_set // size)
    batch = max(1, min(n, BATCH_BYTES // size))
    rng = np.random.default_rng(size)
    src = [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(n)]
    dst = [np.ones(size, dtype=np.uint8) for _ in range(n)]
    total = n * size

    def memcpy() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            np.copyto(dst[i], src[i])
        return time.perf_counter() - t0

    keys: list[bytes] = []

    def put() -> float:
        if keys:
            client.delete(keys)
        keys[:] = _keys(n)
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            client.put(keys[s : s + batch], src[s : s + batch])
        return time.perf_counter() - t0

    def get() -> float:
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            hits = client.get_into(keys[s : s + batch], dst[s : s + batch])
            if not all(hits):
                raise RuntimeError("get_into missed blocks that were just stored; is the DRAM tier too small?")
        return time.perf_counter() - t0

    t_memcpy = _best(memcpy, repeats)
    try:
        t_put = _best(put, repeats)
        t_get = _best(get, repeats)
        if not all(np.array_equal(a, b) for a, b in zip(src[:4], dst[:4])):
            raise RuntimeError("bytes read back differ from bytes stored")
    finally:
        client.delete(keys)
    gbs = lambda t: total / t / 1e9  # noqa: E731
    return {"block_bytes": size, "blocks": n, "batch": batch, "memcpy_gbs": round(gbs(t_memcpy), 3),
            "put_gbs": round(gbs(t_put), 3), "get_gbs": round(gbs(t_get), 3),
            "put_vs_memcpy": round(t_memcpy / t_put, 3), "get_vs_memcpy": round(t_memcpy / t_get, 3)}


def bench_lookup(client: Client, stored: int = 100_000, batch: int = 8192, seconds: float = 1.0) -> dict[str, float]:
    """Keys per second through batched lookups, all hits (the common prefix-probe case)."""
    keys = _keys(stored)
    blob = np.zeros(64, dtype=np.uint8)
    try:
        for s in range(0, stored, 16384):
            client.put(keys[s : s + 16384], [blob] * len(keys[s : s + 16384]))
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        i = 0
        while time.perf_counter() < deadline and done < 50_000_000:
            chunk = keys[i : i + batch] if i + batch <= stored else keys[:batch]
            i = (i + batch) % (stored - batch)
            res = client.lookup(chunk)
            if res.prefix != len(chunk):
                raise RuntimeError("lookup missed stored keys")
            done += len(chunk)
        elapsed = time.perf_counter() - t0
    finally:
        client.delete(keys)
    return {"lookup_keys_per_s": round(done / elapsed), "lookup_batch": batch}


def bench_dict_lookup(stored: int = 100_000, batch: int = 8192, seconds: float = 0.5) -> dict[str, float]:
    """Baseline for lookups: membership tests of the same keys, batch by batch, in a dict of this process (the
    least work per key any Python index does)."""
    keys = _keys(stored)
    index = dict.fromkeys(keys)
    done, i = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = keys[i : i + batch]
        i = (i + batch) % (stored - batch)
        if not all(map(index.__contains__, chunk)):
            raise RuntimeError("dict lookup missed")
        done += len(chunk)
    return {"dict_lookup_keys_per_s": round(done / (time.perf_counter() - t0))}


def bench_rtt(client: Client, iterations: int = 5000) -> dict[str, float]:
    """Single-key lookup round trips: the floor of any request."""
    key = [os.urandom(32)]
    for _ in range(200):
        client.lookup(key)
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        client.lookup(key)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {"rtt_p50_us": round(samples[len(samples) // 2] / 1000, 2),
            "rtt_p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 2),
            "rtt_mean_us": round(statistics.fmean(samples) / 1000, 2)}


def bench_raw_rtt(iterations: int = 5000) -> dict[str, float]:
    """Baseline: a 64-byte ping-pong between two Python processes over a Unix socket pair."""
    import socket

    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # echo child
        a.close()
        buf = bytearray(65536)
        try:
            while True:
                n = b.recv_into(buf)
                if not n:
                    break
                b.sendall(buf[:n])
        finally:
            os._exit(0)
    b.close()
    msg = b"x" * 64
    samples = []
    try:
        for i in range(iterations + 200):
            t0 = time.perf_counter_ns()
            a.sendall(msg)
            a.recv(65536)
            if i >= 200:
                samples.append(time.perf_counter_ns() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    samples.sort()
    return {"raw_socket_rtt_p50_us": round(samples[len(samples) // 2] / 1000, 2)}


def bench_index_memory(blocks: int = 1_000_000, batch: int = 16384, nvme: bool = False) -> dict[str, Any]:
    """Daemon RSS growth per block it holds, on a private daemon given ``blocks`` 64-byte blocks.

    The tier has room for every block and the background evictor is off, so nothing stored is evicted;
    the growth is divided by the blocks held at the end (beyond those held when it was first measured)
    all the same. With ``nvme`` the NVMe tier is on and big enough for every block, so the figure includes
    what each write-through copy costs in memory (its location, its CLOCK slot).
    """
    capacity = max(64 * MiB, -(-blocks * 64 * 9 // 8 // (64 * MiB)) * 64 * MiB)
    settings: dict[str, object] = {"dram.capacity_bytes": capacity, "nvme.enabled": str(nvme).lower(),
                                   "dram.evict_high_watermark": "1.0"}
    if nvme:  # one 4 KiB slot a block on O_DIRECT media
        settings["nvme.capacity_bytes"] = -(-blocks * 4096 // (64 * MiB)) * 64 * MiB + 128 * MiB
    with DaemonProcess(settings) as daemon, Client.connect(daemon.socket_path) as client:
        blob = np.zeros(64, dtype=np.uint8)
        warm = _keys(batch)  # first batch warms the allocator and frame buffers out of the measurement
        client.put(warm, [blob] * batch)
        before = rss_anon_bytes(daemon.pid)
        held_before = client.stats()["tiers"][0]["blocks"]
        stored = 0
        while stored < blocks:
            keys = _keys(min(batch, blocks - stored))
            client.put(keys, [blob] * len(keys))
            stored += len(keys)
        while nvme and client.stats()["tiers"][1]["pending_writes"]:
            time.sleep(0.01)
        after = rss_anon_bytes(daemon.pid)
        total = client.stats()["tiers"][0]["blocks"]
        if nvme and client.stats()["tiers"][1]["blocks"] != total:
            raise RuntimeError("not every block reached the NVMe tier")
    held = total - held_before
    if held <= 0:
        raise RuntimeError(f"the daemon holds {total} blocks after {stored} were stored")
    return {"index_blocks": total, "index_blocks_stored": stored + batch,
            "index_bytes_per_block": round((after - before) / held, 1)}


def _idle_priority() -> None:
    """In a child before exec: run only on CPU time no one else wants."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


# ratios to baselines of the same run, so that a check follows the machine (lookups: 1 M keys/s and the round
# trip: 50 µs, on the machine these were set on)
TARGETS = {"get_vs_memcpy": (">=", 0.8), "put_vs_memcpy": (">=", 0.7), "lookup_vs_dict": (">=", 0.035),
           "rtt_vs_raw_socket": ("<=", 4.0), "index_bytes_per_block": ("<=", 300)}


def run(address: str | None, sizes: list[str], repeats: int, index_blocks: int,
        progress: Callable[[str], None] = lambda _s: None, working_set: int = WORKING_SET,
        admin_load: bool = False, events: bool = False) -> dict[str, Any]:
    """Every figure of the benchmark, against a private daemon started for it (its DRAM tier alone: write-through
    to NVMe is measured by ``bench nvme``), or with ``address`` against a running daemon, whose figures then
    include whatever that daemon is configured to do (every block the benchmark stores is deleted after).
    ``admin_load``: an operator's load on the admin API meanwhile, from another process (``bench.admin_load``).
    ``events``: the private daemon publishes KV events, and a router's subscriber in another process keeps an
    index of them (``bench.events_sub``)."""
    daemon = None
    subscriber = None
    if events and address is not None:
        raise ValueError("--events measures a private daemon (it sets events.enabled); leave out --address")
    if address is None:
        settings = {"dram.capacity_bytes": "1GiB", "nvme.enabled": "false"}
        if events:
            endpoint = f"ipc://{tempfile.gettempdir()}/kvrack-bench-events-{os.getpid()}.ipc"
            settings.update({"events.enabled": "true", "events.endpoint": endpoint})
        daemon = DaemonProcess(settings)
        address = daemon.socket_path
        if events:
            # a router runs on cores (or hosts) of its own; here it shares the machine with the benchmark, so it
            # runs on idle CPU time only (SCHED_IDLE): it still takes in every event (its gaps and counts say so),
            # what it has not read waiting in its socket
            subscriber = subprocess.Popen([sys.executable, "-m", "kvrack.bench.events_sub", endpoint],
                                          stdout=subprocess.PIPE, text=True, preexec_fn=_idle_priority)
    out: dict[str, Any] = {"daemon": "private" if daemon else address, "sizes": {}, "working_set_bytes": working_set,
                           "repeats": repeats, "cpu_count": os.cpu_count()}
    load = None
    try:
        if admin_load:
            load = subprocess.Popen([sys.executable, "-m", "kvrack.bench.admin_load", find_admin(None, address)],
                                    stdout=subprocess.PIPE, text=True)
        with Client.connect(address, client_name="kvrack-bench") as client:
            wait_until_paged_in(client)
            for name in sizes:
                progress(f"bandwidth {name}")
                out["sizes"][name] = bench_bandwidth(client, SIZES[name], repeats, working_set)
            progress("lookup")
            out.update(bench_lookup(client))
            out.update(bench_dict_lookup())
            out["lookup_vs_dict"] = round(out["lookup_keys_per_s"] / out["dict_lookup_keys_per_s"], 3)
            progress("round trip")
            out.update(bench_raw_rtt())
            out.update(bench_rtt(client))
            out["rtt_vs_raw_socket"] = round(out["rtt_p50_us"] / out["raw_socket_rtt_p50_us"], 2)
    finally:
        if load is not None:
            load.terminate()
            text = load.communicate(timeout=30)[0]
            if not text.strip():
                raise RuntimeError(f"the admin load process failed (exit {load.returncode}); see its output above")
            out["admin_load"] = json.loads(text)
        if daemon is not None:
            daemon.stop()
        if subscriber is not None:
            subscriber.terminate()
            out["events_subscriber"] = json.loads(subscriber.communicate(timeout=30)[0] or "{}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint.removeprefix("ipc://"))
    if index_blocks:
        progress(f"index memory ({index_blocks} blocks)")
        out.update(bench_index_memory(index_blocks))
    ref = out["sizes"].get("2MiB") or next(iter(out["sizes"].values()), None)
    if ref:
        out["get_vs_memcpy"] = ref["get_vs_memcpy"]
        out["put_vs_memcpy"] = ref["put_vs_memcpy"]
        out["memcpy_gbs"] = ref["memcpy_gbs"]
    out["targets"] = {name: bound for name, (_op, bound) in TARGETS.items()}
    out["checks"] = check_targets(out, TARGETS)
    return out
