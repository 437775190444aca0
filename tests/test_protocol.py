"""Wire contract: frames round-trip, bad requests map to clear codes."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvrack import protocol as P

KEYS = st.lists(st.binary(min_size=32, max_size=32), max_size=50)


@given(keys=KEYS, rid=st.integers(0, 2**63 - 1))
def test_requests_round_trip(keys, rid):
    for req in (P.Lookup(id=rid, keys=keys), P.Acquire(id=rid, keys=keys), P.Delete(id=rid, keys=keys),
                P.Reserve(id=rid, keys=keys, sizes=[1] * len(keys), parents=[None] * len(keys))):
        frame = P.encode_frame(req)
        (n,) = P.HEADER.unpack_from(frame)
        assert n == len(frame) - P.HEADER_BYTES
        assert P.request_decoder.decode(frame[P.HEADER_BYTES:]) == req


def test_replies_round_trip():
    reply = P.KeysReply(id=3, codes=[0, 301], descriptors=[P.Descriptor(3, 7, 4096, 100), None])
    body = P.encode_frame(reply)[P.HEADER_BYTES:]
    assert msgspec.msgpack.decode(body, type=P.KeysReply) == reply


def test_encode_frame_into_reuses_a_buffer():
    buf = bytearray()
    P.encode_frame_into(P.Stats(id=9), buf)
    assert bytes(buf) == P.encode_frame(P.Stats(id=9))


def _describe(obj):
    body = msgspec.msgpack.encode(obj)
    try:
        P.request_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return P.describe_decode_error(body, exc)
    raise AssertionError("decoded")


@pytest.mark.parametrize(
    "obj, code",
    [
        ({"op": "fly", "id": 4}, P.ErrorCode.UNKNOWN_OP),
        ({"op": "lookup", "id": 5, "keys": "nope"}, P.ErrorCode.BAD_REQUEST),
        ({"op": "lookup", "id": 6, "keys": [], "extra": 1}, P.ErrorCode.BAD_REQUEST),
        ({"op": "reserve", "id": 7, "keys": []}, P.ErrorCode.BAD_REQUEST),
        ([1, 2, 3], P.ErrorCode.BAD_FRAME),
        ({"id": 8}, P.ErrorCode.UNKNOWN_OP),
    ],
)
def test_bad_requests_get_clear_codes(obj, code):
    rid, got, message = _describe(obj)
    assert got == code and message
    if isinstance(obj, dict) and obj.get("op") == "lookup":
        assert rid == obj["id"], "the reply names the request it answers"


def test_garbage_bytes_are_a_bad_frame():
    with pytest.raises(msgspec.DecodeError) as info:
        P.request_decoder.decode(b"\xc1\xff")
    assert P.describe_decode_error(b"\xc1\xff", info.value)[1] == P.ErrorCode.BAD_FRAME


def test_error_codes_are_grouped_by_range():
    groups = {code.value // 100 for code in P.ErrorCode}
    assert groups == {0, 1, 2, 3, 4, 5}
    assert P.ErrorCode.NO_SPACE // 100 == 4 and P.ErrorCode.INVALID_KEY // 100 == 3
