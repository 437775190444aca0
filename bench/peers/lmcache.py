"""LMCache's multi-process server beside kvrack, on the same KV shapes.

LMCache's per-node daemon (``lmcache server``, its L1 in host memory, LRU) is driven by LMCache's own client
harness, ``lmcache bench server --mode cpu --transfer-mode lmcache_driven``: CPU KV tensors in vLLM's paged
layout registered with the server, then for each request a cold LOOKUP + STORE and a warm LOOKUP + RETRIEVE,
checksummed. kvrack gets the same tensors through its paged-KV torch API (``put_kv`` / ``get_kv`` over shared
memory, one copy each way). Shapes: Llama-8B-like layers (8 KV heads x 128, fp16, 16-token blocks), 1, 4 or 32
layers so that one block is 64 KiB, 256 KiB or 2 MiB; requests of 256 or 1024 tokens (batches of 16 or 64
blocks; LMCache moves whole 256-token chunks, so a one-block request has no counterpart there).

LMCache runs from its own environment (its requirements pin versions an engine's environment may not have):
``--lmcache PATH`` names its ``lmcache`` command (``make bench-peers`` builds ``.venv-lmcache``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvrack.bench.peers.workload import CpuMeter, memory_bytes
from kvrack.bench.spawn import DaemonProcess, _die_with_parent, free_port, process_cpu_s, terminate, wait_until_paged_in

BLOCK_TOKENS, KV_HEADS, HEAD_DIM = 16, 8, 128
LAYERS = {"64KiB": 1, "256KiB": 4, "2MiB": 32}  # 2 (K, V) x 16 x 8 x 128 x 2 bytes = 64 KiB a layer
TOKENS = (256, 1024)  # batches of 16 and 64 blocks
MEMORY_GB = 2


def default_command() -> str | None:
    """The ``lmcache`` command: on PATH, else in ``.venv-lmcache`` of the working directory."""
    found = shutil.which("lmcache")
    if found:
        return found
    local = os.path.abspath(os.path.join(".venv-lmcache", "bin", "lmcache"))
    return local if os.access(local, os.X_OK) else None


def missing(command: str | None) -> str | None:
    if command is None:
        return ("LMCache is not installed: `make bench-peers` builds .venv-lmcache (lmcache and the CPU build of "
                "torch); or pass --lmcache PATH to its lmcache command")
    probe = subprocess.run([os.path.join(os.path.dirname(command), "python"), "-c",
                            "import lmcache, torch; print(lmcache.__version__ if hasattr(lmcache, '__version__') "
                            "else '', torch.__version__)"], capture_output=True, text=True, timeout=300, check=False)
    if probe.returncode != 0:
        return f"LMCache does not import beside {command}: {probe.stderr.strip()[-500:]}"
    return None


def version(command: str) -> dict[str, str]:
    py = os.path.join(os.path.dirname(command), "python")
    out = subprocess.run([py, "-c", "from importlib.metadata import version as v; "
                                    "print(v('lmcache'), v('torch'))"],
                         capture_output=True, text=True, timeout=120, check=False).stdout.split()
    return {"lmcache": out[0] if out else "?", "torch (lmcache env)": out[1] if len(out) > 1 else "?"}


class LMCacheServer:
    """``lmcache server --l1-size-gb G --eviction-policy LRU`` on free loopback ports; stopped by ``stop``."""

    def __init__(self, command: str, memory_gb: float, log_path: str, timeout: float = 180.0,
                 extra: Sequence[str] = ()) -> None:
        self.port, self.http_port, prom = free_port(), free_port(), free_port()
        env = {**os.environ, "LMCACHE_DISABLE_BANNER": "1",
               "PROMETHEUS_MULTIPROC_DIR": metrics_dir(os.path.dirname(log_path))}
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([command, "server", "--l1-size-gb", str(memory_gb), "--eviction-policy", "LRU",
                                      "--host", "127.0.0.1", "--port", str(self.port), "--http-port",
                                      str(self.http_port), "--prometheus-port", str(prom), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        self.log_path = log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmcache server exited with {self.proc.returncode}: {self.tail()}")
            if "cache server is running" in self.tail(20000):
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"lmcache server did not come up in {timeout} s: {self.tail()}")

    def clear_l1(self) -> None:
        """Empty LMCache's memory tier (its admin API), so that the next hit comes from its disk tier."""
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/cache/clear",
                                     data=json.dumps({"tier": "l1", "force": True}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if resp.status != 200:
                raise RuntimeError(f"lmcache /cache/clear answered {resp.status}")

    def tail(self, n: int = 1500) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-n:]

    def stop(self) -> None:
        terminate(self.proc, 30, group=True)
        self.log.close()
        remove_shm(self.proc.pid)


def remove_shm(pid: int) -> None:
    """LMCache's client names its shared KV segments /dev/shm/lmcache_kv_<pid>_<n> and leaves them behind when
    it exits; the benchmark removes those of the processes it ran."""
    for path in glob.glob(f"/dev/shm/lmcache_*_{pid}_*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def metrics_dir(work: str) -> str:
    """A fresh folder for one process's Prometheus multiprocess files: LMCache keeps them in
    $PROMETHEUS_MULTIPROC_DIR, else in /tmp/lmcache_prometheus, which outlives it (and vLLM wants a folder of
    its own per run); the benchmark passes one inside its work folder to each LMCache process it starts."""
    return tempfile.mkdtemp(prefix="prometheus-", dir=work)


def _spec(layers: int) -> str:
    return f"(2,{_num_blocks()},{BLOCK_TOKENS},{KV_HEADS},{HEAD_DIM}):float16:{layers}"


def _num_blocks() -> int:
    return 2 * max(TOKENS) // BLOCK_TOKENS


def _lmcache_cell(command: str, server: LMCacheServer, layers: int, tokens: int, requests: int, start: int,
                  work: str, timeout: float) -> dict[str, Any]:
    """One run of LMCache's own client harness; its latencies, checks and the server's CPU time. LMCache keys
    chunks by their tokens, which follow from the sequence numbers: each cell has its own (from ``start``)."""
    out_path = os.path.join(work, f"lmcache-{layers}-{tokens}.json")
    args = [command, "bench", "server", "--rpc-url", f"tcp://localhost:{server.port}",
            "--url", f"http://localhost:{server.http_port}", "--mode", "cpu", "--transfer-mode", "lmcache_driven",
            "--num-tokens", str(tokens), "--kvcache-shape-spec", _spec(layers), "--num-blocks", str(_num_blocks()),
            "--start", str(start), "--end", str(start + requests),
            "--interval", "0.2", "--format", "json", "--output", out_path, "--quiet"]
    cpu0 = process_cpu_s(server.proc.pid)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LMCACHE_DISABLE_BANNER": "1",
                                 "PROMETHEUS_MULTIPROC_DIR": metrics_dir(work)}, preexec_fn=_die_with_parent)
    try:
        text = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        text = proc.communicate()[0]
    finally:
        remove_shm(proc.pid)
    server_cpu = process_cpu_s(server.proc.pid) - cpu0
    if not os.path.exists(out_path):
        raise RuntimeError(f"lmcache bench server wrote no result (exit {proc.returncode}): {text[-800:]}")
    with open(out_path) as fh:
        metrics = json.load(fh)["metrics"]
    block = 2 * layers * BLOCK_TOKENS * KV_HEADS * HEAD_DIM * 2
    nbytes = tokens // BLOCK_TOKENS * block
    stores, retrieves = metrics["cold_store"]["cold_store_count"], metrics["warm_retrieve"]["warm_retrieve_count"]
    moved = (stores + retrieves) * nbytes
    r = {"requests": metrics["results"]["total_requests"], "checksum_ok": metrics["results"]["checksum_ok"],
         "checksum_fail": metrics["results"]["checksum_fail"], "retrieves": retrieves,
         "store_p50_ms": metrics["cold_store"]["cold_store_p50"],
         "store_p99_ms": metrics["cold_store"]["cold_store_p99"],
         "get_p50_ms": metrics["warm_retrieve"].get("warm_retrieve_p50"),
         "get_p99_ms": metrics["warm_retrieve"].get("warm_retrieve_p99"),
         "lookup_p50_ms": metrics["warm_lookup"]["warm_lookup_p50"],
         "server_cpu_s_per_gb": round(server_cpu / (moved / 1e9), 3) if moved else None,
         "server_memory_bytes": memory_bytes(server.proc.pid)}
    r["get_gbs"] = round(nbytes / (r["get_p50_ms"] / 1e3) / 1e9, 3) if r["get_p50_ms"] else None
    r["put_gbs"] = round(nbytes / (r["store_p50_ms"] / 1e3) / 1e9, 3) if r["store_p50_ms"] else None
    return r


def _kvrack_cell(socket_path: str, token: str, daemon_pid: int, layers: int, tokens: int,
                 requests: int) -> dict[str, Any]:
    """The same shapes and requests through kvrack's paged-KV torch API over shared memory."""
    import blake3
    import torch

    from kvrack.clients.client import Client
    from kvrack.clients.paged import PagedKV, get_kv, put_kv

    nblocks = _num_blocks()
    gen = torch.Generator().manual_seed(layers * 1000 + tokens)
    src = [torch.randn(2, nblocks, BLOCK_TOKENS, KV_HEADS, HEAD_DIM, generator=gen).half() for _ in range(layers)]
    dst = [torch.zeros_like(t) for t in src]
    src_kv, dst_kv = PagedKV(src, block_dim=1), PagedKV(dst, block_dim=1)
    per = tokens // BLOCK_TOKENS
    nbytes = per * src_kv.block_nbytes
    puts: list[float] = []
    gets: list[float] = []
    lookups: list[float] = []
    stored: list[bytes] = []
    with Client.connect(socket_path, "bench", "kvrack-bench-peers-paged", timeout=120, token=token) as client, \
            CpuMeter([daemon_pid]) as cpu:
        server_cpu0 = process_cpu_s(daemon_pid)
        for seq in range(requests):
            ids = [(seq * per + j) % (nblocks - per) for j in range(per)]  # blocks of the paged cache, as LMCache
            keys = [blake3.blake3(f"paged/{layers}/{tokens}/{seq}/{j}".encode()).digest() for j in range(per)]
            t = time.perf_counter()
            put_kv(client, keys, src_kv, ids)
            puts.append(time.perf_counter() - t)
            t = time.perf_counter()
            found = client.lookup(keys).prefix
            lookups.append(time.perf_counter() - t)
            t = time.perf_counter()
            hits = get_kv(client, keys, dst_kv, ids)
            gets.append(time.perf_counter() - t)
            if found != per or not all(hits):
                raise RuntimeError(f"kvrack missed blocks it had just stored ({found} of {per} found)")
            if not all(torch.equal(s[:, ids], d[:, ids]) for s, d in zip(src, dst)):
                raise RuntimeError("kvrack read back other bytes than it stored")
            for d in dst:
                d[:, ids] = 0
            stored += keys
        server_cpu = process_cpu_s(daemon_pid) - server_cpu0
        client.delete(stored)
    moved = 2 * requests * nbytes

    def q(values: list[float], p: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(len(values) * p))] * 1e3, 3)

    r = {"requests": requests, "store_p50_ms": q(puts, 0.5), "store_p99_ms": q(puts, 0.99),
         "get_p50_ms": q(gets, 0.5), "get_p99_ms": q(gets, 0.99), "lookup_p50_ms": q(lookups, 0.5),
         "server_cpu_s_per_gb": round(server_cpu / (moved / 1e9), 3),
         "cpu_s_per_gb": round(cpu.seconds / (moved / 1e9), 3), "server_memory_bytes": memory_bytes(daemon_pid)}
    r["get_gbs"] = round(nbytes / (r["get_p50_ms"] / 1e3) / 1e9, 3)
    r["put_gbs"] = round(nbytes / (r["store_p50_ms"] / 1e3) / 1e9, 3)
    return r


def run(command: str, sizes: list[str], requests: int = 12, memory_gb: int = MEMORY_GB,
        progress: Callable[[str], None] = lambda _s: None, timeout: float = 600.0) -> dict[str, Any]:
    """Every cell for LMCache's server and for kvrack, each given ``memory_gb`` of host memory."""
    from kvrack.bench.peers.stores import TOKEN

    work = tempfile.mkdtemp(prefix="kvrack-bench-lmcache-")
    out: dict[str, Any] = {"versions": version(command), "memory_gb": memory_gb, "requests_per_cell": requests,
                           "kv_shape": f"layers x (2, blocks, {BLOCK_TOKENS}, {KV_HEADS}, {HEAD_DIM}) float16",
                           "lmcache": {}, "kvrack": {}}
    config = os.path.join(work, "kvrack.toml")
    with open(config, "w") as fh:
        fh.write(f'[[namespaces]]\nname = "bench"\ntoken = "{TOKEN}"\n')
    try:
        progress("starting lmcache server")
        server = LMCacheServer(command, memory_gb, os.path.join(work, "lmcache-server.log"))
        try:
            for i, (name, tokens) in enumerate((n, t) for n in sizes for t in TOKENS):
                progress(f"LMCache {name} blocks, {tokens} tokens")
                out["lmcache"][f"{name}/{tokens}"] = _lmcache_cell(command, server, LAYERS[name], tokens, requests,
                                                                   10_000 * (i + 1), work, timeout)
        finally:
            server.stop()
        progress("kvrack, paged-KV torch API")
        with DaemonProcess({"dram.capacity_bytes": f"{memory_gb}GiB", "nvme.enabled": "false"},
                           config_path=config) as daemon:
            from kvrack.clients.client import Client

            with Client.connect(daemon.socket_path, "bench", token=TOKEN) as probe:
                wait_until_paged_in(probe)
            for name in sizes:
                for tokens in TOKENS:
                    progress(f"kvrack {name} blocks, {tokens} tokens")
                    out["kvrack"][f"{name}/{tokens}"] = _kvrack_cell(daemon.socket_path, TOKEN, daemon.pid,
                                                                     LAYERS[name], tokens, requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for cell, theirs in out["lmcache"].items():
        ours = out["kvrack"].get(cell)
        if ours and theirs.get("get_p50_ms"):
            theirs["kvrack_get_speedup"] = round(theirs["get_p50_ms"] / ours["get_p50_ms"], 3)
            theirs["kvrack_put_speedup"] = round(theirs["store_p50_ms"] / ours["store_p50_ms"], 3)
    return out
