"""``kvrack bench hbm``: reads from the daemon's HBM arena into a client's GPU buffers vs a device-to-device
memcpy of the same sizes, in one run.

A daemon with the HBM tier is started; a client stores a working set of
blocks, reads each once into GPU buffers (host to device from the mapped
DRAM slots: the figure for blocks not yet in HBM) and waits until the daemon
has copied them all up. Then, in interleaved passes, the best of each kept:
``cudaMemcpyAsync`` device to device between two buffers of the client's
own (the baseline), and ``get_into`` of every block into GPU buffers, which
acquires, copies device to device from the arena through the CUDA IPC
mapping, and releases. Without a GPU the figures are null and
``hbm_unavailable`` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients.client import Client
from kvrack.clients.gpu import Copier, device_span
from kvrack.tiers.hbm_ipc import probe

MiB = 1 << 20
SIZES = {"2MiB": 2 * MiB, "256KiB": 256 * 1024}
BATCH_BYTES = 64 * MiB


def _wait_promoted(c: Client, n: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        tier = next(t for t in c.stats()["tiers"] if t["tier"] == "hbm")
        if tier["promoted_blocks"] + tier["skipped_blocks"] >= n and not tier["copies_in_flight"]:
            return tier
        if time.monotonic() > deadline:
            raise TimeoutError(f"hbm bench: {tier['promoted_blocks']} of {n} blocks reached HBM")
        time.sleep(0.05)


def _one_size(c: Client, name: str, working_set: int, repeats: int) -> dict[str, Any]:
    import cupy as cp

    size = SIZES[name]
    n = max(8, working_set // size)
    per_batch = max(1, BATCH_BYTES // size)
    rng = np.random.default_rng(7)
    keys = [rng.bytes(32) for _ in range(n)]
    data = rng.integers(0, 256, size, dtype=np.uint8)
    before = next(t for t in c.stats()["tiers"] if t["tier"] == "hbm")["promoted_blocks"]
    if c.put(keys, [data] * n).stored != n:
        raise RuntimeError(f"hbm bench: the daemon did not store all {n} blocks of {name}")
    outs = [cp.empty(size, cp.uint8) for _ in range(per_batch)]
    src = cp.empty(size * per_batch, cp.uint8)
    dst = cp.empty(size * per_batch, cp.uint8)

    def get_pass() -> float:
        t = time.perf_counter()
        for i in range(0, n, per_batch):
            batch = keys[i:i + per_batch]
            if not all(c.get_into(batch, outs[:len(batch)])):
                raise RuntimeError(f"hbm bench: a block of {name} was missed")
        return size * n / (time.perf_counter() - t) / 1e9

    s, d = device_span(src), device_span(dst)
    assert s is not None and d is not None

    def d2d_pass() -> float:
        copier = Copier(d.device)
        t = time.perf_counter()
        for i in range(0, n, per_batch):
            for j in range(min(per_batch, n - i)):
                copier.device_to_device(d.ptr + j * size, s.ptr + j * size, size)
            copier.wait()
        return size * n / (time.perf_counter() - t) / 1e9

    first = get_pass()  # host to device from DRAM; counts the read that promotes
    _wait_promoted(c, before + n)
    reads0 = c.stats()["client"]["hbm_reads"]
    gets, d2ds = [], []
    for _ in range(repeats):
        d2ds.append(d2d_pass())
        gets.append(get_pass())
    from_hbm = c.stats()["client"]["hbm_reads"] - reads0
    if from_hbm < n * repeats:
        raise RuntimeError(f"hbm bench: only {from_hbm} of {n * repeats} reads came from HBM")
    c.delete(keys)
    return {"blocks": n, "block_bytes": size, "batch_blocks": per_batch, "dram_to_gpu_get_gbs": first,
            "d2d_memcpy_gbs": max(d2ds), "hbm_get_gbs": max(gets), "hbm_get_vs_d2d_memcpy": max(gets) / max(d2ds)}


def run(names: list[str], working_set: int, repeats: int, device: int = 0,
        progress: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    present, why = probe(device)
    if not present:
        return {"device": device, "hbm_unavailable": why, "hbm_get_vs_d2d_memcpy": None, "sizes": {}}
    capacity = max(64 * MiB, 2 * working_set)
    settings: dict[str, object] = {"dram.capacity_bytes": str(capacity + 64 * MiB), "dram.segment_bytes": "32MiB",
                "nvme.enabled": "false", "hbm.enabled": "true", "hbm.device": str(device),
                "hbm.capacity_bytes": str(capacity), "hbm.segment_bytes": "64MiB", "hbm.promote_after_hits": "1"}
    sizes: dict[str, Any] = {}
    with DaemonProcess(settings) as d, Client.connect(d.socket_path) as c:
        for name in names:
            progress(f"hbm {name}")
            sizes[name] = _one_size(c, name, working_set, repeats)
    headline = sizes.get("2MiB", sizes[names[0]])
    return {"device": device, "hbm_unavailable": None, "repeats": repeats, "sizes": sizes,
            "hbm_get_vs_d2d_memcpy": headline["hbm_get_vs_d2d_memcpy"],
            "hbm_get_gbs": headline["hbm_get_gbs"], "d2d_memcpy_gbs": headline["d2d_memcpy_gbs"]}
