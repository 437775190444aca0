"""The one workload every store runs: the same keys, bytes, batches and order for each system.

A cell is a block size and a batch size. In each cell the store takes three phases, every one bounded by a
block count and by a deadline:

- write: ``blocks`` new blocks, ``batch`` a request;
- read: the same blocks back in a shuffled order, into buffers of the caller's (what an engine needs: the
  bytes in its own memory), checked against what was written (the first and last block of each request, at
  their first, middle and last 4 KiB);
- mixed: requests alternate between reading a batch of stored blocks and writing a batch of new ones.

Per phase: throughput, p50/p99 per request, and CPU seconds per GB moved, counted from /proc for every process
involved (this client and each server process). Then the replay: a prefix-reuse trace from ``kvrack sim``'s
generators, each request reading its blocks and writing back those it missed from the first miss on (what an
engine does after computing them), into a store given ``replay_memory`` bytes, so eviction decides the hit
ratio; at its end, the resident memory of the server processes per byte of blocks the store holds.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import numpy as np

from kvrack.bench.spawn import process_cpu_s

KiB, MiB = 1024, 1024 * 1024
SIZES = {"64KiB": 64 * KiB, "256KiB": 256 * KiB, "2MiB": 2 * MiB}
BATCHES = (1, 16, 64)


class Store(Protocol):
    """A system under test, through its own client."""

    name: str

    def put(self, keys: Sequence[bytes], blocks: Sequence[np.ndarray]) -> None: ...

    def get(self, keys: Sequence[bytes], out: Sequence[np.ndarray]) -> list[bool]: ...

    def delete(self, keys: Sequence[bytes]) -> None: ...

    def pids(self) -> list[int]: ...

    def held_blocks(self) -> int | None: ...


@dataclass
class Workload:
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    batches: list[int] = field(default_factory=lambda: list(BATCHES))
    working_set: int = 512 * MiB  # bytes written per cell (capped by max_blocks): 16 requests of 16 x 2 MiB
    max_blocks: int = 4096
    phase_seconds: float = 20.0  # a phase stops here, whatever is left (the result says so)
    replay_trace: str = "chat"
    replay_requests: int = 800
    replay_block: int = 256 * KiB
    replay_memory: int = 128 * MiB
    replay_seconds: float = 90.0
    replay_policies: list[str] = field(default_factory=lambda: ["s3fifo"])  # kvrack-shm again, other dram.policy
    seed: int = 11

    def blocks(self, size: int) -> int:
        return max(64, min(self.max_blocks, self.working_set // size))


def memory_bytes(pid: int) -> int:
    """The memory a process holds: its private resident memory (RssAnon + RssFile) plus the shared memory it
    holds, whichever is larger of the shared pages it has touched (RssShmem) and the allocated size of the
    shared-memory files it has open or mapped (memfd, /dev/shm): a tier the daemon allocates but only its
    clients touch counts in full."""
    status = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem"):
                status[name] = int(value.split()[0]) * 1024
    seen: dict[tuple[int, int], int] = {}
    paths = [f"/proc/{pid}/fd/{fd}" for fd in _listdir(f"/proc/{pid}/fd")]
    paths += [f"/proc/{pid}/map_files/{m}" for m in _listdir(f"/proc/{pid}/map_files")]
    for path in paths:
        try:
            target = os.readlink(path)
            if not (target.startswith("/memfd:") or target.startswith("/dev/shm/")):
                continue
            st = os.stat(path)
        except OSError:
            continue
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    shared = max(status.get("RssShmem", 0), sum(seen.values()))
    return status.get("RssAnon", 0) + status.get("RssFile", 0) + shared


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class CpuMeter:
    """CPU seconds of this process and the store's processes between ``start`` and ``stop``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = [os.getpid(), *pids]

    def _now(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += process_cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._now() - self.start


def keys_for(label: str, n: int) -> list[bytes]:
    return [blake3.blake3(f"{label}/{i}".encode()).digest() for i in range(n)]


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def _phase(ops: list[Callable[[], int]], pids: Sequence[int], seconds: float) -> dict[str, Any]:
    """Run ``ops`` (each returns the bytes it moved) back to back until done or the deadline; the figures of
    the phase, by the wall clock: work a store defers past a request's return counts too."""
    latencies: list[float] = []
    moved = 0
    deadline = time.monotonic() + seconds
    with CpuMeter(pids) as cpu:
        t0 = time.perf_counter()
        for op in ops:
            t = time.perf_counter()
            moved += op()
            latencies.append(time.perf_counter() - t)
            if time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"gbs": round(moved / elapsed / 1e9, 4), "ops": len(latencies), "complete": len(latencies) == len(ops),
            "p50_us": round(_quantile(latencies, 0.5) * 1e6, 1), "p99_us": round(_quantile(latencies, 0.99) * 1e6, 1),
            "bytes": moved, "cpu_s_per_gb": round(cpu.seconds / (moved / 1e9), 3) if moved else None}


SAMPLE = 4096


def same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether ``got`` holds ``want``'s bytes where a read that went wrong would show: its first, middle and
    last 4 KiB (a few microseconds, whatever the block size, so the check costs no system anything to speak
    of; the test suite checks every byte)."""
    n = want.nbytes
    for off in {0, max(0, n // 2 - SAMPLE // 2), max(0, n - SAMPLE)}:
        if not np.array_equal(got[off: off + SAMPLE], want[off: off + SAMPLE]):
            return False
    return got.nbytes == n


def run_cell(store: Store, size: int, batch: int, work: Workload, label: str) -> dict[str, Any]:
    """Write, read and mixed phases of one block size and batch size; every key written is deleted after."""
    n = work.blocks(size)
    rng = np.random.default_rng(work.seed)
    pool = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(8)]  # block i holds pool[i % 8]
    out = [np.ones(size, dtype=np.uint8) for _ in range(batch)]  # touched: no first-touch faults in a phase
    keys = keys_for(f"{label}/{size}/{batch}", n)
    fresh = keys_for(f"{label}/{size}/{batch}/mixed", n)
    order = list(range(n))
    random.Random(work.seed).shuffle(order)
    spans = [range(s, min(n, s + batch)) for s in range(0, n, batch)]
    pids = store.pids()
    bad: list[int] = []

    def write(ks: list[bytes], first: int) -> Callable[[], int]:
        blocks = [pool[(first + j) % 8] for j in range(len(ks))]

        def op() -> int:
            store.put(ks, blocks)
            return len(ks) * size
        return op

    def read(idx: list[int]) -> Callable[[], int]:
        ks = [keys[i] for i in idx]

        def op() -> int:
            hits = store.get(ks, out[: len(ks)])
            if not all(hits):
                raise RuntimeError(f"{store.name}: {hits.count(False)} of {len(ks)} blocks just written were missing")
            for j in {0, len(idx) - 1}:  # the first and the last block of the request, sampled
                if not same_bytes(out[j], pool[idx[j] % 8]):
                    bad.append(idx[j])
            return len(ks) * size
        return op

    try:
        result = {"blocks": n, "write": _phase([write([keys[i] for i in s], s.start) for s in spans], pids,
                                              work.phase_seconds)}
        shuffled = [[order[i] for i in s] for s in spans]
        result["read"] = _phase([read(idx) for idx in shuffled], pids, work.phase_seconds)
        mixed: list[Callable[[], int]] = []
        for j, s in enumerate(spans[: max(1, len(spans) // 2)]):
            mixed += [read(shuffled[-1 - j]), write([fresh[i] for i in s], s.start)]
        result["mixed"] = _phase(mixed, pids, work.phase_seconds)
    finally:
        store.delete(keys)
        store.delete(fresh)
    if bad:
        raise RuntimeError(f"{store.name}: bytes read back differ from those written (blocks {bad[:5]})")
    return result


def replay_requests(work: Workload) -> list[list[bytes]]:
    """The replay's requests, each its blocks' keys in prefix order."""
    from kvrack.bench.sim import traces

    generators: dict[str, Callable[[], list[traces.Request]]] = {
        "chat": traces.chat, "rag": traces.rag, "zipf": traces.zipf, "scan": traces.scan}
    requests = generators[work.replay_trace]()[: work.replay_requests]
    return [[blake3.blake3(f"replay/{k}".encode()).digest() for k in r.keys] for r in requests]


def run_replay(store: Store, requests: list[list[bytes]], work: Workload, chunk: int = 64) -> dict[str, Any]:
    """Prefix hits of the replay; the store must already have ``work.replay_memory`` as its memory limit."""
    size = work.replay_block
    block = np.random.default_rng(work.seed).integers(0, 256, size, dtype=np.uint8)
    out = [np.ones(size, dtype=np.uint8) for _ in range(chunk)]
    asked = hit = written = done = 0
    deadline = time.monotonic() + work.replay_seconds
    pids = store.pids()
    with CpuMeter(pids) as cpu:
        t0 = time.perf_counter()
        for keys in requests:
            prefix = 0
            for s in range(0, len(keys), chunk):  # read the prefix chunk by chunk until the first miss
                hits = store.get(keys[s: s + chunk], out[: len(keys[s: s + chunk])])
                run = hits.index(False) if False in hits else len(hits)
                prefix += run
                if run < len(hits):
                    break
            for s in range(prefix, len(keys), chunk):  # computed by the engine, written back
                part = keys[s: s + chunk]
                store.put(part, [block] * len(part))
            asked += len(keys)
            hit += prefix
            written += len(keys) - prefix
            done += 1
            if time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - t0
    held = store.held_blocks()
    rss = sum(memory_bytes(p) for p in pids)
    moved = (hit + written) * size  # prefix hits read, misses written back
    return {"trace": work.replay_trace, "requests": done, "complete": done == len(requests), "blocks_asked": asked,
            "hit_ratio": round(hit / asked, 4) if asked else None, "block_bytes": size,
            "memory_limit_bytes": work.replay_memory, "seconds": round(elapsed, 3),
            "gbs": round(moved / elapsed / 1e9, 4),
            "cpu_s_per_gb": round(cpu.seconds / (moved / 1e9), 3) if moved else None,
            "held_blocks": held, "server_memory_bytes": rss, "put_failures": getattr(store, "put_failures", 0),
            "memory_bytes_per_held_byte": round(rss / (held * size), 3) if held else None,
            "memory_overhead_per_stored_gb": round((rss - held * size) / (held * size), 3) if held else None}
