"""``kvrack bench overwrite``: put latency while DRAM is full and every put displaces older blocks.

One client writes fresh blocks, one put at a time: a first fill of the DRAM
tier, then, measured, several capacities more, so every put needs room that
eviction must make. Run twice in one go, against two daemons that differ only in
``dram.evict_high_watermark``: with the background evictor (default
watermarks) and without it (1.0: each put evicts on its own path). The
figure that matters is p99 against p50: a put should rarely wait. With
``chain_depth`` > 1 the blocks form chains of that many (each put names the
previous block as its parent, as an engine storing a long prompt does), so
eviction works leaf first through deep chains.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvrack.bench.spawn import DaemonProcess, wait_until_paged_in
from kvrack.clients.client import Client

MiB = 1 << 20


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e6
    return {"p50_us": round(float(np.percentile(a, 50)), 1), "p90_us": round(float(np.percentile(a, 90)), 1),
            "p99_us": round(float(np.percentile(a, 99)), 1), "p999_us": round(float(np.percentile(a, 99.9)), 1),
            "max_us": round(float(a.max()), 1)}


def _run_one(settings: dict[str, Any], capacity: int, block: int, puts: int, chain_depth: int) -> dict[str, Any]:
    blob = np.random.default_rng(1).integers(0, 256, block, dtype=np.uint8)
    n = 0
    parent: bytes | None = None

    def put_one(c: Client) -> None:
        nonlocal n, parent
        key = os.urandom(32)
        c.put([key], [blob], [parent if n % chain_depth else None])
        parent = key
        n += 1

    with DaemonProcess(settings) as d, Client.connect(d.socket_path) as c:
        wait_until_paged_in(c)
        for _ in range(capacity // block):  # the first fill (maps every segment); the overwrite starts after it
            put_one(c)
        lat = []
        for _ in range(puts):
            t = time.perf_counter()
            put_one(c)
            lat.append(time.perf_counter() - t)
        ops = c.stats()["ops"]
    out = _percentiles(lat)
    out.update(p99_vs_p50=round(out["p99_us"] / out["p50_us"], 3), puts=puts, evictions=ops["evictions"],
               background_evictions=ops["background_evictions"])
    return out


def run(capacity: int, block: int, fills: float, progress: Callable[[str], None] = lambda label: None,
        chain_depth: int = 1) -> dict[str, Any]:
    if chain_depth < 1:
        raise ValueError("chain depth must be at least 1")
    puts = max(100, int(capacity * fills) // block)
    base = {"dram.capacity_bytes": capacity, "dram.segment_bytes": "16MiB", "nvme.enabled": "false"}
    progress("with the background evictor")
    background = _run_one(base, capacity, block, puts, chain_depth)
    progress("each put evicting for itself")
    inline = _run_one({**base, "dram.evict_high_watermark": "1.0"}, capacity, block, puts, chain_depth)
    return {"capacity_bytes": capacity, "block_bytes": block, "chain_depth": chain_depth, "puts": puts,
            "background": background, "inline": inline, "put_p50_us": background["p50_us"],
            "put_p99_us": background["p99_us"], "put_p99_vs_p50": background["p99_vs_p50"]}
