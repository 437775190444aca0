"""``kvrack bench e2e --peers``: vLLM's TTFT on a prefix hit with kvrack and with each peer, same model, same run.

Each system behind vLLM's OpenAI server as its users configure it, the same prompts for all:

- kvrack: its connector and a private kvrackd (the ``bench e2e`` harness): the CPU tier is kvrack's DRAM, the
  disk tier its NVMe tier after a restart empties DRAM (reads with O_DIRECT: never the page cache);
- LMCache: its multi-process server (``lmcache server``, L1 in host memory, an ``fs`` L2 on local disk) and its
  vLLM connector (``LMCacheMPConnector``); its disk tier is reached by emptying L1 through its admin API (its
  files are read through the page cache, which is dropped first where this process may); and LMCache inside
  vLLM's process (``LMCacheConnectorV1``, local CPU and local disk backends), where it hits on this build;
- vLLM's native CPU offloading (``--kv-offloading-backend native``), where this vLLM build runs it.

TTFT for recompute and for a hit from each tier, vLLM's own prefix cache reset before every hit. Then a
multi-turn replay (sessions from ``kvrack sim``'s chat generator) into each system's CPU tier given the same
memory, vLLM's prefix cache reset before each request: the share of prompt tokens each system supplied.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kvrack.bench import e2e
from kvrack.bench.peers.lmcache import metrics_dir
from kvrack.bench.spawn import DaemonProcess, free_port
from kvrack.bench.vllm_model import ModelShape, build_model, connector_config, describe, prompt

CPU_TIER_GIB = 2
REPLAY_BLOCK_TOKENS = 128
TARGETS = {"ttft_vs_lmcache_4k": ("<=", 1.0), "ttft_vs_vllm_offload_4k": ("<=", 1.0)}


def lmcache_connector(port: int) -> dict[str, Any]:
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                                          "lmcache.mp.mq_timeout": 60}}


def _lmcache_command() -> str | None:
    import sys

    local = os.path.join(os.path.dirname(sys.executable), "lmcache")
    return local if os.access(local, os.X_OK) else shutil.which("lmcache")


def lmcache_missing() -> str | None:
    try:
        import lmcache.integration.vllm.lmcache_mp_connector  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means it cannot run here
        return (f"LMCache's vLLM connector does not import beside this vLLM ({type(exc).__name__}: {exc}); "
                "`make bench-e2e-peers` builds .venv-vllm-lmcache with both")
    return None if _lmcache_command() else "the lmcache command is not installed beside vLLM"


def _drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache, so a disk tier's files are read from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 4) if vals else None


def _ttft_lengths(server: e2e.Server, lengths: list[int], repeats: int, progress: Callable[[str], None],
                  name: str, to_disk: Callable[[], bool] | None) -> dict[str, Any]:
    """Recompute, CPU-tier hit and (with ``to_disk``, which empties the CPU tier) disk-tier hit per length."""
    out: dict[str, Any] = {}
    prompts = {n: prompt(n, 10_000 + n) for n in lengths}
    for n in lengths:
        progress(f"{name}: {n} tokens")
        recompute = [server.complete(prompt(n, 20_000 + 100 * n + i))["ttft_s"] for i in range(repeats)]
        first = server.complete(prompts[n])  # computed; the connector stores it
        time.sleep(1.0)  # stores may finish after the response (LMCache's are asynchronous)
        hits = []
        for _ in range(repeats + 1):
            server.reset_prefix_cache()
            hits.append(server.complete(prompts[n]))
        out[str(n)] = {"recompute_ttft_s": _median([*recompute, first["ttft_s"]]),
                       "cpu_hit_ttft_s": _median([h["ttft_s"] for h in hits]),
                       "cpu_hit_cached_tokens": statistics.median(h["cached_tokens"] for h in hits),
                       "identical_tokens": all(h["tokens"] == first["tokens"] for h in hits)}
    if to_disk is not None:
        for n in lengths:
            progress(f"{name}: {n} tokens from disk")
            hits = []
            dropped = True
            for _ in range(repeats):
                server.reset_prefix_cache()
                dropped &= to_disk()
                hits.append(server.complete(prompts[n]))
            out[str(n)].update(disk_hit_ttft_s=_median([h["ttft_s"] for h in hits]),
                               disk_hit_cached_tokens=statistics.median(h["cached_tokens"] for h in hits),
                               page_cache_dropped=dropped)
    return out


def replay_prompts(requests: int, max_blocks: int = 24) -> list[list[int]]:
    """Multi-turn prompts from ``kvrack sim``'s chat generator: each trace block a fixed run of 128 tokens, so
    that turns of one session and sessions behind one system prompt share their prefixes."""
    from kvrack.bench.sim import traces

    out = []
    for r in traces.chat(sessions=400, seed=5):
        if len(r.keys) <= max_blocks:
            out.append([t for k in r.keys for t in prompt(REPLAY_BLOCK_TOKENS, 1_000_000 + int(k))])
        if len(out) == requests:
            break
    return out


def _replay(server: e2e.Server, prompts: list[list[int]], progress: Callable[[str], None], name: str
            ) -> dict[str, Any]:
    """The multi-turn replay through ``server``, which is stopped after it."""
    asked = cached = 0
    ttfts = []
    try:
        for i, tokens in enumerate(prompts):
            progress(f"{name}: replay {i + 1}/{len(prompts)}")
            server.reset_prefix_cache()
            r = server.complete(tokens, max_tokens=1)
            asked += len(tokens)
            cached += r["cached_tokens"]
            ttfts.append(r["ttft_s"])
    finally:
        server.stop()
    return {"requests": len(prompts), "prompt_tokens": asked, "tokens_from_cache": cached,
            "hit_ratio": round(cached / asked, 4) if asked else None, "ttft_mean_s": round(statistics.fmean(ttfts), 4)}


def run(lengths: list[int], repeats: int, model_dir: str | None, replay_requests: int, replay_memory: int,
        progress: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    import vllm

    shape = ModelShape()
    model = build_model(model_dir or os.path.join(tempfile.gettempdir(), "kvrack-e2e-model"), shape)
    work = tempfile.mkdtemp(prefix="kvrack-bench-e2e-peers-")
    prompts = replay_prompts(replay_requests)
    out: dict[str, Any] = {"vllm_version": vllm.__version__, "model": describe(shape), "lengths": lengths,
                           "repeats": repeats, "cpu_tier_bytes": CPU_TIER_GIB << 30,
                           "replay_memory_bytes": replay_memory,
                           "replay_block_tokens": REPLAY_BLOCK_TOKENS, "systems": {}, "versions": {}}
    try:
        out["systems"]["kvrack"] = _kvrack(model, lengths, repeats, prompts, replay_memory, work, progress)
        out["systems"]["lmcache"] = _lmcache(model, lengths, repeats, prompts, replay_memory, work, progress, out)
        out["systems"]["lmcache-inprocess"] = _lmcache_inprocess(model, lengths, repeats, prompts, replay_memory,
                                                                 work, progress)
        out["systems"]["vllm-native-offload"] = _native(model, lengths, repeats, prompts, replay_memory, work,
                                                        progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _headlines(out)
    out["targets"] = {name: bound for name, (_op, bound) in TARGETS.items()}
    from kvrack.bench.targets import check_targets

    out["checks"] = check_targets(out, TARGETS)
    return out


def _kvrack(model: str, lengths: list[int], repeats: int, prompts: list[list[int]], replay_memory: int, work: str,
            progress: Callable[[str], None]) -> dict[str, Any]:
    sock = os.path.join(work, "kvrack.sock")
    nvme = os.path.join(work, "nvme")
    settings = {"dram.capacity_bytes": f"{CPU_TIER_GIB}GiB", "nvme.dir": nvme, "nvme.capacity_bytes": "8GiB"}
    holder: dict[str, DaemonProcess] = {"d": DaemonProcess(settings, socket_path=sock)}
    server: e2e.Server | None = None
    try:
        progress("kvrack: starting vLLM")
        server = live = e2e.Server(model, connector_config(f"unix://{sock}", "kv_both", **{"kvrack.retry_s": 0.2}),
                                   free_port(), os.path.join(work, "vllm-kvrack.log"))
        server.complete(prompt(64, 999), max_tokens=2)

        def to_disk() -> bool:  # a restart empties DRAM: the blocks come back from the NVMe tier
            holder["d"].stop()
            holder["d"] = DaemonProcess(settings, socket_path=sock)
            for i in range(2):  # the connector's two sides find the old connection gone, then reconnect
                time.sleep(0.3)
                live.complete(prompt(96, 30_000 + i + int(time.monotonic() * 1000) % 10_000), max_tokens=2)
            return True
        result = {"lengths": _ttft_lengths(live, lengths, repeats, progress, "kvrack", to_disk)}
    finally:
        if server is not None:
            server.stop()
        holder["d"].stop()
    with DaemonProcess({"dram.capacity_bytes": replay_memory, "dram.segment_bytes": min(replay_memory, 64 << 20),
                        "nvme.enabled": "false"}, socket_path=sock):
        progress("kvrack: replay")
        server = e2e.Server(model, connector_config(f"unix://{sock}", "kv_both"), free_port(),
                            os.path.join(work, "vllm-kvrack-replay.log"))
        result["replay"] = _replay(server, prompts, progress, "kvrack")
    return result


def _lmcache(model: str, lengths: list[int], repeats: int, prompts: list[list[int]], replay_memory: int, work: str,
             progress: Callable[[str], None], out: dict[str, Any]) -> dict[str, Any]:
    why = lmcache_missing()
    if why is not None:
        return {"unavailable": why}
    from importlib.metadata import version

    from kvrack.bench.peers.lmcache import LMCacheServer

    out["versions"]["lmcache"] = version("lmcache")
    command = _lmcache_command() or "lmcache"
    disk = os.path.join(work, "lmcache-disk")
    os.makedirs(disk)
    base = ["--chunk-size", "256", "--supported-transfer-mode", "engine_driven"]
    progress("LMCache: starting its server and vLLM")
    lmc = LMCacheServer(command, CPU_TIER_GIB, os.path.join(work, "lmcache.log"),
                        extra=[*base, "--l2-adapter", f'{{"type": "fs", "base_path": "{disk}"}}'])
    server = None
    try:
        server = e2e.Server(model, lmcache_connector(lmc.port), free_port(),
                            os.path.join(work, "vllm-lmcache.log"), env={"PROMETHEUS_MULTIPROC_DIR": metrics_dir(work)})
        server.complete(prompt(64, 999), max_tokens=2)

        def to_disk() -> bool:
            lmc.clear_l1()
            return _drop_page_cache()
        result: dict[str, Any] = {"lengths": _ttft_lengths(server, lengths, repeats, progress, "LMCache", to_disk)}
    finally:
        if server is not None:
            server.stop()
        lmc.stop()
    lmc = LMCacheServer(command, replay_memory / (1 << 30), os.path.join(work, "lmcache-replay.log"), extra=base)
    try:
        progress("LMCache: replay")
        server = e2e.Server(model, lmcache_connector(lmc.port), free_port(),
                            os.path.join(work, "vllm-lmcache-replay.log"),
                            env={"PROMETHEUS_MULTIPROC_DIR": metrics_dir(work)})
        result["replay"] = _replay(server, prompts, progress, "LMCache")
    finally:
        lmc.stop()
    return result


def _lmcache_inprocess(model: str, lengths: list[int], repeats: int, prompts: list[list[int]], replay_memory: int,
                       work: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """LMCache inside vLLM's process (``LMCacheConnectorV1``), its local CPU backend and its local disk backend."""
    why = lmcache_missing()
    if why is not None:
        return {"unavailable": why}
    disk = os.path.join(work, "lmcache-local-disk")
    os.makedirs(disk)

    def env(cpu_gib: float, with_disk: bool) -> dict[str, str]:
        e = {"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": str(cpu_gib),
             "PROMETHEUS_MULTIPROC_DIR": metrics_dir(work)}
        if with_disk:
            e.update(LMCACHE_LOCAL_DISK=f"file://{disk}/", LMCACHE_MAX_LOCAL_DISK_SIZE="8")
        return e

    config = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    progress("LMCache in vLLM's process: starting vLLM")
    log = os.path.join(work, "vllm-lmcache-inprocess.log")
    try:
        server = e2e.Server(model, config, free_port(), log, env=env(CPU_TIER_GIB, True))
    except e2e.ServerFailed as exc:
        return {"unavailable": f"vLLM does not start with LMCacheConnectorV1: {exc}"}
    try:
        probe = prompt(1024, 77)
        server.complete(probe, max_tokens=2)
        time.sleep(1.0)
        server.reset_prefix_cache()
        if server.complete(probe, max_tokens=2)["cached_tokens"] == 0:
            with open(log, errors="replace") as fh:
                text = re.sub(r"\x1b\[[0-9;]*m", "", fh.read())
            said = re.findall(r"[^\n]*(?:No supported[^\n]*|degraded mode[^\n]*)", text)
            return {"unavailable": "LMCache's in-process connector never hits here (a 1024-token prompt sent again "
                                   "after vLLM's prefix cache was reset had no cached token)"
                                   + (f"; LMCache logs: {' / '.join(x.strip()[-250:] for x in said[-2:])}"
                                      if said else "")}
        result: dict[str, Any] = {"lengths": _ttft_lengths(server, lengths, repeats, progress,
                                                           "LMCache in-process", None)}
    finally:
        server.stop()
    result["replay"] = _replay(e2e.Server(model, config, free_port(),
                                          os.path.join(work, "vllm-lmcache-inprocess-replay.log"),
                                          env=env(replay_memory / (1 << 30), False)), prompts, progress,
                               "LMCache in-process")
    return result


def _native(model: str, lengths: list[int], repeats: int, prompts: list[list[int]], replay_memory: int, work: str,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """vLLM's own CPU offloading: a CPU tier, no disk tier."""
    def start(size_gib: float, log: str) -> e2e.Server:
        return e2e.Server(model, None, free_port(), os.path.join(work, log),
                          extra_args=("--kv-offloading-backend", "native", "--kv-offloading-size", str(size_gib)))

    progress("vLLM native offloading: starting vLLM")
    try:
        server = start(CPU_TIER_GIB, "vllm-native.log")
    except e2e.ServerFailed as exc:
        return {"unavailable": f"vLLM's native CPU offloading does not start in this vLLM build: {exc}"}
    try:
        server.complete(prompt(64, 999), max_tokens=2)
        result: dict[str, Any] = {"lengths": _ttft_lengths(server, lengths, repeats, progress, "vLLM native", None),
                                  "disk_tier": "none: vLLM's native offloading has a CPU tier only"}
    finally:
        server.stop()
    result["replay"] = _replay(start(replay_memory / (1 << 30), "vllm-native-replay.log"), prompts, progress,
                               "vLLM native")
    return result


def _headlines(out: dict[str, Any]) -> None:
    ours = out["systems"]["kvrack"]["lengths"].get("4096", {})
    for peer, key in (("lmcache", "lmcache"), ("vllm-native-offload", "vllm_offload")):
        theirs = out["systems"].get(peer, {})
        four = theirs.get("lengths", {}).get("4096", {})
        for tier, suffix in (("cpu", ""), ("disk", "_disk")):
            a, b = ours.get(f"{tier}_hit_ttft_s"), four.get(f"{tier}_hit_ttft_s")
            out[f"ttft{suffix}_vs_{key}_4k"] = round(a / b, 3) if a and b else None
        if out[f"ttft_vs_{key}_4k"] is None:
            out[f"ttft_vs_{key}_4k_reason"] = theirs.get("unavailable", "no 4096-token prompt in this run")
    with contextlib.suppress(KeyError):
        out["recompute"] = {n: r["recompute_ttft_s"] for n, r in out["systems"]["kvrack"]["lengths"].items()}
