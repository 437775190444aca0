"""Tenant isolation over every way a client reaches the daemon: the Unix socket with mapped segments, TCP with
the byte stream, NIXL one-sided transfers, and TLS. Tenant B, with its own namespace and token, cannot find,
read, pin, prefetch, delete or overwrite tenant A's blocks; B's keys for A's exact tokens are other keys; and
the segments mapped into B's process never hold A's bytes."""

from __future__ import annotations

import numpy as np
import pytest

from kvrack.clients import Client, KeyBuilder, Layout
from kvrack.clients.remote import client_tls_context
from tests.test_remote import NIXL_MISSING, TOKEN_A, TOKEN_B, make_cert, start_daemon

LAYOUT = Layout(layers=2, kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
BLOCK = LAYOUT.block_nbytes
CHANNELS = ["unix-shm", "tcp", "nixl", "tls"]


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    """A plain daemon (Unix socket and TCP) and a TLS one, each with namespaces a and b."""
    plain_dir, tls_dir = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("tls")
    plain, address = start_daemon(plain_dir)
    try:
        cert, key = make_cert(tls_dir)
        tls, tls_address = start_daemon(tls_dir, **{"tcp.tls_cert": cert, "tcp.tls_key": key})
    except BaseException:
        plain.stop()
        raise
    try:
        yield {"plain": (plain, address), "tls": (tls, tls_address.replace("tcp://", "tls://"), cert)}
    finally:
        plain.stop()
        tls.stop()


def connect(daemons, channel: str, namespace: str) -> Client:
    token = TOKEN_A if namespace == "a" else TOKEN_B
    plain, address = daemons["plain"]
    if channel == "unix-shm":
        return Client.connect(plain.socket_path, namespace=namespace, token=token, transport="shm")
    if channel == "tcp":
        return Client.connect(address, namespace=namespace, token=token, transport="tcp")
    if channel == "nixl":
        if NIXL_MISSING is not None:  # tests/test_remote.py fails when the extra is installed but broken
            pytest.skip(f"NIXL cannot be used here: {NIXL_MISSING}")
        return Client.connect(address, namespace=namespace, token=token, transport="nixl")
    _tls, tls_address, cert = daemons["tls"]
    return Client.connect(tls_address, namespace=namespace, token=token, tls=client_tls_context(cert),
                          transport="tcp")


def payloads(n: int, marker: bytes, seed: int) -> list[np.ndarray]:
    """Blocks that start and end with ``marker``, so that a scan can tell them anywhere."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        block = rng.integers(0, 256, BLOCK, dtype=np.uint8)
        block[: len(marker)] = np.frombuffer(marker, np.uint8)
        block[-len(marker):] = np.frombuffer(marker, np.uint8)
        out.append(block)
    return out


@pytest.mark.parametrize("channel", CHANNELS)
def test_another_tenant_cannot_find_read_pin_delete_or_overwrite_a_tenants_blocks(daemons, channel):
    tokens = list(range(1000 + CHANNELS.index(channel) * 1000, 1000 + CHANNELS.index(channel) * 1000 + 4 * 16))
    marker = f"tenant-a-{channel}-".encode().ljust(32, b".")
    want = payloads(4, marker, CHANNELS.index(channel))
    with connect(daemons, channel, "a") as a, connect(daemons, channel, "b") as b:
        assert a.namespace_salt != b.namespace_salt
        keys_a = KeyBuilder(a.namespace_salt, "model", LAYOUT).chain(tokens)
        assert a.put(keys_a, want, KeyBuilder.parents(keys_a)).stored == 4
        # B's keys for A's exact tokens are other keys: a prefix probe of the same prompt misses
        keys_b = KeyBuilder(b.namespace_salt, "model", LAYOUT).chain(tokens)
        assert not set(keys_a) & set(keys_b)
        assert b.lookup(keys_b).prefix == 0
        # A's own keys, guessed or learnt: nothing found, read, pinned, warmed or deleted
        found = b.lookup(keys_a)
        assert found.prefix == 0 and found.hits == 0
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys_a]
        assert list(b.get_into(keys_a, outs)) == [False] * 4
        assert all(not o.any() for o in outs)
        with b.get(keys_a) as lease:
            assert lease.hits == 0 and all(v is None for v in lease.views)
        assert b.prefetch(keys_a) == 0
        assert b.delete(keys_a) == 0
        # B storing under A's keys fills B's namespace only
        mine = payloads(4, b"tenant-b".ljust(32, b"."), 99)
        assert b.put(keys_a, mine).stored == 4
        got = [np.zeros(BLOCK, np.uint8) for _ in keys_a]
        assert list(a.get_into(keys_a, got)) == [True] * 4
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), "A's bytes are A's"
        assert list(b.get_into(keys_a, got)) == [True] * 4
        assert all(np.array_equal(g, m) for g, m in zip(got, mine))
        assert b.delete(keys_a) == 4
        assert a.lookup(keys_a).prefix == 4, "B's delete removed B's copies only"
        assert a.delete(keys_a) == 4


def test_segments_mapped_into_a_tenants_process_never_hold_another_tenants_bytes(daemons):
    marker = b"tenant-a-secret-payload-marker!!"
    want = payloads(16, marker, 7)
    with connect(daemons, "unix-shm", "a") as a, connect(daemons, "unix-shm", "b") as b:
        keys_a = KeyBuilder(a.namespace_salt, "model", LAYOUT).chain(list(range(16 * 16)))
        assert a.put(keys_a, want).stored == 16
        keys_b = KeyBuilder(b.namespace_salt, "model", LAYOUT).chain(list(range(50_000, 50_000 + 16 * 16)))
        assert b.put(keys_b, payloads(16, b"tenant-b".ljust(32, b"."), 8)).stored == 16
        with b.get(keys_b) as lease:  # B maps every segment its own blocks live in
            assert lease.hits == 16
            maps = b._core.segments.maps
            assert maps, "B read through mapped segments"
            for segment, mapping in maps.items():
                assert mapping.find(marker) == -1, f"segment {segment:#x} mapped into B holds A's bytes"
        assert a.delete(keys_a) == 16 and b.delete(keys_b) == 16
