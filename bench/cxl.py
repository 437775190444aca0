"""``kvrack bench cxl``: reads from a CXL region by a second process against memcpy, in one run.

The writer (this process) formats a region, registers as a host and stores
a working set of blocks per size, larger than the last-level cache. A second
process, which shares nothing with the first but the mapping, then measures
in turn: memcpy of the same sizes from a private buffer of the same working
set into one destination (the baseline: what a read costs when no tier
protocol is involved); ``read`` of every block in random order with the full
non-coherent protocol (drop the entry's and the block's cache lines, copy,
re-check the entry's version), each block as if this process had never read
it; the same again right after, when every block is unchanged since this
process read it (the entry's version proves it, so the lines need not be
dropped); first reads again, 64 blocks per ``read_many`` call, as a client's
``get_into`` reads a prefix; the same without the invalidation step (what a host whose hardware
keeps the region coherent pays); and batched lookups in the shared index.
The copy figures come from ``repeats`` interleaved passes, the best of each
kept.

The invalidation itself is timed too: the same blocks' lines dropped, in the
same order and after the same memcpy pass as the first reads see, with no
copy. memcpy time over memcpy plus that time is the most a first read that
must drop its lines can reach on this CPU (``invalidate_bound_vs_memcpy``),
and ``get_vs_invalidate_bound`` says how close the read path comes to it:
the first figure is the hardware's, the second the protocol's.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np

from kvrack import _native
from kvrack.tiers.cxl import CxlRegion

MiB = 1 << 20
SIZES = {"2MiB": 2 * MiB, "256KiB": 256 * 1024, "64KiB": 64 * 1024}
LOOKUP_BATCH = 64
READ_BATCH = 64  # blocks per read_many call in the batched pass


def _keys(name: str, n: int) -> list[bytes]:
    return [blake3.blake3(f"bench-cxl-{name}-{i}".encode()).digest() for i in range(n)]


def _read_one_size(name: str, path: str, n: int, repeats: int) -> tuple[dict[str, Any], CxlRegion, list[bytes]]:
    size = SIZES[name]
    region = CxlRegion.open(path, "bench")
    keys = _keys(name, n)
    order = list(range(n))
    random.Random(1).shuffle(order)
    private = np.random.default_rng(2).integers(0, 256, size * n, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)

    def memcpy_pass() -> float:
        t = time.perf_counter()
        for i in order:
            _native.copy(dst, 0, private, i * size, size)
        return size * n / (time.perf_counter() - t) / 1e9

    def read_pass(invalidate: bool, first_read: bool = True) -> Callable[[], float]:
        def run() -> float:
            region.invalidate = invalidate
            if first_read:  # as if this process had never read these blocks: every read drops the lines
                region.forget_reads()
            t = time.perf_counter()
            for i in order:
                if region.read(keys[i], dst) != size:
                    raise RuntimeError(f"cxl bench: block {i} of {name} missing")
            return size * n / (time.perf_counter() - t) / 1e9
        return run

    data_at = {key: region.g.data_offset + chunk * region.g.chunk_bytes
               for _slot, state, key, chunk, _n in region.entries() if state == "ready"}
    block_offsets = [data_at[keys[i]] for i in order]

    def invalidate_pass() -> float:  # seconds to drop every block's lines, nothing copied
        memcpy_pass()  # untimed: the caches as the first-read pass finds them
        t = time.perf_counter()
        for off in block_offsets:
            _native.invalidate(region.mm, off, size)  # clflushopt (or clflush) over the block, then mfence
        return time.perf_counter() - t

    batches = [([keys[i] for i in order[j:j + READ_BATCH]], [dst] * len(order[j:j + READ_BATCH]))
               for j in range(0, n, READ_BATCH)]

    def batched_pass() -> float:  # what an engine's get_into does for a prefix: read_many, first reads
        region.invalidate = True
        region.forget_reads()
        t = time.perf_counter()
        for batch, dsts in batches:
            if any(got != size for got in region.read_many(batch, dsts)):
                raise RuntimeError(f"cxl bench: a block of {name} missing")
        return size * n / (time.perf_counter() - t) / 1e9

    # interleaved passes, the best of each kept: drift in the machine's speed hits them all alike
    passes: dict[str, list[float]] = {"memcpy": [], "get": [], "repeat": [], "batched": [], "coherent": []}
    invalidate_s: list[float] = []
    for _ in range(repeats):
        passes["memcpy"].append(memcpy_pass())
        passes["get"].append(read_pass(True)())
        passes["repeat"].append(read_pass(True, first_read=False)())  # every block unchanged since the last pass
        passes["batched"].append(batched_pass())
        passes["coherent"].append(read_pass(False)())
        invalidate_s.append(invalidate_pass())
    best = {k: max(v) for k, v in passes.items()}
    memcpy_gbs = best["memcpy"]
    memcpy_s, drop_s = size * n / memcpy_gbs / 1e9, min(invalidate_s)
    bound_gbs = size * n / (memcpy_s + drop_s) / 1e9  # a read that drops the lines, then copies as memcpy does
    return ({"blocks": n, "block_bytes": size, "working_set_bytes": size * n, "memcpy_gbs": memcpy_gbs,
             "get_gbs": best["get"], "get_repeat_gbs": best["repeat"], "get_batched_gbs": best["batched"],
             "get_coherent_gbs": best["coherent"], "get_vs_memcpy": best["get"] / memcpy_gbs,
             "get_repeat_vs_memcpy": best["repeat"] / memcpy_gbs,
             "get_batched_vs_memcpy": best["batched"] / memcpy_gbs,
             "get_coherent_vs_memcpy": best["coherent"] / memcpy_gbs,
             "invalidate_us_per_block": drop_s / n * 1e6, "invalidate_bound_vs_memcpy": bound_gbs / memcpy_gbs,
             "get_vs_invalidate_bound": best["get"] / bound_gbs},
            region, keys)


def _lookup_rate(region: CxlRegion, keys: list[bytes], invalidate: bool, seconds: float, repeats: int) -> float:
    n = len(keys)
    packed = [b"".join(keys[(j + k) % n] for k in range(LOOKUP_BATCH)) for j in range(0, n, 7)]
    res = np.empty(LOOKUP_BATCH, dtype=np.int64)
    region.invalidate = invalidate
    best = 0.0
    for _ in range(repeats):
        done, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / repeats:
            for batch in packed:
                if region.lookup(batch, res)[0] != LOOKUP_BATCH:
                    raise RuntimeError("cxl bench: a lookup missed")
                done += LOOKUP_BATCH
        best = max(best, done / (time.perf_counter() - t))
    return best


def _dict_rate(keys: list[bytes], seconds: float) -> float:
    """Baseline for lookups: membership tests of the same keys, in batches of the same size, in a dict of this
    process."""
    index = dict.fromkeys(keys)
    n = len(keys)
    batches = [[keys[(j + k) % n] for k in range(LOOKUP_BATCH)] for j in range(0, n, 7)]
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds / 2:
        for batch in batches:
            if not all(map(index.__contains__, batch)):
                raise RuntimeError("cxl bench: a dict lookup missed")
            done += LOOKUP_BATCH
    return done / (time.perf_counter() - t)


def _reader(paths: dict[str, str], counts: dict[str, int], repeats: int, lookup_seconds: float) -> dict[str, Any]:
    """Runs in the second process: only the mapping is shared with the writer."""
    out: dict[str, Any] = {}
    for name, path in paths.items():
        out[name], region, keys = _read_one_size(name, path, counts[name], repeats)
        if name == next(iter(paths)):
            out["lookup_keys_per_s"] = _lookup_rate(region, keys, True, lookup_seconds, repeats)
            out["lookup_keys_per_s_coherent"] = _lookup_rate(region, keys, False, lookup_seconds, repeats)
            out["dict_lookup_keys_per_s"] = _dict_rate(keys, lookup_seconds)
        region.close()
    return out


def run(directory: str | None, names: list[str], working_set: int, repeats: int, lookup_seconds: float = 2.0,
        progress: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    base = directory or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    paths: dict[str, str] = {}
    counts: dict[str, int] = {}
    regions: list[CxlRegion] = []
    puts: dict[str, float] = {}
    try:
        for name in names:
            size = SIZES[name]
            n = max(8, working_set // size)
            path = os.path.join(base, f"kvrack-bench-cxl-{os.getpid()}-{name}")
            paths[name], counts[name] = path, n
            progress(f"writing {n} blocks of {name}")
            region = CxlRegion.create(path, n * size + n * 256 + 64 * MiB, size, "bench")
            regions.append(region)
            region.register_host()
            blob = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
            keys = _keys(name, n)
            t = time.perf_counter()
            for k in keys:
                if not region.put(k, blob):
                    raise RuntimeError("cxl bench: a fresh region already held a block")
            puts[name] = size * n / (time.perf_counter() - t) / 1e9
        progress("reading from a second process")
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            read = pool.submit(_reader, paths, counts, repeats, lookup_seconds).result()
    finally:
        for region in regions:
            region.close()
        for path in paths.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    sizes = {name: {**read[name], "put_gbs": puts[name]} for name in names}
    headline = sizes.get("2MiB", sizes[names[0]])  # the targets are set at 2 MiB
    return {
        "directory": base, "primitives": _native.primitives(), "repeats": repeats, "sizes": sizes,
        "cxl_get_vs_memcpy": headline["get_vs_memcpy"],
        "cxl_get_repeat_vs_memcpy": headline["get_repeat_vs_memcpy"],
        "cxl_get_batched_vs_memcpy": headline["get_batched_vs_memcpy"],
        "cxl_get_coherent_vs_memcpy": headline["get_coherent_vs_memcpy"],
        "cxl_invalidate_us_per_block": headline["invalidate_us_per_block"],
        "cxl_invalidate_bound_vs_memcpy": headline["invalidate_bound_vs_memcpy"],
        "cxl_get_vs_invalidate_bound": headline["get_vs_invalidate_bound"],
        "cxl_lookup_keys_per_s": read["lookup_keys_per_s"],
        "cxl_lookup_keys_per_s_coherent": read["lookup_keys_per_s_coherent"],
        "dict_lookup_keys_per_s": round(read["dict_lookup_keys_per_s"]),
        # the target (2 M keys/s on the machine it was set on) as a ratio to the same run's baseline
        "cxl_lookup_vs_dict": round(read["lookup_keys_per_s"] / read["dict_lookup_keys_per_s"], 3),
        "lookup_batch": LOOKUP_BATCH,
    }
