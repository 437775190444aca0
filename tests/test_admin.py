"""The admin API against a real daemon: every endpoint, its errors, its auth, settings changed at runtime one
by one, quotas with two tenants competing for one tier, and /metrics against /v1/stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvrack import protocol as P
from kvrack.bench.spawn import DaemonProcess, free_port
from kvrack.clients import Client
from kvrack.clients.admin import AdminApiError, AdminClient
from kvrack.daemon.settings_table import SETTINGS
from tests.conftest import SMALL, RawConn, eventually

ROOT = Path(__file__).resolve().parent.parent
TENANTS = """
[[namespaces]]
name = "a"
quota_dram_bytes = "2MiB"

[[namespaces]]
name = "b"
token = "b-secret-token-0123456789"
"""


def error_of(fn, *args, **kw) -> AdminApiError:
    with pytest.raises(AdminApiError) as info:
        fn(*args, **kw)
    return info.value


@pytest.fixture
def tenants(tmp_path):
    conf = tmp_path / "kvrack.toml"
    conf.write_text(TENANTS)
    d = DaemonProcess(SMALL, config_path=str(conf))
    try:
        yield d
    finally:
        d.stop()


def put_blocks(path: str, n: int, size: int = 256 * 1024, namespace: str = "default") -> list[bytes]:
    keys = [os.urandom(32) for _ in range(n)]
    with Client.connect(path, namespace=namespace) as c:
        c.put(keys, [bytes([i % 251]) * size for i in range(n)], raise_on_error=False)
    return keys


# ------------------------------------------------------------------------------------------------- reads

def test_probes_stats_tiers_and_namespaces(daemon):
    api = daemon.admin()
    keys = put_blocks(daemon.socket_path, 4)
    with Client.connect(daemon.socket_path) as c:
        assert c.lookup(keys + [os.urandom(32)]).prefix == 4
    health = api.request("GET", "/healthz")
    assert health["status"] == "ok" and health["pid"] == daemon.pid
    assert api.request("GET", "/readyz") == {"status": "ready", "reason": None}
    stats = api.stats()
    dram = next(t for t in stats["tiers"] if t["tier"] == "dram")
    assert dram["capacity_bytes"] == 8 << 20 and dram["blocks"] == 4 and dram["used_bytes"] == 4 << 18
    assert dram["hits"] == 4 and dram["misses"] == 1 and dram["degraded"] is None
    assert set(dram["evictions"]) == {"inline", "background", "quota", "admin"}
    assert stats["lookups"] == {"keys": 5, "hits": 4, "misses": 1, "hit_ratio": 0.8}
    assert stats["requests"]["lookup"]["count"] == 1 and stats["requests"]["reserve"]["count"] >= 1
    assert stats["transfers"]["in"]["shm"] == 4 << 18
    assert stats["namespaces"]["default"]["dram_blocks"] == 4
    assert api.tiers() == stats["tiers"][: len(api.tiers())] or [t["tier"] for t in api.tiers()] == \
        [t["tier"] for t in stats["tiers"]]
    (ns,) = api.namespaces()
    assert ns["name"] == "default" and ns["blocks"] == 4 and ns["lookup_hits"] == 4 and ns["quota"] == {}


def test_secrets_never_show(tenants):
    api = tenants.admin()
    texts = [json.dumps(api.config()), json.dumps(api.stats()), json.dumps(api.namespaces()), api.metrics()]
    assert all("b-secret-token" not in t for t in texts)
    assert all(tenants.admin().token not in t for t in texts)  # type: ignore[operator]
    b = next(ns for ns in api.config()["namespaces"] if ns["name"] == "b")
    assert b == {"name": "b", "uids": [], "gids": [], "remote": True, "quota": {}}
    assert "b-secret-token" not in tenants.log() and api.token not in tenants.log()


def test_config_shows_each_settings_value_source_and_runtime_flag(daemon):
    settings = daemon.admin().config()["settings"]
    assert set(settings) == {s.name for s in SETTINGS}
    assert settings["server.socket_path"] == {"value": daemon.socket_path, "source": "command line",
                                              "default": None, "runtime": False}
    assert settings["log.level"]["runtime"] and settings["log.level"]["source"] == "default"


def test_blocks_are_paged_in_key_order_with_prefix_and_cursor(daemon):
    api = daemon.admin()
    keys = sorted(put_blocks(daemon.socket_path, 25, size=4096))
    seen, cursor = [], None
    for _ in range(10):
        page = api.blocks("default", limit=10, cursor=cursor)
        seen += [b["key"] for b in page["blocks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [k.hex() for k in keys]
    nibble = keys[0].hex()[0]
    assert [b["key"] for b in api.blocks("default", prefix=nibble, limit=1000)["blocks"]] == \
        [k.hex() for k in keys if k.hex().startswith(nibble)]
    two = keys[0].hex()[:2]
    assert all(b["key"].startswith(two) for b in api.blocks("default", prefix=two)["blocks"])
    assert error_of(api.blocks, "default", prefix="zz").status == 422
    assert error_of(api.blocks, "default", cursor="00").status == 422
    assert error_of(api.blocks, "default", limit=0).status == 422
    err = error_of(api.blocks, "nope")
    assert (err.status, err.code, err.error) == (404, int(P.ErrorCode.UNKNOWN_NAMESPACE), "UNKNOWN_NAMESPACE")


def test_one_block_inspected(daemon):
    api = daemon.admin()
    (key,) = put_blocks(daemon.socket_path, 1, size=5000)
    with Client.connect(daemon.socket_path) as c, c.get([key]) as lease:
        b = api.block("default", key.hex())
        assert b["pins"] == 1 and b["hits"] == 1
        del lease
    b = api.block("default", key.hex())
    assert b["size_bytes"] == 5000 and b["state"] == "committed" and b["pins"] == 0
    assert b["age_s"] is None  # no NVMe copy (this daemon has no NVMe tier): no write time to tell
    assert [c["tier"] for c in b["copies"]] == ["dram"]
    err = error_of(api.block, "default", "00" * 32)
    assert (err.status, err.error) == (404, "NOT_FOUND")
    assert error_of(api.block, "default", "abc").status == 422


# --------------------------------------------------------------------------------------------- mutations

def test_every_mutation_needs_the_token_and_changes_nothing_without_it(daemon):
    (key,) = put_blocks(daemon.socket_path, 1)
    schema = daemon.admin().request("GET", "/openapi.json")
    bodies = {"/v1/namespaces/{ns}/quota": {"dram_bytes": 1}, "/v1/tiers/{tier}/evict": {"share": 1.0},
              "/v1/config": {"log.level": "debug"}, "/v1/drain": {"grace_s": 0}}
    mutations = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if m != "get"]
    assert len(mutations) == 6, mutations
    for token in ("", "wrong-token-0123456789"):
        api = AdminClient(daemon.admin_path, token)
        for method, path in mutations:
            url = path.format(ns="default", key_hex=key.hex(), tier="dram")
            err = error_of(api.request, method, url, body=bodies.get(path))
            assert (err.status, err.error) == (401, "UNAUTHENTICATED"), (method, path)
    api = daemon.admin()
    assert api.block("default", key.hex())["copies"][0]["tier"] == "dram"
    assert api.config()["settings"]["log.level"]["value"] == "info"
    assert api.request("GET", "/readyz")["status"] == "ready"


def test_reads_need_the_token_when_read_auth_is_set():
    with DaemonProcess({**SMALL, "admin.read_auth": "true"}) as d:
        anonymous = AdminClient(d.admin_path, "")
        for path in ("/v1/stats", "/v1/tiers", "/v1/config", "/metrics", "/v1/namespaces"):
            assert error_of(anonymous.request, "GET", path).status == 401, path
        assert anonymous.request("GET", "/healthz")["status"] == "ok"
        assert anonymous.request("GET", "/readyz")["status"] == "ready"
        assert d.admin().stats()["daemon"]["pid"] == d.pid


def test_admin_socket_mode_follows_the_data_socket_and_the_token_file_is_private():
    with DaemonProcess({**SMALL, "server.socket_mode": "0o660"}) as d:
        assert os.stat(d.admin_path).st_mode & 0o777 == 0o660
        token = os.path.join(os.path.dirname(d.socket_path), "kvrack-admin.token")
        assert os.stat(token).st_mode & 0o777 == 0o600
        d.stop()
        assert not os.path.exists(d.admin_path) and not os.path.exists(token)


def test_delete_and_clear(daemon):
    api = daemon.admin()
    keys = put_blocks(daemon.socket_path, 10, size=1024)
    assert api.delete_block("default", keys[0].hex()) == {"namespace": "default", "key": keys[0].hex(), "deleted": True}
    assert error_of(api.delete_block, "default", keys[0].hex()).status == 404
    with Client.connect(daemon.socket_path) as c:
        assert c.lookup(keys[:2]).tiers[0] == 0
    assert api.clear("default", limit=4) == {"namespace": "default", "deleted": 4, "remaining": 5, "writing": 0}
    assert api.clear("default") == {"namespace": "default", "deleted": 5, "remaining": 0, "writing": 0}
    assert error_of(api.clear, "nope").status == 404


def test_a_block_being_written_is_not_deleted_under_its_writer(daemon):
    raw = RawConn(daemon.socket_path)
    try:
        raw.hello()
        key = os.urandom(32)
        raw.send({"op": "reserve", "id": 2, "keys": [key], "sizes": [100]})
        assert raw.recv()["codes"] == [0]
        err = error_of(daemon.admin().delete_block, "default", key.hex())
        assert (err.status, err.error) == (409, "IN_PROGRESS")
        assert daemon.admin().clear("default")["writing"] == 1
        raw.send({"op": "commit", "id": 3, "keys": [key]})
        assert raw.recv()["codes"] == [0]
    finally:
        raw.close()


def test_evict_by_bytes_and_share(daemon):
    api = daemon.admin()
    put_blocks(daemon.socket_path, 8, size=256 * 1024)
    out = api.evict("dram", nbytes=512 * 1024)
    assert out["evicted_blocks"] == 2 and out["evicted_bytes"] == 512 * 1024 and out["used_bytes"] == 6 << 18
    out = api.evict("dram", share=1.0)
    assert out["evicted_blocks"] == 6 and out["used_bytes"] == 0
    assert next(t for t in api.tiers() if t["tier"] == "dram")["evictions"]["admin"] == 8
    assert error_of(api.evict, "hbm", nbytes=1).status == 404
    assert error_of(api.evict, "nvme", nbytes=1).status == 404  # not open in this daemon
    assert error_of(api.request, "POST", "/v1/tiers/dram/evict", body={}).status == 422
    assert error_of(api.request, "POST", "/v1/tiers/dram/evict", body={"bytes": 1, "share": 0.5}).status == 422


def test_nvme_evict_and_its_quota():
    with DaemonProcess({"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB"}) as d:
        api = d.admin()
        keys = put_blocks(d.socket_path, 8, size=256 * 1024)
        assert eventually(lambda: api.namespaces()[0]["nvme_blocks"] == 8)
        block = api.block("default", keys[0].hex())
        assert [c["tier"] for c in block["copies"]] == ["dram", "nvme"] and 0 <= block["age_s"] < 60
        out = api.evict("nvme", nbytes=256 * 1024)
        assert out["evicted_blocks"] == 1 and out["used_bytes"] == 7 << 18
        q = api.set_quota("default", nvme_blocks=4)
        assert q["nvme_blocks"] == 4 and q["quota"] == {"nvme_blocks": 4} and q["evicted_blocks"] == 3
        with Client.connect(d.socket_path) as c:
            assert c.lookup(keys).prefix == 8  # DRAM still holds every block
        nvme = next(t for t in api.tiers() if t["tier"] == "nvme")
        assert nvme["evictions"] == {"capacity": 0, "quota": 0, "admin": 4}


# ----------------------------------------------------------------------------------------------- settings

def test_patch_refuses_bad_values_and_restart_settings_and_changes_nothing(daemon):
    api = daemon.admin()
    before = api.config()["settings"]
    for body, status in (({"log.level": "loud"}, 422), ({"leases.pin_timeout_s": -1}, 422),
                         ({"no.such": 1}, 422), ({"dram.capacity_bytes": "1GiB"}, 409),
                         ({"log.level": "debug", "dram.capacity_bytes": 1 << 30}, 409),
                         ({"dram.evict_low_watermark": 0.99, "dram.evict_high_watermark": 0.5}, 409)):
        err = error_of(api.set_config, body)
        assert err.status == status, (body, err.message)
        assert api.config()["settings"] == before, body
    err = error_of(api.set_config, {"dram.capacity_bytes": "1GiB"})
    assert "restart" in err.message and err.detail == {"dram.capacity_bytes": "cannot change while the daemon runs; "
                                                                              "it needs a restart"}
    assert api.set_config({}) == {"changed": {}}
    assert api.set_config({"log.level": "info"}) == {"changed": {}}  # already in effect


def test_every_runtime_setting_changes_through_patch(tenants):
    """One by one, each setting labelled changeable at runtime changes through PATCH, and does something."""
    api = tenants.admin()
    runtime = {s.name for s in SETTINGS if s.runtime}
    checked = set()

    def patch(name: str, value) -> None:
        assert api.set_config({name: value})["changed"] == {name: value}
        s = api.config()["settings"][name]
        assert (s["value"], s["source"]) == (value, "admin API")
        checked.add(name)

    patch("leases.reserve_timeout_s", 12.5)
    patch("leases.pin_timeout_s", 7.0)
    with Client.connect(tenants.socket_path, namespace="a") as c:  # new sessions are told the new leases
        assert (c._core.reserve_lease_s, c._core.pin_lease_s) == (12.5, 7.0)
    patch("dram.evict_low_watermark", 0.25)  # low first: it may not exceed the high one
    patch("dram.evict_high_watermark", 0.5)
    dram = next(t for t in api.tiers() if t["tier"] == "dram")["detail"]
    assert (dram["evict_high_water_bytes"], dram["evict_low_water_bytes"]) == (4 << 20, 2 << 20)
    put_blocks(tenants.socket_path, 24, namespace="b")  # 6 MiB: above the new high watermark
    assert eventually(lambda: next(t for t in api.tiers() if t["tier"] == "dram")["used_bytes"] <= 2 << 20)
    patch("log.level", "debug")
    with Client.connect(tenants.socket_path, namespace="a"):
        pass
    assert eventually(lambda: " DEBUG " in tenants.log())
    patch("admin.metrics_max_namespaces", 1)
    assert 'namespace="other"' in api.metrics()
    patch("admin.read_auth", True)
    assert error_of(AdminClient(tenants.admin_path, "").stats).status == 401
    assert checked == runtime, f"runtime settings without a test here: {runtime - checked}"


def test_sighup_reloads_quotas_from_the_file(tmp_path):
    conf = tmp_path / "kvrack.toml"
    conf.write_text(TENANTS)
    with DaemonProcess(SMALL, config_path=str(conf)) as d:
        api = d.admin()
        assert api.quota("a")["quota"] == {"dram_bytes": 2 << 20}
        conf.write_text(TENANTS.replace('quota_dram_bytes = "2MiB"', 'quota_dram_blocks = 3'))
        os.kill(d.pid, 1)
        assert eventually(lambda: api.quota("a")["quota"] == {"dram_blocks": 3})
        assert next(n for n in api.config()["namespaces"] if n["name"] == "a")["quota"] == {"dram_blocks": 3}


# ------------------------------------------------------------------------------------------------- quotas

def test_two_tenants_a_quota_evicts_only_its_own_blocks(tenants):
    api = tenants.admin()
    b_keys = put_blocks(tenants.socket_path, 8, namespace="b")  # 2 MiB, no quota
    # 4 MiB against a 2 MiB quota, in two puts: the second evicts the first (one put of all 16 would get 8
    # QUOTA_EXCEEDED: blocks being written count toward the quota and cannot be evicted)
    a_keys = put_blocks(tenants.socket_path, 8, namespace="a") + put_blocks(tenants.socket_path, 8, namespace="a")
    ns = {n["name"]: n for n in api.namespaces()}
    assert ns["a"]["dram_bytes"] == 2 << 20 and ns["b"]["dram_bytes"] == 2 << 20
    with Client.connect(tenants.socket_path, namespace="b") as c:
        assert c.lookup(b_keys).prefix == 8  # never another tenant's
    with Client.connect(tenants.socket_path, namespace="a") as c:
        held = [t != 0 for t in c.lookup(a_keys).tiers]
        assert held == [False] * 8 + [True] * 8  # its own oldest went first
    assert api.stats()["counters"]["quota_evictions"] == 8

    q = api.set_quota("a", dram_bytes=1 << 20)  # lowered at runtime: evicted down to it now
    assert q["dram_bytes"] == 1 << 20 and q["evicted_blocks"] == 4
    with Client.connect(tenants.socket_path, namespace="a") as c, c.get(a_keys[-4:]) as lease:
        assert all(v is not None for v in lease.views)
        # the quota is full of pinned blocks: nothing of a's own can go, so a's new put fails per key
        res = c.put([os.urandom(32)], [bytes(256 * 1024)], raise_on_error=False)
        assert res.names() == ["QUOTA_EXCEEDED"]
    with Client.connect(tenants.socket_path, namespace="b") as c:
        assert c.lookup(b_keys).prefix == 8
        assert c.put([os.urandom(32)], [bytes(256 * 1024)]).stored == 1  # b is not capped by a's quota
    assert error_of(api.set_quota, "nope", dram_bytes=1).status == 404
    assert error_of(api.request, "PUT", "/v1/namespaces/a/quota", body={"dram_bytes": -1}).status == 422
    assert error_of(api.request, "PUT", "/v1/namespaces/a/quota", body={"ram": 1}).status == 422
    assert api.set_quota("a")["quota"] == {}


# ------------------------------------------------------------------------------------------------ metrics

def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_match_the_stats_taken_at_the_same_moment(tenants):
    keys = put_blocks(tenants.socket_path, 6, namespace="a")
    with Client.connect(tenants.socket_path, namespace="a") as c:
        c.lookup(keys + [os.urandom(32)])
        with c.get(keys[:2]):
            api = tenants.admin()
            stats = api.stats()
            m = metric_values(api.metrics())  # nothing ran on the data plane in between
    for t in stats["tiers"]:
        if t["present"]:
            assert m[("kvrack_tier_capacity_bytes", (("tier", t["tier"]),))] == t["capacity_bytes"]
            assert m[("kvrack_tier_used_bytes", (("tier", t["tier"]),))] == t["used_bytes"]
            assert m[("kvrack_hits_total", (("tier", t["tier"]),))] == t["hits"]
            for reason, n in t["evictions"].items():
                assert m[("kvrack_evictions_total", (("reason", reason), ("tier", t["tier"])))] == n
    for name, ns in stats["namespaces"].items():
        assert m[("kvrack_blocks", (("namespace", name), ("tier", "dram")))] == ns["dram_blocks"]
        assert m[("kvrack_namespace_used_bytes", (("namespace", name), ("tier", "dram")))] == ns["dram_bytes"]
    assert m[("kvrack_namespace_quota_bytes", (("namespace", "a"), ("tier", "dram")))] == 2 << 20
    assert m[("kvrack_lookups_total", (("result", "hit"),))] == stats["lookups"]["hits"] == 6
    assert m[("kvrack_lookups_total", (("result", "miss"),))] == stats["lookups"]["misses"] == 1
    for op, r in stats["requests"].items():
        assert m[("kvrack_request_duration_seconds_count", (("op", op),))] == r["count"]
        assert m[("kvrack_request_duration_seconds_sum", (("op", op),))] == pytest.approx(r["seconds_sum"])
    for direction, by in stats["transfers"].items():
        for transport, n in by.items():
            assert m[("kvrack_transfer_bytes_total", (("direction", direction), ("transport", transport)))] == n
    assert m[("kvrack_leases", (("kind", "pins"),))] == stats["leases"]["pins"] == 2
    assert m[("kvrack_sessions", ())] == stats["sessions"] == 1


def test_namespace_labels_are_capped(tmp_path):
    conf = tmp_path / "kvrack.toml"
    conf.write_text("".join(f'[[namespaces]]\nname = "t{i}"\n' for i in range(6)))
    with DaemonProcess({**SMALL, "admin.metrics_max_namespaces": "2"}, config_path=str(conf)) as d:
        for i in range(6):
            put_blocks(d.socket_path, i + 1, size=4096, namespace=f"t{i}")
        m = metric_values(d.admin().metrics())
        names = {dict(labels)["namespace"] for (name, labels) in m if name == "kvrack_blocks"}
        assert names == {"t5", "t4", "other"}
        assert m[("kvrack_blocks", (("namespace", "other"), ("tier", "dram")))] == 1 + 2 + 3 + 4


def test_errors_are_counted_by_code(daemon):
    raw = RawConn(daemon.socket_path)
    try:
        raw.hello()
        raw.send({"op": "acquire", "id": 2, "keys": [b"short"]})
        raw.recv()
    finally:
        raw.close()
    m = metric_values(daemon.admin().metrics())
    assert m[("kvrack_errors_total", (("code", "INVALID_KEY"),))] == 1
    assert daemon.admin().stats()["errors"] == {"INVALID_KEY": 1}


# --------------------------------------------------------------------------------------------- the schema

def test_the_committed_openapi_schema_is_current(daemon):
    served = daemon.admin().request("GET", "/openapi.json")
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, "docs/openapi.json is stale: run `make openapi`"


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    """Fuzz every operation (POST /v1/drain aside: it stops the daemon) through the served schema."""
    port = free_port()
    with DaemonProcess({**SMALL, "admin.tcp_port": str(port)}) as d:
        put_blocks(d.socket_path, 4)
        with Client.connect(d.socket_path) as c:  # the schema's example key, so block operations find one
            c.put([bytes(32)], [b"x" * 100])
        res = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "st"), "run", f"http://127.0.0.1:{port}/openapi.json",
             "-H", f"Authorization: Bearer {d.admin().token}", "--exclude-operation-id", "drain_v1_drain_post",
             "--max-examples", "30", "--seed", "7", "--no-color", "--request-timeout", "10", "--max-time", "75"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
        assert "Traceback" not in d.log() and " ERROR " not in d.log(), d.log()[-4000:]
