"""Bad input gets a clear error, closes at most its own connection, and never the daemon."""

from __future__ import annotations

import os
import struct

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrack import protocol as P
from kvrack.clients import Client
from kvrack.protocol import ErrorCode

from .conftest import RawConn


def test_garbage_frame_closes_only_that_connection(daemon, raw):
    with Client.connect(daemon.socket_path) as good:
        key = [os.urandom(32)]
        good.put(key, [bytes(100)])
        bad = raw()
        bad.send_raw(struct.pack("<I", 4) + b"\xc1\xc1\xc1\xc1")
        reply = bad.recv()
        assert reply["code"] == ErrorCode.BAD_FRAME
        assert bad.recv() is None, "the daemon closed the bad connection"
        assert good.lookup(key).prefix == 1


def test_oversized_frame_is_refused_before_it_is_read(daemon, raw):
    bad = raw()
    bad.send_raw(struct.pack("<I", 2**31))
    reply = bad.recv()
    assert reply["code"] == ErrorCode.FRAME_TOO_LARGE and "max_frame_bytes" in reply["message"]
    assert bad.recv() is None


def test_unknown_op_wrong_types_and_missing_hello_keep_the_connection(raw):
    c = raw()
    c.send({"op": "lookup", "id": 1, "keys": []})
    assert c.recv()["code"] == ErrorCode.HELLO_REQUIRED
    assert c.hello()["code"] == 0
    c.send({"op": "teleport", "id": 2})
    r = c.recv()
    assert r["code"] == ErrorCode.UNKNOWN_OP and r["id"] == 2 and "known ops" in r["message"]
    c.send({"op": "lookup", "id": 3, "keys": 7})
    r = c.recv()
    assert r["code"] == ErrorCode.BAD_REQUEST and "keys" in r["message"]
    c.send({"op": "lookup", "id": 4, "keys": [], "bogus": True})
    assert c.recv()["code"] == ErrorCode.BAD_REQUEST
    c.send({"op": "hello", "id": 5, "version": P.PROTOCOL_VERSION})
    assert c.recv()["code"] == ErrorCode.BAD_REQUEST, "a second hello is refused"
    c.send({"op": "stats", "id": 6})
    assert c.recv()["code"] == 0, "the connection still works"


def test_wrong_key_lengths_and_sizes(raw):
    c = raw()
    c.hello()
    c.send({"op": "lookup", "id": 2, "keys": [b"x" * 31]})
    r = c.recv()
    assert r["code"] == ErrorCode.INVALID_KEY and "32 bytes" in r["message"]
    c.send({"op": "reserve", "id": 3, "keys": [b"x" * 33, os.urandom(32), os.urandom(32)],
            "sizes": [10, -5, 2**40]})
    r = c.recv()
    assert r["codes"] == [ErrorCode.INVALID_KEY, ErrorCode.INVALID_SIZE, ErrorCode.VALUE_TOO_LARGE]
    c.send({"op": "reserve", "id": 4, "keys": [os.urandom(32)], "sizes": [1, 2]})
    assert c.recv()["codes"] == [ErrorCode.BAD_REQUEST]
    c.send({"op": "acquire", "id": 5, "keys": [b""]})
    assert c.recv()["codes"] == [ErrorCode.INVALID_KEY]
    c.send({"op": "commit", "id": 6, "keys": [os.urandom(32)]})
    assert c.recv()["codes"] == [ErrorCode.NOT_RESERVED]
    c.send({"op": "release", "id": 7, "keys": [os.urandom(32)]})
    assert c.recv()["codes"] == [ErrorCode.NOT_PINNED]


def test_protocol_version_and_batch_limit(raw, daemon):
    c = raw()
    c.send({"op": "hello", "id": 1, "version": 999})
    r = c.recv()
    assert r["code"] == ErrorCode.VERSION_MISMATCH and "999" in r["message"]
    c.hello()
    c.send({"op": "lookup", "id": 2, "keys": [os.urandom(32)] * 262145})
    assert c.recv()["code"] == ErrorCode.BATCH_TOO_LARGE


def test_frames_split_across_writes_and_pipelined_requests(raw):
    c = raw()
    c.hello()
    frames = b"".join(P.encode_frame(P.Stats(id=i)) for i in range(10, 20))
    for i in range(0, len(frames), 7):  # dribble bytes
        c.send_raw(frames[i : i + 7])
    assert [c.recv()["id"] for _ in range(10)] == list(range(10, 20))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["op", "id", "keys", "sizes", "parents", "segments", "version", "namespace"]),
                    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=10), st.binary(max_size=40),
                              st.lists(st.binary(max_size=40), max_size=5), st.sampled_from(P.OPS)),
                    max_size=6).map(msgspec.msgpack.encode),
))
def test_fuzzed_frames_never_hurt_the_daemon(daemon, payload):
    c = RawConn(daemon.socket_path)
    try:
        c.hello()
        c.send_raw(struct.pack("<I", len(payload)) + payload)
        reply = c.recv()
        assert reply is None or "code" in reply
        assert reply is None or reply["code"] != ErrorCode.INTERNAL, reply  # a handler bug, not bad input
    finally:
        c.close()
    with Client.connect(daemon.socket_path) as probe:
        assert probe.stats()["server"]["sessions"] >= 1


def test_map_requests_are_bounded(raw):
    c = raw()
    c.hello()
    c.send({"op": "map", "id": 2, "segments": list(range(P.MAX_FDS_PER_FRAME + 1))})
    r = c.recv()
    assert r["code"] == ErrorCode.BAD_REQUEST and str(P.MAX_FDS_PER_FRAME) in r["message"]
    c.send({"op": "map", "id": 3, "segments": [12345]})
    assert c.recv()["code"] == ErrorCode.UNKNOWN_SEGMENT and not c.fds
