"""The Grafana dashboard's main panels as PNG plots, from a real Prometheus scraping a real daemon under load.

    make panels        # or: .venv/bin/python docs/plot_panels.py docs/panels

Starts kvrackd (two tenants, DRAM + NVMe, the admin API on a TCP port) and Prometheus with the shipped test scrape
config (deploy/prometheus/kvrack-test.yml, 1 s), runs a bounded load in phases (fill, reuse, a tenant's quota
lowered, an operator's eviction), then asks Prometheus's HTTP query API for each panel's own expressions (from
deploy/grafana/kvrack-dashboard.json) and plots them. Needs Prometheus (Debian: apt-get install prometheus) and
the docs extra (matplotlib).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvrack.bench.spawn import DaemonProcess, free_port  # noqa: E402
from kvrack.clients import Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "kvrack-dashboard.json"
PANELS = ("Hit ratio per tier", "Bytes moved between tiers", "Request latency", "Latency p50 / p99 per op",
          "Tier capacity vs used", "Evictions / s", "Bytes per namespace", "Client transfer bytes")
RATE_WINDOW = "5s"
UNITS = {"percentunit": "share of keys looked up", "Bps": "bytes / s", "ops": "per second", "s": "seconds",
         "bytes": "bytes", "short": "count"}
BLOCK = 256 * 1024
TENANTS = """
[[namespaces]]
name = "tenant-a"
quota_dram_bytes = "48MiB"

[[namespaces]]
name = "tenant-b"
"""


def prom_get(port: int, path: str, **params: Any) -> Any:
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.loads(resp.read())
    if body["status"] != "success":
        raise RuntimeError(body)
    return body["data"]


def panel_targets() -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: (p, p.get("targets", [])) for p in dash["panels"] if p.get("type") != "row"}


def concrete(expr: str, seconds: int) -> str:
    """A dashboard expression with Grafana's variables filled in as Grafana would."""
    return (expr.replace('instance=~"$instance"', 'instance=~".*"').replace("$__rate_interval", RATE_WINDOW)
            .replace("$__range", f"{seconds}s"))


def load(d: DaemonProcess, seconds: float, admin: Any, log: list[str]) -> None:
    """Phases, each bounded in time and count: both tenants fill and reread with reuse; tenant-a's quota is
    lowered; an operator evicts half of DRAM; reads bring blocks back up from NVMe."""
    rng = random.Random(7)
    start = time.monotonic()
    stored: dict[str, list[bytes]] = {"tenant-a": [], "tenant-b": []}
    clients = {ns: Client.connect(d.socket_path, namespace=ns) for ns in stored}
    payload = os.urandom(BLOCK)
    phase = ""
    try:
        for _step in range(100_000):
            t = time.monotonic() - start
            if t > seconds:
                break
            now = "fill" if t < seconds * 0.3 else "quota" if t < seconds * 0.55 else "evict" if t < seconds * 0.7 \
                else "reread"
            if now != phase:
                phase = now
                log.append(f"{t:5.1f}s: {phase}")
                if phase == "quota":
                    admin.set_quota("tenant-a", dram_bytes=16 << 20)
                elif phase == "evict":
                    admin.evict("dram", share=0.5)
            for ns, c in clients.items():
                if phase in ("fill", "quota") or rng.random() < 0.2:
                    keys = [os.urandom(32) for _ in range(8)]
                    c.put(keys, [payload] * 8, raise_on_error=False)
                    stored[ns] += keys
                pool = stored[ns]
                if pool:
                    hot = pool[-64:] if rng.random() < 0.7 else rng.sample(pool, min(16, len(pool)))
                    res = c.lookup(hot + [os.urandom(32)])
                    hits = [k for k, tier in zip(hot, res.tiers) if tier]
                    if hits:
                        with c.get(hits[:16]):
                            pass
            time.sleep(0.02)
    finally:
        for c in clients.values():
            c.close()


def plot(title: str, panel: dict[str, Any], series: list[tuple[str, list[tuple[float, float]]]], t0: float,
         out: Path, unit: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    if panel.get("type") == "heatmap":
        buckets = sorted(((float(le) if le != "+Inf" else float("inf")), pts) for le, pts in series)
        times = sorted({ts for _le, pts in buckets for ts, _v in pts})
        cumulative = [[dict(pts).get(ts, 0.0) for ts in times] for _le, pts in buckets]
        # Prometheus buckets count everything at or below their bound: a cell is its bucket less the one below
        grid = [[max(0.0, row[j] - (cumulative[i - 1][j] if i else 0.0)) for j in range(len(times))]
                for i, row in enumerate(cumulative)]
        from matplotlib.colors import LogNorm
        top = max((v for row in grid for v in row), default=1.0) or 1.0
        im = ax.imshow([[v or float("nan") for v in row] for row in grid], aspect="auto", origin="lower", cmap="Oranges",
                       norm=LogNorm(vmin=1, vmax=max(top, 2)),
                       extent=(times[0] - t0, times[-1] - t0, 0, len(buckets)), interpolation="nearest")
        fig.colorbar(im, ax=ax, label=f"requests per {RATE_WINDOW}")
        ax.set_yticks([i + 0.5 for i in range(len(buckets))][::2])
        ax.set_yticklabels([_secs(le) for le, _ in buckets][::2], fontsize=7)
        ax.set_ylabel("latency (upper bound)")
    else:
        for label, pts in series:
            if not pts or all(v == 0 for _t, v in pts):
                continue
            ax.plot([ts - t0 for ts, _v in pts], [v for _ts, v in pts], label=label,
                    linestyle="--" if label.endswith(" quota") or (title.startswith("Tier capacity")
                                                                    and label.endswith(" capacity")) else "-")
        ax.legend(fontsize=7, loc="best", ncol=2)
        ax.set_ylabel(UNITS.get(unit, unit))
        if unit == "percentunit":
            ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("seconds into the run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _secs(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return f"{v * 1e6:.0f}µs" if v < 1e-3 else f"{v * 1e3:.0f}ms" if v < 1 else f"{v:.1f}s"


def main(out_dir: str = "docs/panels", seconds: float = 80.0) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        sys.exit("Prometheus is not installed (Debian: apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix="kvrack-panels-"))
    admin_port, prom_port = free_port(), free_port()
    (tmp / "kvrack.toml").write_text(TENANTS)
    settings = {"dram.capacity_bytes": "128MiB", "nvme.capacity_bytes": "512MiB", "nvme.dir": str(tmp / "nvme"),
                "admin.tcp_port": str(admin_port)}
    log: list[str] = []
    try:
        run_and_plot(tmp, out, settings, admin_port, prom_port, prometheus, seconds, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(log))
    print(f"wrote {len(PANELS)} panels to {out}")


def run_and_plot(tmp: Path, out: Path, settings: dict[str, str], admin_port: int, prom_port: int, prometheus: str,
                 seconds: float, log: list[str]) -> None:
    """Daemon and Prometheus up, the load, the queries, panels.json, the plots."""
    with DaemonProcess(settings, config_path=str(tmp / "kvrack.toml")) as d:
        config = (ROOT / "deploy" / "prometheus" / "kvrack-test.yml").read_text()
        (tmp / "prometheus.yml").write_text(config.replace("KVRACK_ADMIN_TARGET", f"127.0.0.1:{admin_port}"))
        prom = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            t0 = time.time()
            load(d, seconds, d.admin(), log)
            time.sleep(3)
            t1 = time.time()
            span = int(t1 - t0) + 1
            results: dict[str, Any] = {}
            targets = panel_targets()
            for i, title in enumerate(PANELS):
                panel, tgts = targets[title]
                series = []
                for tgt in tgts:
                    data = prom_get(prom_port, "/api/v1/query_range", query=concrete(tgt["expr"], span),
                                    start=t0, end=t1, step="1")
                    for r in data["result"]:
                        label = tgt.get("legendFormat", "")
                        for k, v in r["metric"].items():
                            label = label.replace("{{" + k + "}}", v)
                        series.append((label, [(float(ts), float(v)) for ts, v in r["values"] if v not in ("NaN",)]))
                unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                name = f"{i + 1:02d}-" + "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
                name = "-".join(filter(None, name.split("-")))
                results[title] = {"file": f"{name}.png", "unit": unit, "queries": [concrete(t["expr"], span) for t in tgts],
                                  "series": series}
            (out / "panels.json").write_text(json.dumps({"command": "make panels", "seconds": seconds, "start": t0,
                                                         "phases": log, "panels": results}) + "\n")
            replot(out)
        finally:
            prom.terminate()
            prom.wait(30)


def replot(out: Path) -> None:
    """Draw the PNGs from panels.json (the query results of the last run): ``plot_panels.py DIR --replot``."""
    data = json.loads((out / "panels.json").read_text())
    targets = panel_targets()
    for title, r in data["panels"].items():
        plot(title, targets[title][0], [(label, [tuple(p) for p in pts]) for label, pts in r["series"]], data["start"],
             out / r["file"], r["unit"])


if __name__ == "__main__":
    if "--replot" in sys.argv:
        replot(Path(sys.argv[1]))
    else:
        main(*sys.argv[1:2])
