"""The `kvrack` admin commands against a real daemon: each answers with --json, and errors exit 1 with JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvrack.clients import Client


def kvrack(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "100"})
    assert (res.returncode == 0) == ok, res.stdout + res.stderr
    return res


def as_json(*args: str, ok: bool = True):
    return json.loads(kvrack(*args, "--json", ok=ok).stdout)


def test_admin_commands(daemon):
    a = ["--address", daemon.socket_path]  # the admin socket is found beside the data socket
    keys = sorted(os.urandom(32) for _ in range(6))
    with Client.connect(daemon.socket_path) as c:
        c.put(keys, [bytes(64 * 1024)] * 6)

    assert [t["tier"] for t in as_json("tiers", *a)][0] == "dram"
    assert as_json("namespaces", *a)[0]["blocks"] == 6
    page = as_json("blocks", "ls", "default", "--limit", "4", *a)
    assert [b["key"] for b in page["blocks"]] == [k.hex() for k in keys[:4]] and page["next_cursor"] == keys[3].hex()
    assert as_json("blocks", "inspect", "default", keys[0].hex(), *a)["size_bytes"] == 64 * 1024
    assert as_json("blocks", "rm", "default", keys[0].hex(), *a)["deleted"][0]["deleted"] is True
    err = as_json("blocks", "inspect", "default", keys[0].hex(), *a, ok=False)
    assert err["status"] == 404 and err["error"] == "NOT_FOUND"

    assert as_json("config", "get", "log.level", *a)["log.level"]["value"] == "info"
    assert as_json("config", "set", "log.level=debug", *a) == {"changed": {"log.level": "debug"}}
    err = as_json("config", "set", "dram.capacity_bytes=1GiB", *a, ok=False)
    assert err["status"] == 409 and "restart" in err["message"]
    err = as_json("config", "set", "log.level=warning", "--token", "not-the-token-0123", *a, ok=False)
    assert err["status"] == 401 and err["error"] == "UNAUTHENTICATED"

    q = as_json("quota", "set", "default", "dram_bytes=256KiB", *a)
    assert q["quota"] == {"dram_bytes": 256 * 1024} and q["dram_bytes"] == 256 * 1024 and q["evicted_blocks"] == 1
    assert as_json("quota", "get", "default", *a)["quota"] == {"dram_bytes": 256 * 1024}
    assert as_json("quota", "set", "default", "dram_bytes=none", *a)["quota"] == {}

    out = as_json("evict", "dram", "--bytes", "128KiB", *a)
    assert out["evicted_blocks"] == 2 and out["evicted_bytes"] == 128 * 1024
    cleared = as_json("blocks", "clear", "default", *a)
    assert cleared["deleted"] == 2 and cleared["remaining"] == 0

    table = kvrack("tiers", *a).stdout
    assert "dram" in table and "capacity" in table
    assert "UNKNOWN_NAMESPACE" in kvrack("quota", "get", "nope", *a, ok=False).stdout


def test_status_goes_through_the_admin_api_and_falls_back_to_the_data_socket(daemon, tmp_path):
    view = as_json("status", "--address", daemon.socket_path)
    assert view["address"] == daemon.socket_path and view["daemon"]["admin"].startswith("unix:")
    from kvrack.bench.spawn import DaemonProcess
    from tests.conftest import SMALL
    with DaemonProcess({**SMALL, "admin.enabled": "false"}) as plain:
        view = as_json("status", "--address", plain.socket_path)
        assert view["address"] == plain.socket_path and view["tiers"][0]["tier"] == "dram"
        assert view["daemon"]["admin"] is None
