"""``kvrack bench peers``: every system that runs here through the same workload, in one run."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kvrack.bench.peers import lmcache as lm
from kvrack.bench.peers import mooncake as mc
from kvrack.bench.peers import stores
from kvrack.bench.peers.workload import SIZES, Workload, replay_requests, run_cell, run_replay
from kvrack.bench.targets import check_targets

SYSTEMS = ("kvrack-shm", "kvrack-tcp", "kvrack-nixl", "redis-unix", "redis-tcp", "mooncake-tcp")
CELL_MEMORY = 1 << 30  # each store's memory for the cells: every block of a cell fits, nothing is evicted
TARGETS = {"vs_redis_get_2mib": (">=", 20.0), "vs_redis_put_2mib": (">=", 20.0), "vs_lmcache_get_2mib": (">=", 1.5)}
PHASES = ("write", "read", "mixed")


def unavailable(kind: str) -> str | None:
    """None when ``kind`` can run here, else why not."""
    if kind.startswith("redis"):
        return stores.redis_missing()
    if kind == "kvrack-nixl":
        from kvrack import nixl_agent

        return nixl_agent.available()
    if kind.startswith("mooncake"):
        return mc.missing()
    return None


def _best(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase, the pass with the highest throughput (the machine's noise only ever slows a pass down)."""
    best = dict(passes[0])
    for p in passes[1:]:
        for phase in PHASES:
            if p[phase]["gbs"] > best[phase]["gbs"]:
                best[phase] = p[phase]
    best["passes"] = len(passes)
    return best


def run_system(kind: str, work: Workload, repeats: int, requests: list[list[bytes]],
               progress: Callable[[str], None]) -> dict[str, Any]:
    """The cells, then the replay on a fresh store with the replay's memory."""
    cells: dict[str, Any] = {}
    with (mc.opened(CELL_MEMORY) if kind.startswith("mooncake") else stores.opened(kind, CELL_MEMORY)) as store:
        for name in work.sizes:
            for batch in work.batches:
                progress(f"{kind}: {name} blocks, batches of {batch}")
                cells[f"{name}/{batch}"] = _best([run_cell(store, SIZES[name], batch, work, f"{kind}/{r}")
                                                  for r in range(repeats)])
    progress(f"{kind}: replay")
    with (mc.opened(work.replay_memory) if kind.startswith("mooncake") else
          stores.opened(kind, work.replay_memory)) as store:
        replay = run_replay(store, requests, work)
    out = {"cells": cells, "replay": replay}
    if kind == "kvrack-shm":  # the same replay under kvrack's other eviction policies (the default is lru)
        out["replay_by_policy"] = {}
        for policy in work.replay_policies:
            progress(f"{kind}: replay, dram.policy={policy}")
            store = stores.KvrackStore("shm", work.replay_memory, {"dram.policy": policy})
            try:
                out["replay_by_policy"][policy] = run_replay(store, requests, work)
            finally:
                store.close()
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for dist in ("kvrack", "numpy", "torch", "nixl-cu12"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def run(systems: list[str], work: Workload, repeats: int, lmcache_command: str | None, lmcache_requests: int,
        progress: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    out: dict[str, Any] = {"workload": {k: v for k, v in vars(work).items()}, "repeats": repeats,
                           "versions": versions(), "systems": {}, "command": " ".join(sys.argv)}
    requests = replay_requests(work)
    for kind in (s for s in systems if s != "lmcache"):
        why = unavailable(kind)
        if why is not None:
            out["systems"][kind] = {"unavailable": why}
            continue
        if kind.startswith("redis"):
            out["versions"].update(stores.redis_versions())
        if kind.startswith("mooncake"):
            out["versions"].update(mc.versions())
        out["systems"][kind] = run_system(kind, work, repeats, requests, progress)
    if "lmcache" in systems:
        why = lm.missing(lmcache_command)
        out["lmcache"] = {"unavailable": why} if why else lm.run(
            lmcache_command or "", [s for s in work.sizes if s in lm.LAYERS], lmcache_requests, progress=progress)
    _headlines(out)
    out["targets"] = {name: bound for name, (_op, bound) in TARGETS.items()}
    out["checks"] = check_targets(out, TARGETS)
    return out


def _cell(out: dict[str, Any], kind: str, cell: str, phase: str) -> float | None:
    system = out["systems"].get(kind, {})
    value = system.get("cells", {}).get(cell, {}).get(phase, {}).get("gbs")
    return float(value) if value else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _headlines(out: dict[str, Any]) -> None:
    """The figures the issue names: kvrack over shared memory against each peer, 2 MiB blocks, batches of 16."""
    for phase, key in (("read", "get"), ("write", "put")):
        ours = _cell(out, "kvrack-shm", "2MiB/16", phase)
        out[f"vs_redis_{key}_2mib"] = _ratio(ours, _cell(out, "redis-unix", "2MiB/16", phase))
        out[f"vs_redis_tcp_{key}_2mib"] = _ratio(_cell(out, "kvrack-tcp", "2MiB/16", phase),
                                                 _cell(out, "redis-tcp", "2MiB/16", phase))
        out[f"vs_mooncake_{key}_2mib"] = _ratio(ours, _cell(out, "mooncake-tcp", "2MiB/16", phase))
        out[f"vs_mooncake_tcp_{key}_2mib"] = _ratio(_cell(out, "kvrack-tcp", "2MiB/16", phase),
                                                    _cell(out, "mooncake-tcp", "2MiB/16", phase))
        # each system at its best batch size for 2 MiB blocks (Redis moves 2 MiB values faster unbatched here)
        best = {kind: max((_cell(out, kind, f"2MiB/{b}", phase) or 0.0) for b in out["workload"]["batches"])
                for kind in ("kvrack-shm", "redis-unix")}
        out[f"vs_redis_best_batch_{key}_2mib"] = _ratio(best["kvrack-shm"], best["redis-unix"])
    if out["vs_mooncake_get_2mib"] is None:
        out["vs_mooncake_get_2mib_reason"] = out["systems"].get("mooncake-tcp", {}).get(
            "unavailable", "mooncake-tcp was not among the systems of this run")
    lmc = out.get("lmcache", {})
    theirs, ours_paged = lmc.get("lmcache", {}).get("2MiB/256"), lmc.get("kvrack", {}).get("2MiB/256")
    out["vs_lmcache_get_2mib"] = (round(theirs["get_p50_ms"] / ours_paged["get_p50_ms"], 3)
                                  if theirs and ours_paged and theirs.get("get_p50_ms") else None)
    out["vs_lmcache_put_2mib"] = (round(theirs["store_p50_ms"] / ours_paged["store_p50_ms"], 3)
                                  if theirs and ours_paged and theirs.get("store_p50_ms") else None)
    if out["vs_lmcache_get_2mib"] is None:
        out["vs_lmcache_get_2mib_reason"] = lmc.get("unavailable", "lmcache was not among the systems of this run")
