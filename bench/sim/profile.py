"""How a trace reuses its blocks, in the terms published for production KV traces.

A policy can only beat LRU on reuses that LRU misses, so before comparing
policies an operator wants to know how skewed and how bursty their trace is:
which share of its blocks is read again at all, how much of the reuse the
most reused tenth of the blocks takes (77% in published production traces),
and how long after the previous use a block is read again (about 80% within
10 s to 10 min in production). A reuse is a prefix hit with an infinite
cache: the leading run of a request's blocks stored by earlier requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvrack.bench.sim.traces import Request

QUANTILES = (0.1, 0.5, 0.9)


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{int(q * 100)}": 0.0 for q in QUANTILES}
    values.sort()
    return {f"p{int(q * 100)}": round(values[int(q * (len(values) - 1))], 3) for q in QUANTILES}


def reuse_profile(requests: Sequence[Request]) -> dict[str, Any]:
    """Reuse statistics of a trace (no eviction): skew, gaps in seconds and in requests, one-time blocks."""
    stored: set[Any] = set()
    last_time: dict[Any, float] = {}
    last_request: dict[Any, int] = {}
    reuses: dict[Any, int] = {}
    gaps_s: list[float] = []
    gaps_requests: list[float] = []
    accesses = 0
    for n, r in enumerate(requests):
        keys = r.keys
        accesses += len(keys)
        leading = True
        for i, key in enumerate(keys):
            if leading and key in stored:
                reuses[key] = reuses.get(key, 0) + 1
                gaps_s.append(r.time - last_time[key])
                gaps_requests.append(float(n - last_request[key]))
            else:
                leading = False
            if not (r.partial_tail and i == len(keys) - 1):
                stored.add(key)  # engines store only full blocks
            last_time[key] = r.time
            last_request[key] = n
    unique = len(last_time)
    total = len(gaps_s)
    top = sorted(reuses.values(), reverse=True)[: max(1, unique // 10)]
    return {
        "unique_blocks": unique,
        "block_accesses": accesses,
        "reuses": total,
        "reused_block_share": round(len(reuses) / unique, 4) if unique else 0.0,
        "top10_block_reuse_share": round(sum(top) / total, 4) if total else 0.0,
        "reuse_within_10s_10min": round(sum(1 for g in gaps_s if 10.0 <= g <= 600.0) / total, 4) if total else 0.0,
        "reuse_under_10s": round(sum(1 for g in gaps_s if g < 10.0) / total, 4) if total else 0.0,
        "reuse_gap_s": _quantiles(gaps_s),
        "reuse_gap_requests": _quantiles(gaps_requests),
    }
