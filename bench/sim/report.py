"""What ``kvrack sim`` computes: hit ratio per policy at a DRAM size, the admission's NVMe write cut, sweeps.

Sizes are fractions of the trace's unique blocks (its working set). Every
figure comes from replaying the same trace through ``replay.Simulator``; the
offline optimum (Belady) is reported next to them as the ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from kvrack.bench.sim.profile import reuse_profile
from kvrack.bench.sim.replay import belady, simulate
from kvrack.bench.sim.traces import GENERATORS, Request, unique_blocks
from kvrack.daemon.policies import POLICIES

DEFAULT_TRACES = ("chat", "rag")
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def policy_names(spec: str | None) -> list[str]:
    if not spec:
        return sorted(POLICIES)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                         f"choose from {', '.join(sorted(POLICIES))}")
    if "lru" not in names:
        names.insert(0, "lru")  # every report is relative to LRU
    return names


def hit_ratios(requests: Sequence[Request], fraction: float, policies: Sequence[str],
               progress: Progress = _quiet) -> dict[str, Any]:
    """Prefix-hit ratio of each policy with DRAM = ``fraction`` x unique blocks (DRAM only)."""
    unique = unique_blocks(requests)
    blocks = max(1, int(fraction * unique))
    by_policy: dict[str, float] = {}
    detail: dict[str, Any] = {}
    for name in policies:
        progress(f"{name} at {fraction:g}")
        t0 = time.perf_counter()
        res = simulate(requests, blocks, name)
        by_policy[name] = round(res.hit_ratio, 6)
        detail[name] = {**res.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    best = max(by_policy, key=lambda p: (by_policy[p], p == "lru"))
    top = belady(requests, unique + 1)
    return {
        "capacity_fraction": fraction, "dram_blocks": blocks, "unique_blocks": unique,
        "requests": len(requests), "block_accesses": sum(len(r.keys) for r in requests),
        "hit_ratio_by_policy": by_policy, "best_policy": best,
        "best_vs_lru_hit_points": round(100 * (by_policy[best] - by_policy["lru"]), 3),
        "belady_hit_ratio": round(belady(requests, blocks), 6),
        # nothing ever evicted: no policy at any size can beat it, so it caps every margin over LRU
        "max_hit_ratio": round(top, 6), "max_vs_lru_hit_points": round(100 * (top - by_policy["lru"]), 3),
        "reuse": reuse_profile(requests),
        "policies": detail,
    }


def nvme_writes(requests: Sequence[Request], fraction: float, nvme_fraction: float, policy: str,
                admission: str, block_bytes: int, progress: Progress = _quiet) -> dict[str, Any]:
    """Write volume to NVMe with admission ``admission`` vs writing every block through (admit-all)."""
    unique = unique_blocks(requests)
    dram, nvme = max(1, int(fraction * unique)), max(1, int(nvme_fraction * unique))
    progress(f"{policy} with NVMe, admit all")
    every = simulate(requests, dram, policy, nvme, admission="all")
    progress(f"{policy} with NVMe, admission {admission}")
    chosen = simulate(requests, dram, policy, nvme, admission=admission)
    cut = 1 - chosen.nvme_writes / every.nvme_writes if every.nvme_writes else 0.0
    return {
        "policy": policy, "admission": admission, "dram_blocks": dram, "nvme_blocks": nvme,
        "admit_all": every.as_dict(block_bytes), "admitted": chosen.as_dict(block_bytes),
        "nvme_write_reduction": round(cut, 4),
        "hit_ratio_admit_all": round(every.hit_ratio, 6), "hit_ratio_admitted": round(chosen.hit_ratio, 6),
    }


def sweep(requests: Sequence[Request], fractions: Sequence[float], policies: Sequence[str],
          progress: Progress = _quiet) -> dict[str, Any]:
    """Hit ratio per policy at each DRAM size (for the plot), with the offline optimum."""
    unique = unique_blocks(requests)
    out: dict[str, Any] = {"capacity_fractions": list(fractions), "hit_ratio": {p: [] for p in policies},
                           "belady": []}
    for f in fractions:
        blocks = max(1, int(f * unique))
        for p in policies:
            progress(f"sweep {p} at {f:g}")
            out["hit_ratio"][p].append(round(simulate(requests, blocks, p).hit_ratio, 6))
        out["belady"].append(round(belady(requests, blocks), 6))
    return out


def run_trace(requests: Sequence[Request], fraction: float, policies: Sequence[str], nvme_fraction: float,
              admission: str, block_bytes: int, fractions: Sequence[float] = (),
              progress: Progress = _quiet) -> dict[str, Any]:
    """One trace: hit ratio by policy, the best policy's NVMe write cut, and a sweep over ``fractions``."""
    res = hit_ratios(requests, fraction, policies, progress)
    if nvme_fraction > 0:
        res["nvme"] = nvme_writes(requests, fraction, nvme_fraction, res["best_policy"], admission, block_bytes,
                                  progress)
        res["nvme_write_reduction"] = res["nvme"]["nvme_write_reduction"]
    if fractions:
        res["sweep"] = sweep(requests, fractions, policies, progress)
    return res


def run_default(fraction: float, policies: Sequence[str], nvme_fraction: float, admission: str, block_bytes: int,
                fractions: Sequence[float] = (), progress: Progress = _quiet) -> dict[str, Any]:
    """The shipped chat and RAG traces: per-trace reports, and the margins of the policy best on both."""
    requests = {}
    traces = {}
    for name in DEFAULT_TRACES:
        progress(f"generating {name}")
        requests[name] = GENERATORS[name]()
        traces[name] = hit_ratios(requests[name], fraction, policies, progress)
    best = max(policies, key=lambda p: sum(t["hit_ratio_by_policy"][p] for t in traces.values()))
    points = min(100 * (t["hit_ratio_by_policy"][best] - t["hit_ratio_by_policy"]["lru"]) for t in traces.values())
    cuts = []
    for name, t in traces.items():
        if nvme_fraction > 0:
            t["nvme"] = nvme_writes(requests[name], fraction, nvme_fraction, best, admission, block_bytes, progress)
            cuts.append(t["nvme"]["nvme_write_reduction"])
        if fractions:
            t["sweep"] = sweep(requests[name], fractions, policies, progress)
    out: dict[str, Any] = {
        "capacity_fraction": fraction, "best_policy": best, "best_vs_lru_hit_points": round(points, 3),
        "hit_ratio_by_policy": {p: round(sum(t["hit_ratio_by_policy"][p] for t in traces.values()) / len(traces), 6)
                                for p in policies},
        "traces": traces,
    }
    if cuts:
        out["nvme_write_reduction"] = round(min(cuts), 4)
    return out
