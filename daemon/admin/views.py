"""The shape the admin API, the metrics and ``kvrack status`` show: one view of one stats snapshot.

``StatsRegistry.snapshot()`` gives each owner's raw sections; ``stats_view`` lays them out per tier with the
same fields for every tier (capacity, use, hits, misses, evictions by reason, promotions, demotions, bytes
moved in and out, degraded), then per namespace, per op, per transport. ``/v1/stats`` returns it and
``/metrics`` is rendered from it, so the two always agree. No FastAPI here: the CLI imports it too.
"""

from __future__ import annotations

from typing import Any

# tiers from fastest to slowest: a promotion moves a block up this list, a demotion down it
SPEED_ORDER = ("hbm", "dram", "cxl", "nvme")


def _evictions(t: dict[str, Any], ops: dict[str, Any]) -> dict[str, int]:
    """A tier's evicted blocks by reason: capacity (inline or background, for DRAM), quota, admin."""
    name = t["tier"]
    if name == "dram":
        background, quota, admin = (ops.get("background_evictions", 0), ops.get("quota_evictions", 0),
                                    ops.get("admin_evictions", 0))
        return {"inline": max(0, ops.get("evictions", 0) - background - quota - admin), "background": background,
                "quota": quota, "admin": admin}
    if name == "nvme":
        quota, admin = t.get("quota_evictions", 0), t.get("admin_evictions", 0)
        return {"capacity": max(0, t.get("evictions", 0) - quota - admin), "quota": quota, "admin": admin}
    if name == "cxl":
        return {"capacity": t.get("policy_evictions", 0)}
    if name == "hbm":
        return {"capacity": t.get("dropped_blocks", 0)}
    return {}


def _moved(name: str, moves: dict[str, dict[str, int]]) -> tuple[dict[str, int], int]:
    """Bytes moved into and out of a tier, and the blocks it took from slower tiers (promotions)."""
    moved = {"in": 0, "out": 0}
    up = 0
    rank = SPEED_ORDER.index(name) if name in SPEED_ORDER else 0
    for direction, m in moves.items():
        src, _, dst = direction.partition("_to_")
        if dst == name:
            moved["in"] += m.get("bytes", 0)
            if src in SPEED_ORDER and SPEED_ORDER.index(src) > rank:
                up += m.get("blocks", 0)
        if src == name:
            moved["out"] += m.get("bytes", 0)
    return moved, up


def tier_view(t: dict[str, Any], ops: dict[str, Any], hits: dict[str, int], lookup_keys: int,
              moves: dict[str, dict[str, int]]) -> dict[str, Any]:
    name = t["tier"]
    present = t.get("present", True) is not False and t.get("available", True) is not False
    moved, promotions = _moved(name, moves)
    degraded = t.get("degraded") or None
    if t.get("available") is False and not degraded:
        degraded = "unavailable"
    hit = hits.get(name, 0)
    return {
        "tier": name, "present": present,
        "capacity_bytes": int(t.get("capacity_bytes", 0) or 0) if present else 0,
        "used_bytes": int(t.get("used_bytes", 0) or 0) if present else 0,
        "blocks": int(t.get("blocks", 0) or 0) if present else 0,
        "hits": hit, "misses": max(0, lookup_keys - hit) if present else 0,
        "evictions": _evictions(t, ops) if present else {},
        "promotions": promotions,
        "demotions": int(t.get("demoted_blocks", 0)) if name == "nvme" else 0,
        "moved_bytes": moved,
        "degraded": None if degraded is None else str(degraded),
        "reason": t.get("reason"),
        "detail": t,
    }


def stats_view(s: dict[str, Any], drain: dict[str, Any] | None = None) -> dict[str, Any]:
    """The admin view of one raw snapshot (``StatsRegistry.snapshot()``)."""
    ops = s.get("ops", {})
    lookup_keys, lookup_hits = ops.get("lookup_keys", 0), ops.get("lookup_hits", 0)
    hits = s.get("hits_by_tier", {})
    moves = s.get("moves", {})
    server = s.get("server", {})
    return {
        "daemon": s.get("daemon", {}),
        "tiers": [tier_view(t, ops, hits, lookup_keys, moves) for t in s.get("tiers", [])],
        "lookups": {"keys": lookup_keys, "hits": lookup_hits, "misses": lookup_keys - lookup_hits,
                    "hit_ratio": round(lookup_hits / lookup_keys, 4) if lookup_keys else None},
        "namespaces": s.get("namespaces", {}),
        "requests": s.get("requests", {}),
        "errors": s.get("errors", {}),
        "moves": moves,
        "transfers": s.get("transfers", {}),
        "leases": s.get("leases", {}),
        "sessions": server.get("sessions", 0),
        "server": server,
        "counters": ops,
        "tcp": s.get("tcp"),
        "events": s.get("events"),
        "drain": drain or {"state": "serving"},
    }
