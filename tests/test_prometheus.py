"""A real Prometheus (Debian's package) scrapes a daemon with the shipped test scrape config, and a kvrack metric
comes back through Prometheus's HTTP query API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from kvrack.bench.spawn import DaemonProcess, free_port
from kvrack.clients import Client
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (Debian package `prometheus`; "
                                               "`make test` installs it when run as root)")
@pytest.mark.timeout(120)
def test_prometheus_scrapes_the_daemon_with_the_shipped_config(tmp_path):
    admin_port, prom_port = free_port(), free_port()
    with DaemonProcess({**SMALL, "admin.tcp_port": str(admin_port)}) as d:
        with Client.connect(d.socket_path) as c:
            keys = [os.urandom(32) for _ in range(3)]
            c.put(keys, [bytes(1000)] * 3)
            c.lookup(keys)
        config = (ROOT / "deploy" / "prometheus" / "kvrack-test.yml").read_text()
        (tmp_path / "prometheus.yml").write_text(config.replace("KVRACK_ADMIN_TARGET", f"127.0.0.1:{admin_port}"))
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        try:
            deadline = time.monotonic() + 60
            found: list[dict] = []
            while time.monotonic() < deadline and not found:
                time.sleep(1)
                try:
                    found = query(prom_port, 'kvrack_tier_capacity_bytes{tier="dram"}')
                except OSError:
                    continue
            assert found, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert float(found[0]["value"][1]) == 8 << 20
            assert found[0]["metric"]["job"] == "kvrack"
            hits = query(prom_port, 'kvrack_lookups_total{result="hit"}')
            assert float(hits[0]["value"][1]) == 3
            up = query(prom_port, 'up{job="kvrack"}')
            assert float(up[0]["value"][1]) == 1
        finally:
            prom.terminate()
            prom.wait(30)
