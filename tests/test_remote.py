"""Remote clients against a real daemon: TCP control with tokens, TLS, NIXL and the TCP byte stream."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from kvrack import nixl_agent
from kvrack import protocol as P
from kvrack.bench.spawn import DaemonProcess, free_port
from kvrack.clients import Client, KvrackError
from kvrack.clients.remote import client_tls_context, parse_address
from tests.conftest import recv_frame as recv
from tests.conftest import send_frame as send
from tests.remote_child import BLOCK, KEYS

TOKEN_A = "token-for-namespace-a-0123456789"
TOKEN_B = "token-for-namespace-b-9876543210"
NIXL_MISSING = nixl_agent.available()
needs_nixl = pytest.mark.skipif(NIXL_MISSING is not None, reason=f"NIXL cannot be used here: {NIXL_MISSING}")


def test_nixl_is_usable_wherever_its_extra_is_installed():
    """`make test` installs the nixl extra: a broken wheel must fail here, not turn every NIXL test into a skip."""
    import importlib.util
    if importlib.util.find_spec("nixl") is None and importlib.util.find_spec("nixl_cu12") is None:
        pytest.skip("the nixl extra is not installed (pip install 'kvrack[nixl]')")
    assert NIXL_MISSING is None, f"nixl is installed but cannot be used: {NIXL_MISSING}"


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "kvrack.toml"
    path.write_text(textwrap.dedent(f"""
        {extra}
        [[namespaces]]
        name = "a"
        token = "{TOKEN_A}"
        [[namespaces]]
        name = "b"
        token = "{TOKEN_B}"
        [[namespaces]]
        name = "local-only"
    """))
    return str(path)


def start_daemon(tmp_path, host: str = "127.0.0.1", extra: str = "", prefix: tuple[str, ...] = (),
                 **settings: object) -> tuple[DaemonProcess, str]:
    port = free_port()
    d = DaemonProcess({"dram.capacity_bytes": "64MiB", "dram.segment_bytes": "4MiB", "nvme.enabled": "false",
                       "tcp.enabled": "true", "tcp.host": host, "tcp.port": port, **settings},
                      config_path=write_config(tmp_path, extra), command_prefix=prefix)
    return d, f"tcp://{host}:{port}"


@pytest.fixture
def remote(tmp_path):
    d, address = start_daemon(tmp_path)
    try:
        yield d, address
    finally:
        d.stop()


def blocks(n: int, size: int = BLOCK, seed: int = 0) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)], [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def round_trip(address: str, transport: str, n: int = 12, size: int = BLOCK) -> None:
    keys, data = blocks(n, size, seed=hash(transport) % 1000)
    with Client.connect(address, namespace="a", token=TOKEN_A, transport=transport) as c:
        assert c.transport == transport
        assert c.stats()["client"]["transport"] == transport
        assert c.put(keys, data).stored == n
        outs = [np.zeros(size, np.uint8) for _ in keys]
        assert c.get_into(keys, outs) == [True] * n
        for out, want in zip(outs, data):
            assert np.array_equal(out, want)
        k = min(3, n)
        with c.get(keys[:k] + [b"\x00" * 32]) as lease:
            assert [bytes(v) for v in lease.views[:k]] == [d.tobytes() for d in data[:k]]
            assert lease.views[k] is None
        assert c.lookup(keys).prefix == n
    # a second client reads what the first wrote (nothing cached client-side)
    with Client.connect(address, namespace="a", token=TOKEN_A, transport=transport) as c2:
        outs = [np.zeros(size, np.uint8) for _ in keys]
        assert c2.get_into(keys, outs) == [True] * n
        assert all(np.array_equal(o, w) for o, w in zip(outs, data))


def test_tcp_byte_stream_round_trip(remote):
    round_trip(remote[1], "tcp")


def test_tcp_byte_stream_small_and_odd_sizes(remote):
    round_trip(remote[1], "tcp", n=200, size=4099)


@needs_nixl
def test_nixl_round_trip(remote):
    round_trip(remote[1], "nixl")


@needs_nixl
def test_nixl_with_registered_buffers(remote):
    keys, data = blocks(8)
    with Client.connect(remote[1], namespace="a", token=TOKEN_A, transport="nixl") as c:
        pool = np.zeros((8, BLOCK), np.uint8)
        c.register([pool])
        c.put(keys, data)
        assert c.get_into(keys, list(pool)) == [True] * 8
        assert all(np.array_equal(pool[i], data[i]) for i in range(8))


def test_auto_transport_prefers_nixl_when_it_loads(remote):
    with Client.connect(remote[1], namespace="a", token=TOKEN_A) as c:
        assert c.transport == ("tcp" if NIXL_MISSING else "nixl")


def test_local_clients_may_use_the_byte_stream_too(remote):
    d, _ = remote
    keys, data = blocks(4)
    with Client.connect(d.socket_path, namespace="local-only", transport="tcp") as c:
        assert c.transport == "tcp"
        c.put(keys, data)
    with Client.connect(d.socket_path, namespace="local-only") as c:
        assert c.transport == "shm"
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        assert c.get_into(keys, outs) == [True] * 4
        assert all(np.array_equal(o, w) for o, w in zip(outs, data))


@pytest.mark.parametrize("namespace,token", [("a", "wrong-token-000000000000000000"), ("a", ""), ("a", TOKEN_B),
                                             ("local-only", TOKEN_A), ("nope", TOKEN_A)])
def test_wrong_token_or_namespace_is_refused(remote, namespace, token):
    with pytest.raises(KvrackError) as err:
        Client.connect(remote[1], namespace=namespace, token=token)
    assert err.value.code == P.ErrorCode.UNAUTHENTICATED
    assert token not in str(err.value) or not token
    log = remote[0].log()
    assert TOKEN_A not in log and TOKEN_B not in log  # never logged


def raw_tcp(address: str) -> socket.socket:
    where = parse_address(address, "")
    s = socket.create_connection((where.host, where.port), timeout=10)
    return s


def test_requests_before_hello_touch_nothing(remote):
    d, address = remote
    keys, data = blocks(2)
    with Client.connect(address, namespace="a", token=TOKEN_A, transport="tcp") as c:
        c.put(keys, data)
    s = raw_tcp(address)
    for op in ({"op": "delete", "id": 1, "keys": keys}, {"op": "read", "id": 2, "keys": keys},
               {"op": "map", "id": 3, "segments": [1]}):
        send(s, op)
        assert recv(s)["code"] == P.ErrorCode.HELLO_REQUIRED
    # a failed hello closes the connection
    send(s, {"op": "hello", "id": 4, "version": P.PROTOCOL_VERSION, "namespace": "a", "token": "x" * 20})
    assert recv(s)["code"] == P.ErrorCode.UNAUTHENTICATED
    assert recv(s) is None
    s.close()
    with Client.connect(address, namespace="a", token=TOKEN_A, transport="tcp") as c:
        assert c.lookup(keys).prefix == 2


def test_token_for_a_cannot_reach_b(remote):
    d, address = remote
    keys, data = blocks(3)
    with Client.connect(address, namespace="b", token=TOKEN_B, transport="tcp") as cb:
        cb.put(keys, data)
        b_segments = [s for s in range(1, 64)]
    with Client.connect(address, namespace="a", token=TOKEN_A, transport="tcp") as ca:
        assert ca.lookup(keys).prefix == 0
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        assert ca.get_into(keys, outs) == [False] * 3
        assert ca.delete(keys) == 0
    with Client.connect(address, namespace="b", token=TOKEN_B, transport="tcp") as cb:
        assert cb.lookup(keys).prefix == 3  # untouched
    if NIXL_MISSING is None:  # a's session cannot get b's segments registered for it either
        s = raw_tcp(address)
        send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION, "namespace": "a", "token": TOKEN_A})
        hello = recv(s)
        assert hello["code"] == 0
        dram = int(P.TierId.DRAM) << 40
        send(s, {"op": "map", "id": 2, "segments": [dram + i for i in b_segments[:16]]})
        assert recv(s)["code"] == P.ErrorCode.UNKNOWN_SEGMENT
        s.close()


def test_malformed_write_closes_only_that_connection(remote):
    d, address = remote
    s = raw_tcp(address)
    send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION, "namespace": "a", "token": TOKEN_A})
    assert recv(s)["code"] == 0
    send(s, {"op": "write", "id": 2, "keys": [b"k" * 32], "sizes": [1, 2]})
    assert recv(s)["code"] == P.ErrorCode.BAD_REQUEST
    assert recv(s) is None
    # bytes for keys this session never reserved are read and dropped, and said so
    s = raw_tcp(address)
    send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION, "namespace": "a", "token": TOKEN_A})
    recv(s)
    send(s, {"op": "write", "id": 2, "keys": [b"k" * 32], "sizes": [1000]})
    s.sendall(bytes(1000))
    assert recv(s)["codes"] == [P.ErrorCode.NOT_RESERVED]
    send(s, {"op": "lookup", "id": 3, "keys": [b"k" * 32]})
    assert recv(s)["prefix"] == 0
    s.close()
    round_trip(address, "tcp", n=2)


def _leftovers(address: str) -> tuple[int, int]:
    """(pinned blocks, entries that are not committed blocks) as namespace a sees them."""
    with Client.connect(address, namespace="a", token=TOKEN_A, transport="tcp") as c:
        stats = c.stats()
    ns = stats["namespaces"]["a"]
    return stats["tiers"][0]["pinned_blocks"], ns["entries"] - ns["blocks"]


@pytest.mark.parametrize("mode", ["write", "pin", pytest.param("nixl-pin", marks=needs_nixl),
                                  pytest.param("nixl-write", marks=needs_nixl)])
def test_killed_remote_client_leaves_no_pins_or_reservations(remote, mode):
    d, address = remote
    with Client.connect(address, namespace="a", token=TOKEN_A, transport="tcp") as c:
        c.put(KEYS, [np.full(BLOCK, i, np.uint8) for i in range(len(KEYS))])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-m", "tests.remote_child", address, TOKEN_A, mode], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", child.stderr.read()
        pinned, pending = _leftovers(address)
        assert pinned == len(KEYS) if mode.endswith("pin") else pending == 4
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while _leftovers(address) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers(address) == (0, 0)
    round_trip(address, "tcp", n=2)  # and the daemon goes on serving


# --------------------------------------------------------------------- TLS
def make_cert(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_round_trip_and_plain_tcp_refused(tmp_path):
    cert, key = make_cert(tmp_path)
    d, address = start_daemon(tmp_path, **{"tcp.tls_cert": cert, "tcp.tls_key": key})
    try:
        tls_address = address.replace("tcp://", "tls://")
        keys, data = blocks(6, 300_000)
        ctx = client_tls_context(cert)
        for transport in ("tcp", "auto"):
            with Client.connect(tls_address, namespace="a", token=TOKEN_A, tls=ctx, transport=transport) as c:
                c.put(keys, data)
                outs = [np.zeros(300_000, np.uint8) for _ in keys]
                assert c.get_into(keys, outs) == [True] * 6
                assert all(np.array_equal(o, w) for o, w in zip(outs, data))
        with pytest.raises(ConnectionError, match="TLS"):  # a certificate the client does not trust
            Client.connect(tls_address, namespace="a", token=TOKEN_A, tls=True)
        with pytest.raises((ConnectionError, OSError, TimeoutError)):  # plain TCP to a TLS port gets nowhere
            Client.connect(address, namespace="a", token=TOKEN_A, timeout=3)
    finally:
        d.stop()


# -------------------------------------------------------- network namespaces
def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"kvr-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create a network namespace here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


NETNS_MISSING = _netns_available()


@pytest.fixture
def netns_pair():
    tag = uuid.uuid4().hex[:6]
    server_ns, client_ns = f"kvr-d-{tag}", f"kvr-c-{tag}"
    cmds = [["ip", "netns", "add", server_ns], ["ip", "netns", "add", client_ns],
            ["ip", "link", "add", f"kvd{tag}", "type", "veth", "peer", "name", f"kvc{tag}"],
            ["ip", "link", "set", f"kvd{tag}", "netns", server_ns], ["ip", "link", "set", f"kvc{tag}", "netns", client_ns],
            ["ip", "-n", server_ns, "addr", "add", "10.231.77.1/24", "dev", f"kvd{tag}"],
            ["ip", "-n", client_ns, "addr", "add", "10.231.77.2/24", "dev", f"kvc{tag}"],
            ["ip", "-n", server_ns, "link", "set", f"kvd{tag}", "up"], ["ip", "-n", client_ns, "link", "set", f"kvc{tag}", "up"],
            ["ip", "-n", server_ns, "link", "set", "lo", "up"], ["ip", "-n", client_ns, "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield server_ns, client_ns
    finally:
        subprocess.run(["ip", "netns", "del", server_ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", client_ns], capture_output=True)


CLIENT_SCRIPT = """
import sys, numpy as np
from kvrack.clients import Client
address, token, transport = sys.argv[1:4]
rng = np.random.default_rng(7)
keys = [rng.bytes(32) for _ in range(16)]
data = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in keys]
with Client.connect(address, namespace="a", token=token, transport=transport) as c:
    c.put(keys, data)
with Client.connect(address, namespace="a", token=token, transport=transport) as c:
    outs = [np.zeros(1 << 20, np.uint8) for _ in keys]
    hits = c.get_into(keys, outs)
    ok = all(hits) and all(np.array_equal(o, w) for o, w in zip(outs, data))
    print(c.transport, "ok" if ok else "MISMATCH")
"""


@pytest.mark.skipif(NETNS_MISSING is not None, reason=str(NETNS_MISSING))
def test_across_network_namespaces(tmp_path, netns_pair):
    server_ns, client_ns = netns_pair
    d, address = start_daemon(tmp_path, host="10.231.77.1", prefix=("ip", "netns", "exec", server_ns))
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        transports = ["tcp"] + ([] if NIXL_MISSING else ["nixl"])
        for transport in transports:
            out = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", CLIENT_SCRIPT, address,
                                  TOKEN_A, transport], cwd=root, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr[-3000:]
            assert out.stdout.split() == [transport, "ok"]
        # the daemon's namespace is not reachable from the host's loopback
        with pytest.raises(ConnectionError):
            Client.connect(address.replace("10.231.77.1", "127.0.0.1"), namespace="a", token=TOKEN_A, timeout=2)
    finally:
        d.stop()


# ------------------------------------------------------------ asyncio client
async def _async_round_trip(address: str, transport: str, tls=None) -> str:
    from kvrack.clients import AsyncClient

    keys, data = blocks(10, 300_001, seed=11)
    async with await AsyncClient.connect(address, "a", token=TOKEN_A, transport=transport, tls=tls) as c:
        await c.put(keys, data)
        outs = [np.zeros(300_001, np.uint8) for _ in keys]
        assert await c.get_into(keys, outs) == [True] * 10
        assert all(np.array_equal(o, w) for o, w in zip(outs, data))
        async with await c.get(keys[:2]) as lease:
            assert [bytes(v) for v in lease.views] == [d.tobytes() for d in data[:2]]
        assert (await c.stats())["client"]["transport"] == c.transport
        assert await c.delete(keys) == 10
        return c.transport


@pytest.mark.parametrize("transport", ["tcp", pytest.param("nixl", marks=needs_nixl)])
def test_async_client_remote_round_trip(remote, transport):
    import asyncio

    assert asyncio.run(_async_round_trip(remote[1], transport)) == transport


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_async_client_over_tls(tmp_path):
    import asyncio

    cert, key = make_cert(tmp_path)
    d, address = start_daemon(tmp_path, **{"tcp.tls_cert": cert, "tcp.tls_key": key, "tcp.nixl": "off"})
    try:
        tls_address = address.replace("tcp://", "tls://")
        assert asyncio.run(_async_round_trip(tls_address, "auto", client_tls_context(cert))) == "tcp"
    finally:
        d.stop()


def test_a_connection_that_never_authenticates_is_closed(tmp_path):
    # a deadline a loaded machine's client meets with room to spare (its hello takes milliseconds)
    d, address = start_daemon(tmp_path, **{"tcp.hello_timeout_s": "2.0", "tcp.nixl": "off"})
    try:
        s = raw_tcp(address)
        reply = recv(s)  # nothing sent: the daemon says why, then hangs up
        assert reply["code"] == P.ErrorCode.UNAUTHENTICATED and "no hello" in reply["message"]
        assert recv(s) is None
        s.close()
        with Client.connect(address, namespace="a", token=TOKEN_A) as c:  # an authenticated one stays
            time.sleep(2.5)  # past the hello deadline: time has to pass here, nothing to wait for instead
            assert c.lookup([b"\x00" * 32]).prefix == 0
    finally:
        d.stop()


def test_status_over_tcp(remote):
    d, address = remote
    env = {**os.environ, "KVRACK_TOKEN": TOKEN_A}
    res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", address, "--namespace",
                          "a"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dram" in res.stdout
    res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "status", "--socket", address, "--namespace",
                          "a"], capture_output=True, text=True, timeout=60, env={**env, "KVRACK_TOKEN": "x" * 20})
    assert res.returncode == 1 and "UNAUTHENTICATED" in res.stdout


def test_byte_stream_survives_a_slow_writer_and_a_slow_reader(remote):
    """Payload bytes trickling in (many partial receives into the slots) and a reader that drains slowly
    (the daemon's send queue filling up) still land bit-identical."""
    d, address = remote
    rng = np.random.default_rng(5)
    keys = [rng.bytes(32) for _ in range(3)]
    data = [rng.bytes(n) for n in (100_001, 7, 3 << 20)]
    s = raw_tcp(address)
    send(s, {"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION, "namespace": "a", "token": TOKEN_A})
    assert recv(s)["code"] == 0
    send(s, {"op": "reserve", "id": 2, "keys": keys, "sizes": [len(x) for x in data]})
    assert recv(s)["codes"] == [0, 0, 0]
    send(s, {"op": "write", "id": 3, "keys": keys, "sizes": [len(x) for x in data]})
    payload = b"".join(data)
    for off in range(0, 300_000, 7_001):  # the first part in small pieces, slowly
        s.sendall(payload[off: min(off + 7_001, 300_000)])
        time.sleep(0.0005)
    s.sendall(payload[300_000:])
    assert recv(s)["codes"] == [0, 0, 0]
    send(s, {"op": "read", "id": 4, "keys": keys})
    reply = recv(s)
    assert reply["lengths"] == [len(x) for x in data]
    got = bytearray()
    while len(got) < len(payload):  # drain in small reads with pauses: the daemon's queue backs up
        got += s.recv(65536)
        if len(got) < 1 << 20:
            time.sleep(0.001)
    assert bytes(got) == payload
    send(s, {"op": "lookup", "id": 5, "keys": keys})  # and the connection is still in step
    assert recv(s)["prefix"] == 3
    s.close()
