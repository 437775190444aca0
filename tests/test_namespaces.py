"""Tenants: isolated keys, segments that only their owner can map, credentials checked at hello."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client, ErrorCode, KvrackError

from .conftest import RawConn

NOBODY = 65534


@pytest.fixture
def tenants(tmp_path):
    cfg = tmp_path / "kvrack.toml"
    cfg.write_text(textwrap.dedent(f"""
        [dram]
        capacity_bytes = "8MiB"
        segment_bytes = "1MiB"
        [[namespaces]]
        name = "a"
        [[namespaces]]
        name = "b"
        [[namespaces]]
        name = "locked"
        uids = [{NOBODY}]
    """))
    d = DaemonProcess(config_path=str(cfg))
    try:
        yield d
    finally:
        d.stop()


def test_a_tenant_sees_only_its_own_blocks(tenants):
    with Client.connect(tenants.socket_path, namespace="a") as a, Client.connect(tenants.socket_path, namespace="b") as b:
        assert a.namespace_salt != b.namespace_salt
        key = os.urandom(32)
        a.put([key], [b"secret" * 100])
        assert b.lookup([key]).prefix == 0
        assert b.get_into([key], [bytearray(600)]) == [False]
        assert b.delete([key]) == 0
        assert a.lookup([key]).prefix == 1
        b.put([key], [b"other" * 100])  # the same key is a different block in b
        out = bytearray(600)
        a.get_into([key], [out])
        assert bytes(out) == b"secret" * 100
        assert set(b.stats()["namespaces"]) == {"b"}


def test_segments_of_another_tenant_cannot_be_mapped(tenants):
    with Client.connect(tenants.socket_path, namespace="a") as a:
        a.put([os.urandom(32)], [bytes(4096)])
        a_segments = set(a._core.segments.maps)
    assert a_segments
    b = RawConn(tenants.socket_path)
    try:
        hello = b.hello("b")
        assert not {s[0] for s in hello["segments"]} & a_segments, "hello hands out only b's segments"
        b.send({"op": "map", "id": 2, "segments": sorted(a_segments)})
        reply = b.recv()
        assert reply["code"] == ErrorCode.UNKNOWN_SEGMENT and not b.fds
    finally:
        b.close()


def test_unknown_namespace(tenants):
    with pytest.raises(KvrackError) as info:
        Client.connect(tenants.socket_path, namespace="nope")
    assert info.value.code == ErrorCode.UNKNOWN_NAMESPACE


def test_namespace_restricted_to_uids(tenants):
    if os.getuid() == NOBODY:
        pytest.skip("runs as the allowed uid")
    with pytest.raises(KvrackError) as info:
        Client.connect(tenants.socket_path, namespace="locked")
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    if os.getuid() != 0:
        return  # cannot become another user to test the allowed side
    os.chmod(os.path.dirname(tenants.socket_path), 0o755)
    code = textwrap.dedent("""
        import os, sys
        from kvrack.clients import Client  # import first: the interpreter's files may be unreadable to nobody
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        with Client.connect(sys.argv[1], namespace="locked") as c:
            c.put([os.urandom(32)], [bytes(64)])
            print("ok", c.stats()["namespaces"]["locked"]["blocks"])
    """)
    res = subprocess.run([sys.executable, "-c", code, tenants.socket_path], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok 1"


def test_a_namespaces_connections_together_hold_at_most_its_lease_quota(tenants, tmp_path):
    """quota_leases bounds the reservations and pins of all a tenant's connections together (a tenant cannot get
    past it by opening more connections); other tenants are not affected; it is set at runtime and in the file."""
    admin = tenants.admin()
    assert admin.set_quota("a", leases=4)["quota"] == {"leases": 4}
    raws = [RawConn(tenants.socket_path) for _ in range(2)]
    try:
        for r in raws:
            assert r.hello("a")["code"] == 0
        keys = [bytes([i]) * 32 for i in range(1, 7)]
        raws[0].send({"op": "reserve", "id": 2, "keys": keys[:3], "sizes": [100] * 3})
        assert raws[0].recv()["codes"] == [0] * 3
        raws[1].send({"op": "reserve", "id": 2, "keys": keys[3:], "sizes": [100] * 3})
        reply = raws[1].recv()
        assert reply["codes"] == [0, ErrorCode.QUOTA_EXCEEDED, ErrorCode.QUOTA_EXCEEDED]
        assert "quota_leases = 4" in reply["message"]
        assert admin.quota("a")["leases"] == 4
        with Client.connect(tenants.socket_path, namespace="b") as b:  # another tenant: untouched
            assert b.put(keys, [b"b" * 100] * 6).stored == 6
        raws[0].send({"op": "commit", "id": 3, "keys": keys[:3]})  # its reservations end: room again
        assert raws[0].recv()["codes"] == [0] * 3
        with Client.connect(tenants.socket_path, namespace="a") as a:
            assert a.put(keys[4:], [b"a" * 100] * 2).stored == 2
            with a.get(keys[:3]) as lease:  # pins count too: 1 reservation + 3 pins
                assert lease.hits == 3
                raws[1].send({"op": "acquire", "id": 3, "keys": keys[4:6]})
                assert raws[1].recv()["codes"] == [ErrorCode.QUOTA_EXCEEDED] * 2
        admin.set_quota("a")  # lifted
        raws[1].send({"op": "acquire", "id": 4, "keys": keys[4:6]})
        assert raws[1].recv()["codes"] == [0, 0]
    finally:
        for r in raws:
            r.sock.close()
    cfg = tmp_path / "leases.toml"
    cfg.write_text('[[namespaces]]\nname = "a"\nquota_leases = 2\n')
    with DaemonProcess(config_path=str(cfg)) as d:
        assert d.admin().quota("a")["quota"] == {"leases": 2}
