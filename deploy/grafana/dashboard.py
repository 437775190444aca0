"""The kvrack Grafana dashboard, generated with grafanalib.

    .venv/bin/python deploy/grafana/dashboard.py                 # writes deploy/grafana/kvrack-dashboard.json
    .venv/bin/python deploy/grafana/dashboard.py OUT.json        # or anywhere else

The JSON beside this file is its output, kept in the repository for importing into Grafana (Dashboards >
Import, then pick the Prometheus data source); tests/test_deploy.py fails when it differs from ``build()``, and
when an expression names a metric or label that kvrack.daemon.metrics.METRICS does not export. Edit this file,
never the JSON.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
    Dashboard,
    GridPos,
    Heatmap,
    HeatmapColor,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
    YAxis,
)

DEFAULT_OUT = Path(__file__).with_name("kvrack-dashboard.json")
UID = "kvrack-overview"

# Every panel queries the data source picked in the dashboard's "Data source" variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every expression is limited to the daemons picked in the "Daemon" variable.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
HIT = 'result="hit"'


def sel(*matchers: str) -> str:
    """A label selector: the instance filter plus ``matchers``."""
    return "{" + ", ".join((SEL, *matchers)) + "}"


def rate(counter: str, *matchers: str) -> str:
    return f"rate({counter}{sel(*matchers)}[{RATE}])"


def target(expr: str, legend: str, ref: str, **kw: Any) -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE, **kw)


def timeseries(title: str, description: str, targets: list[Target], unit: str, **kw: Any) -> TimeSeries:
    return TimeSeries(title=title, description=description, dataSource=DATASOURCE, targets=targets, unit=unit,
                      legendDisplayMode="table", legendPlacement="right", legendCalcs=["mean", "max", "lastNotNull"],
                      tooltipMode="multi", **kw)


def stat(title: str, description: str, expr: str, unit: str, **kw: Any) -> Stat:
    return Stat(title=title, description=description, dataSource=DATASOURCE, format=unit, reduceCalc="lastNotNull",
                targets=[target(expr, "", "A", instant=True)], **kw)


def overview() -> list[Any]:
    return [
        stat("Daemons", "Daemons reporting (kvrack_info).", f"count(kvrack_info{sel()})", "none", graphMode="none"),
        stat("Uptime", "Time since the most recently started daemon began.", f"min(kvrack_uptime_seconds{sel()})",
             "s", graphMode="none"),
        stat("Hit ratio", "Keys found in any tier / keys looked up, over the dashboard's time range.",
             f"sum(increase(kvrack_lookups_total{sel(HIT)}[$__range]))"
             f" / sum(increase(kvrack_lookups_total{sel()}[$__range]))", "percentunit", decimals=1),
        stat("Sessions", "Client connections now, all daemons.", f"sum(kvrack_sessions{sel()})", "none"),
        stat("Degraded tiers", "Tiers reporting a fault (see `kvrack status` on that node).",
             f"sum(kvrack_tier_degraded{sel()})", "none", colorMode="background",
             thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]),
        stat("Errors / s", "Error replies and per-key errors, all codes.", f"sum({rate('kvrack_errors_total')})",
             "reqps", decimals=2),
    ]


def hits_and_traffic() -> list[Any]:
    return [
        timeseries(
            "Hit ratio per tier",
            "Share of looked-up keys served by each tier (they add up to the overall hit ratio), and the overall "
            "ratio. A key found in several tiers counts for the fastest.",
            [target(f"sum by (tier) ({rate('kvrack_hits_total')})"
                    f" / ignoring (tier) group_left sum({rate('kvrack_lookups_total')})", "{{tier}}", "A"),
             target(f"sum({rate('kvrack_lookups_total', HIT)})"
                    f" / sum({rate('kvrack_lookups_total')})", "all tiers", "B")],
            "percentunit", valueMin=0, valueMax=1),
        timeseries(
            "Lookups / s",
            "Keys looked up, by result.",
            [target(f"sum by (result) ({rate('kvrack_lookups_total')})", "{{result}}", "A")],
            "ops"),
        timeseries(
            "Bytes moved between tiers",
            "Copies between tiers (promotion, demotion, write-behind to NVMe, CXL and HBM copies), by direction.",
            [target(f"sum by (from, to) ({rate('kvrack_moved_bytes_total')})", "{{from}} → {{to}}", "A")],
            "Bps"),
        timeseries(
            "Client transfer bytes",
            "Block bytes clients wrote (in) and read (out), by transport (memfd, tcp, nixl, ...).",
            [target(f"sum by (direction, transport) ({rate('kvrack_transfer_bytes_total')})",
                    "{{direction}} {{transport}}", "A")],
            "Bps"),
    ]


def latency() -> list[Any]:
    return [
        Heatmap(
            title="Request latency",
            description="Requests answered per latency bucket, all ops.",
            dataSource=DATASOURCE,
            targets=[target(f"sum by (le) (increase(kvrack_request_duration_seconds_bucket{sel()}[{RATE}]))",
                            "{{le}}", "A", format="heatmap")],
            dataFormat="tsbuckets",
            yBucketBound="upper",
            hideZeroBuckets=True,
            color=HeatmapColor(mode="scheme", colorScheme="interpolateOranges", exponent=0.5),
            yAxis=YAxis(format="s"),
        ),
        timeseries(
            "Latency p50 / p99 per op",
            "From the request-duration histogram, per op; a quantile can be no finer than the bucket bounds.",
            [target(f"histogram_quantile({q}, sum by (op, le) "
                    f"({rate('kvrack_request_duration_seconds_bucket')}))", f"p{round(q * 100)} {{{{op}}}}", ref)
             for q, ref in ((0.5, "A"), (0.99, "B"))],
            "s"),
    ]


def capacity() -> list[Any]:
    return [
        timeseries(
            "Tier capacity vs used",
            "Bytes each tier can hold (dashed) and holds.",
            [target(f"sum by (tier) (kvrack_tier_capacity_bytes{sel()})", "{{tier}} capacity", "A"),
             target(f"sum by (tier) (kvrack_tier_used_bytes{sel()})", "{{tier}} used", "B")],
            "bytes",
            overrides=[{"matcher": {"id": "byRegexp", "options": ".* capacity"},
                        "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}]),
        timeseries(
            "Tier fill",
            "Used / capacity per tier; DRAM sits near dram.evict_high_watermark once warm.",
            [target(f"sum by (tier) (kvrack_tier_used_bytes{sel()}) / sum by (tier) (kvrack_tier_capacity_bytes{sel()})",
                    "{{tier}}", "A")],
            "percentunit", valueMin=0, valueMax=1),
        timeseries(
            "Evictions / s",
            "Blocks evicted, by tier and reason (inline: on a put's path; background: the watermark evictor; "
            "quota: a namespace over its quota; admin: asked for; capacity: a lower tier full).",
            [target(f"sum by (tier, reason) ({rate('kvrack_evictions_total')})", "{{tier}} {{reason}}", "A")],
            "ops"),
    ]


def namespaces() -> list[Any]:
    return [
        timeseries(
            "Bytes per namespace",
            "Bytes each namespace holds, per tier, and its quota where one is set (namespaces past "
            "admin.metrics_max_namespaces are summed as \"other\").",
            [target(f"sum by (namespace, tier) (kvrack_namespace_used_bytes{sel()})", "{{namespace}} {{tier}}", "A"),
             target(f"sum by (namespace, tier) (kvrack_namespace_quota_bytes{sel()})", "{{namespace}} {{tier}} quota",
                    "B")],
            "bytes"),
        timeseries(
            "Blocks per namespace",
            "Blocks each namespace holds, per tier.",
            [target(f"sum by (namespace, tier) (kvrack_blocks{sel()})", "{{namespace}} {{tier}}", "A")],
            "short"),
    ]


def errors_sessions() -> list[Any]:
    return [
        timeseries(
            "Errors by code",
            "Error replies and per-key error results, by code.",
            [target(f"sum by (code) ({rate('kvrack_errors_total')})", "{{code}}", "A")],
            "ops"),
        timeseries(
            "Sessions and leases",
            "Client connections, and reservations (puts not yet committed) and pins held now.",
            [target(f"sum(kvrack_sessions{sel()})", "sessions", "A"),
             target(f"sum by (kind) (kvrack_leases{sel()})", "{{kind}}", "B")],
            "short"),
    ]


# (row title, panels, panel height); each row's panels share its width evenly
ROWS = (
    ("Overview", overview, 4),
    ("Hits and traffic", hits_and_traffic, 8),
    ("Latency", latency, 9),
    ("Capacity and eviction", capacity, 8),
    ("Namespaces", namespaces, 8),
    ("Errors, sessions and leases", errors_sessions, 8),
)


def _layout() -> list[Any]:
    """Rows, each followed by its panels laid out side by side on Grafana's 24-column grid."""
    panels: list[Any] = []
    y = 0
    for title, make, height in ROWS:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        row = make()
        width = 24 // len(row)
        for i, panel in enumerate(row):
            panel.gridPos = GridPos(h=height, w=width, x=i * width, y=y)
            panels.append(panel)
        y += height
    return panels


def dashboard() -> Dashboard:
    return Dashboard(
        title="kvrack",
        uid=UID,
        description="kvrack KV-cache pool: hit ratio, traffic between tiers, latency, capacity, namespaces "
                    "(metrics of the admin API's /metrics; generated by deploy/grafana/dashboard.py).",
        tags=["kvrack"],
        timezone="browser",
        refresh="30s",
        time=Time("now-3h", "now"),
        graphTooltip=GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        templating=Templating(list=[
            Template(name="datasource", label="Data source", type="datasource", query="prometheus"),
            Template(name="instance", label="Daemon", dataSource=DATASOURCE,
                     query="label_values(kvrack_info, instance)", includeAll=True, multi=True, allValue=".*",
                     default="$__all", refresh=2),
        ]),
        panels=_layout(),
    ).auto_panel_ids()


def build() -> dict[str, Any]:
    """The dashboard as a JSON-able dict: what the JSON file holds."""
    return json.loads(json.dumps(dashboard().to_json_data(), cls=DashboardEncoder))


def _walk_panels(panels: list[dict[str, Any]]) -> Any:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels") or [])


def exprs(dashboard_dict: dict[str, Any]) -> list[str]:
    """Every PromQL expression the dashboard runs: the panels' targets and the query variables."""
    out = [t["expr"] for p in _walk_panels(dashboard_dict.get("panels") or []) for t in p.get("targets") or []
           if t.get("expr")]
    for var in dashboard_dict.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(METRIC, LABEL) is Grafana's, not PromQL; its selector part is
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
            out.append(m.group(1) if m else q)
    return out


def write(path: Path) -> None:
    path.write_text(json.dumps(build(), sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"usage: {sys.argv[0]} [OUT.json]  (default {DEFAULT_OUT})", file=sys.stderr)
        return 2
    out = Path(argv[0]) if argv else DEFAULT_OUT
    write(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
