"""Requests per op: how many, how many failed, and how long they took (a histogram for Prometheus).

Recorded by the server for every reply it sends; read through the stats registry. A record costs two clock
reads and a bisect on the latency thresholds (C), so it stays off the request's measurable cost.
"""

from __future__ import annotations

import bisect
from typing import Any

from kvrack.protocol import ErrorCode

# latency bucket bounds, in seconds (and in ns for the bisect): 10 µs to 10 s
BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
             5.0, 10.0)
_BOUNDS_NS = [int(b * 1e9) for b in BUCKETS_S]
# per-key outcomes that are answers, not errors: a miss, a block already stored, or one another client is writing
NOT_ERRORS = frozenset({int(ErrorCode.OK), int(ErrorCode.NOT_FOUND), int(ErrorCode.ALREADY_EXISTS),
                        int(ErrorCode.IN_PROGRESS)})


class OpStats:
    """Counts, errors and latency per op; and error codes, reply-level and per key."""

    def __init__(self) -> None:
        self.ops: dict[str, list[Any]] = {}  # op -> [count, errors, total ns, [count per bucket (+inf last)]]
        self.codes: dict[int, int] = {}

    def record(self, op: str, elapsed_ns: int, code: int, key_codes: list[int] | None = None) -> None:
        row = self.ops.get(op)
        if row is None:
            row = self.ops[op] = [0, 0, 0, [0] * (len(_BOUNDS_NS) + 1)]
        row[0] += 1
        row[2] += elapsed_ns
        row[3][bisect.bisect_left(_BOUNDS_NS, elapsed_ns)] += 1
        if code:
            row[1] += 1
            self.codes[code] = self.codes.get(code, 0) + 1
        if key_codes and key_codes.count(0) != len(key_codes):  # the common all-OK case costs one C count
            for c in key_codes:
                if c not in NOT_ERRORS:
                    self.codes[c] = self.codes.get(c, 0) + 1

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """``{op: {count, errors, seconds_sum, mean_us, buckets: [(le, cumulative count), ...]}}``; all
        namespaces together, so a tenant's view (``namespace``) has none of it."""
        if namespace is not None:
            return {}
        out = {}
        for op, (count, errors, total_ns, counts) in self.ops.items():
            cumulative, buckets = 0, []
            for bound, n in zip([*BUCKETS_S, float("inf")], counts):
                cumulative += n
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            out[op] = {"count": count, "errors": errors, "seconds_sum": total_ns / 1e9,
                       "mean_us": round(total_ns / count / 1000, 2) if count else 0.0, "buckets": buckets}
        return out

    def errors(self, namespace: str | None = None) -> dict[str, int]:
        """Error replies and per-key errors, by code name (all namespaces: none in a tenant's view)."""
        if namespace is not None:
            return {}
        out = {}
        for code, n in self.codes.items():
            try:
                name = ErrorCode(code).name
            except ValueError:
                name = str(code)
            out[name] = n
        return out
