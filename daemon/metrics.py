"""Prometheus metrics: a view of the stats registry, taken at each scrape.

Every value comes from the view (``kvrack.daemon.admin.views.stats_view``) of the one stats snapshot that
``/v1/stats`` and ``kvrack status`` show; nothing is counted twice. Namespace labels are capped (``admin.metrics_max_namespaces``): namespaces past the
cap, by bytes held, are summed under ``namespace="other"``, so a flood of tenants cannot explode the series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# name -> (type, help, labels): the whole surface, which the Grafana dashboard and the tests check against
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kvrack_info": ("gauge", "Always 1; the version as a label.", ("version",)),
    "kvrack_uptime_seconds": ("gauge", "Seconds since the daemon started.", ()),
    "kvrack_tier_capacity_bytes": ("gauge", "Bytes a tier can hold.", ("tier",)),
    "kvrack_tier_used_bytes": ("gauge", "Bytes of blocks a tier holds.", ("tier",)),
    "kvrack_tier_degraded": ("gauge", "1 while a tier reports a fault (see kvrack status).", ("tier",)),
    "kvrack_blocks": ("gauge", "Blocks held, per tier and namespace.", ("tier", "namespace")),
    "kvrack_namespace_used_bytes": ("gauge", "Bytes held, per tier and namespace.", ("tier", "namespace")),
    "kvrack_namespace_quota_bytes": ("gauge", "A namespace's quota on a tier (absent: none).", ("tier", "namespace")),
    "kvrack_lookups_total": ("counter", "Keys looked up, by result.", ("result",)),
    "kvrack_hits_total": ("counter", "Keys looked up that were cached, by the tier that held them.", ("tier",)),
    "kvrack_request_duration_seconds": ("histogram", "Time to answer a request, by op.", ("op",)),
    "kvrack_moved_bytes_total": ("counter", "Bytes copied between tiers, by direction.", ("from", "to")),
    "kvrack_moved_blocks_total": ("counter", "Blocks copied between tiers, by direction.", ("from", "to")),
    "kvrack_transfer_bytes_total": ("counter", "Block bytes clients wrote (in) and read (out), by transport.",
                                    ("direction", "transport")),
    "kvrack_leases": ("gauge", "Reservations and pins held now.", ("kind",)),
    "kvrack_sessions": ("gauge", "Client connections now.", ()),
    "kvrack_evictions_total": ("counter", "Blocks evicted, by tier and reason.", ("tier", "reason")),
    "kvrack_errors_total": ("counter", "Replies and per-key results that were errors, by code.", ("code",)),
}


def _capped(namespaces: dict[str, dict[str, Any]], cap: int) -> dict[str, dict[str, Any]]:
    """The ``cap`` namespaces holding the most bytes by name, the rest summed as ``other``."""
    if len(namespaces) <= cap:
        return namespaces
    ranked = sorted(namespaces, key=lambda n: -namespaces[n].get("bytes", 0))
    out = {n: namespaces[n] for n in ranked[:cap]}
    other: dict[str, Any] = {}
    for n in ranked[cap:]:
        for k, v in namespaces[n].items():
            if isinstance(v, (int, float)):
                other[k] = other.get(k, 0) + v
    out["other"] = other
    return out


def families(v: dict[str, Any], max_namespaces: int) -> Iterator[Metric]:
    """The metric families of one stats view (``kvrack.daemon.admin.views.stats_view``)."""
    def fam(name: str) -> Any:
        kind, help_text, labels = METRICS[name]
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[kind]
        return cls(name.removesuffix("_total") if kind == "counter" else name, help_text, labels=list(labels))

    daemon = v.get("daemon", {})
    info = fam("kvrack_info")
    info.add_metric([str(daemon.get("version", ""))], 1)
    up = fam("kvrack_uptime_seconds")
    up.add_metric([], daemon.get("uptime_s", 0))
    yield from (info, up)

    cap, used, degraded = fam("kvrack_tier_capacity_bytes"), fam("kvrack_tier_used_bytes"), fam("kvrack_tier_degraded")
    evictions, hits = fam("kvrack_evictions_total"), fam("kvrack_hits_total")
    for t in v.get("tiers", []):
        tier = t["tier"]
        degraded.add_metric([tier], 1 if t["degraded"] else 0)
        if not t["present"]:
            continue
        cap.add_metric([tier], t["capacity_bytes"])
        used.add_metric([tier], t["used_bytes"])
        hits.add_metric([tier], t["hits"])
        for reason, n in t["evictions"].items():
            evictions.add_metric([tier, reason], n)
    yield from (cap, used, degraded, evictions, hits)

    blocks, ns_bytes, quotas = fam("kvrack_blocks"), fam("kvrack_namespace_used_bytes"), fam("kvrack_namespace_quota_bytes")
    namespaces = v.get("namespaces", {})
    for name, ns in _capped(namespaces, max_namespaces).items():
        for tier in ("dram", "nvme"):
            blocks.add_metric([tier, name], ns.get(f"{tier}_blocks", 0))
            ns_bytes.add_metric([tier, name], ns.get(f"{tier}_bytes", 0))
            quota = (ns.get("quota") or {}).get(f"{tier}_bytes")
            if quota:
                quotas.add_metric([tier, name], quota)
    if len(namespaces) <= max_namespaces:  # tiers that count per namespace themselves (CXL regions, HBM arenas)
        for t in v.get("tiers", []):
            for name, region in (t["detail"].get("regions") or t["detail"].get("arenas") or {}).items():
                if name in namespaces:
                    blocks.add_metric([t["tier"], name], region.get("blocks", 0))
    yield from (blocks, ns_bytes, quotas)

    lookups = fam("kvrack_lookups_total")
    lookups.add_metric(["hit"], v["lookups"]["hits"])
    lookups.add_metric(["miss"], v["lookups"]["misses"])
    yield lookups

    hist = HistogramMetricFamily("kvrack_request_duration_seconds", METRICS["kvrack_request_duration_seconds"][1],
                                 labels=["op"])
    for op, r in v.get("requests", {}).items():
        hist.add_metric([op], [(le, n) for le, n in r["buckets"]], r["seconds_sum"])
    yield hist

    moved_bytes, moved_blocks = fam("kvrack_moved_bytes_total"), fam("kvrack_moved_blocks_total")
    for direction, m in v.get("moves", {}).items():
        src, _, dst = direction.partition("_to_")
        moved_bytes.add_metric([src, dst], m.get("bytes", 0))
        moved_blocks.add_metric([src, dst], m.get("blocks", 0))
    yield from (moved_bytes, moved_blocks)

    transfer = fam("kvrack_transfer_bytes_total")
    for direction, by_transport in v.get("transfers", {}).items():
        for transport, n in by_transport.items():
            transfer.add_metric([direction, transport], n)
    yield transfer

    leases = fam("kvrack_leases")
    for kind, n in v.get("leases", {}).items():
        leases.add_metric([kind], n)
    sessions = fam("kvrack_sessions")
    sessions.add_metric([], v.get("sessions", 0))
    errors = fam("kvrack_errors_total")
    for code, n in v.get("errors", {}).items():
        errors.add_metric([code], n)
    yield from (leases, sessions, errors)


class ViewCollector:
    """A prometheus-client collector over one stats view: ``generate_latest(ViewCollector(view, cap))``."""

    def __init__(self, view: dict[str, Any], max_namespaces: int) -> None:
        self.view = view
        self.max_namespaces = max_namespaces

    def collect(self) -> Iterator[Metric]:
        yield from families(self.view, self.max_namespaces)


def render(view: dict[str, Any], max_namespaces: int) -> bytes:
    """The Prometheus text exposition of one stats view."""
    return generate_latest(ViewCollector(view, max_namespaces))
