"""The wire contract between kvrack clients and the daemon.

Every frame is a 4-byte little-endian payload length followed by one msgpack
object encoded with msgspec. Requests are a tagged union on the ``op`` field;
every request carries a client-chosen ``id`` that its reply echoes. Every op
is batched: one request names many keys, and keys that can fail on their own
get a per-key status code in ``codes``.

Clients and the daemon both import this module; it imports nothing of either.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
KEY_BYTES = 32
HEADER = struct.Struct("<I")
HEADER_BYTES = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# fds that travel beside one frame; the kernel's limit per SCM_RIGHTS message is 253
MAX_FDS_PER_FRAME = 200


class ErrorCode(enum.IntEnum):
    """Status codes, grouped by range so a code says where it came from.

    0 ok · 1xx frame/protocol · 2xx session/namespace · 3xx key/object ·
    4xx space/tier · 5xx daemon-internal.
    """

    OK = 0
    # 1xx: the frame or request itself is wrong
    BAD_FRAME = 100
    UNKNOWN_OP = 101
    BAD_REQUEST = 102
    FRAME_TOO_LARGE = 103
    VERSION_MISMATCH = 104
    HELLO_REQUIRED = 105
    BATCH_TOO_LARGE = 106
    # 2xx: who is asking
    UNKNOWN_NAMESPACE = 200
    PERMISSION_DENIED = 201
    UNKNOWN_SEGMENT = 202
    UNAUTHENTICATED = 203
    # 3xx: one key or block
    INVALID_KEY = 300
    NOT_FOUND = 301
    ALREADY_EXISTS = 302
    IN_PROGRESS = 303
    NOT_RESERVED = 304
    VALUE_TOO_LARGE = 305
    INVALID_SIZE = 306
    NOT_PINNED = 307
    INVALID_PARENT = 308
    SIZE_MISMATCH = 309  # the key is stored (or being written) with another size
    # 4xx: space and tiers
    NO_SPACE = 400
    TIER_UNAVAILABLE = 401
    QUOTA_EXCEEDED = 402  # the namespace's quota is full of its own pinned or unevictable blocks
    # 5xx: the daemon
    INTERNAL = 500
    SHUTTING_DOWN = 501
    BUSY = 502  # too many connections (server.max_connections, server.max_connections_per_uid)


class TierId(enum.IntEnum):
    """Tier codes as they appear on the wire (0 means "not cached")."""

    NONE = 0
    HBM = 1
    CXL = 2
    DRAM = 3
    NVME = 4


class Descriptor(msgspec.Struct, array_like=True, frozen=True):
    """Where a block's bytes are: all a client needs to read or write it."""

    tier: int
    segment: int
    offset: int
    length: int


class SegmentInfo(msgspec.Struct, array_like=True, frozen=True):
    """A mappable region; the fd arrives beside the frame over SCM_RIGHTS."""

    segment: int
    tier: int
    size: int


# ----------------------------------------------------------------- requests

_REQ = {"tag_field": "op", "forbid_unknown_fields": True}


class HbmSegment(msgspec.Struct, array_like=True, frozen=True):
    """A segment of GPU memory a same-host client opens by its CUDA IPC handle."""

    segment: int
    size: int
    device: int
    ipc_handle: bytes


class RemoteSegment(msgspec.Struct, array_like=True, frozen=True):
    """A segment a remote client reaches by NIXL: its address in the daemon's registered memory."""

    segment: int
    tier: int
    addr: int
    size: int


# data transports, as hello offers them and a client's stats name the one in use
TRANSPORT_SHM = "shm"  # map the segment (Unix socket clients)
TRANSPORT_NIXL = "nixl"  # one-sided READ/WRITE into the daemon's registered segments
TRANSPORT_TCP = "tcp"  # block bytes streamed on the control connection (read / write ops)


class Hello(msgspec.Struct, tag="hello", **_REQ):
    id: int
    version: int
    namespace: str = "default"
    client_name: str = ""
    # the namespace's token: required on TCP connections, ignored on the Unix socket
    token: str = ""


class Lookup(msgspec.Struct, tag="lookup", **_REQ):
    id: int
    keys: list[bytes]


class Reserve(msgspec.Struct, tag="reserve", **_REQ):
    id: int
    keys: list[bytes]
    sizes: list[int]
    # each key's previous block in its chain, or None for a chain's first block
    parents: list[bytes | None] | None = None


class Commit(msgspec.Struct, tag="commit", **_REQ):
    id: int
    keys: list[bytes]


class Abort(msgspec.Struct, tag="abort", **_REQ):
    id: int
    keys: list[bytes]


class Acquire(msgspec.Struct, tag="acquire", **_REQ):
    id: int
    keys: list[bytes]


class Release(msgspec.Struct, tag="release", **_REQ):
    id: int
    keys: list[bytes]


class Delete(msgspec.Struct, tag="delete", **_REQ):
    id: int
    keys: list[bytes]


class MapSegments(msgspec.Struct, tag="map", **_REQ):
    id: int
    segments: list[int]


class Stats(msgspec.Struct, tag="stats", **_REQ):
    id: int


class Prefetch(msgspec.Struct, tag="prefetch", **_REQ):
    """Bring blocks whose only copy is on a lower tier up into DRAM before they are needed.

    Pins nothing the caller must release. ``wait``: reply once they are in DRAM (else at once)."""

    id: int
    keys: list[bytes]
    wait: bool = False


class Touch(msgspec.Struct, tag="touch", **_REQ):
    """Blocks this client read from the CXL region by itself (no request on the read path), reported in
    batches so the region's eviction order counts them; clients post it and do not wait for the reply."""

    id: int
    keys: list[bytes]


class Read(msgspec.Struct, tag="read", **_REQ):
    """TCP data path: the reply is followed by the bytes of every hit, in key order."""

    id: int
    keys: list[bytes]


class Write(msgspec.Struct, tag="write", **_REQ):
    """TCP data path: followed by ``sum(sizes)`` bytes, each key's block in order, into slots
    this session reserved; keys whose bytes arrived whole are committed."""

    id: int
    keys: list[bytes]
    sizes: list[int]


Request = (Hello | Lookup | Reserve | Commit | Abort | Acquire | Release | Delete | MapSegments | Stats | Read | Write
           | Prefetch | Touch)
OPS = ("hello", "lookup", "reserve", "commit", "abort", "acquire", "release", "delete", "map", "stats", "read",
       "write", "prefetch", "touch")


class Envelope(msgspec.Struct):
    """The two fields read from a request that failed to decode, to say why."""

    op: Any = None
    id: Any = 0


# ------------------------------------------------------------------ replies


class Reply(msgspec.Struct):
    """Every reply: request id, overall code and message, then op fields."""

    id: int
    code: int = 0
    message: str = ""


class ErrorReply(Reply):
    pass


class HelloReply(Reply):
    version: int = PROTOCOL_VERSION
    namespace: str = ""
    salt: bytes = b""
    session: int = 0
    segments: list[SegmentInfo] = []
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_batch_keys: int = 0
    reserve_lease_s: float = 0.0
    pin_lease_s: float = 0.0
    # data transports this session may use, best first
    transports: list[str] = []
    # NIXL (TCP sessions): the daemon agent's metadata limited to this namespace's segments
    nixl_metadata: bytes = b""
    remote_segments: list[RemoteSegment] = []
    # the namespace's HBM arena (Unix socket sessions, when the daemon has the tier)
    hbm_segments: list[HbmSegment] = []
    # the namespace's CXL region: read it directly (Unix socket: its fd follows the segments' fds)
    cxl_path: str = ""
    cxl_bytes: int = 0
    cxl_coherent: bool = False


class LookupReply(Reply):
    prefix: int = 0
    # one byte per key: its TierId, 0 for a miss (compact for large batches)
    tiers: bytes = b""


class KeysReply(Reply):
    """Reply to reserve/acquire/commit/abort/release/delete."""

    codes: list[int] = []
    descriptors: list[Descriptor | None] = []
    # acquire on a session with HBM: where each block's complete HBM copy is (None: DRAM only)
    hbm: list[Descriptor | None] = []


class MapReply(Reply):
    segments: list[SegmentInfo] = []
    nixl_metadata: bytes = b""
    remote_segments: list[RemoteSegment] = []


class ReadReply(Reply):
    """Per key a code and the bytes that follow for it (0 for a miss)."""

    codes: list[int] = []
    lengths: list[int] = []


class StatsReply(Reply):
    stats: dict[str, Any] = {}


REPLY_TYPES: dict[str, type[Reply]] = {
    "hello": HelloReply,
    "lookup": LookupReply,
    "reserve": KeysReply,
    "commit": KeysReply,
    "abort": KeysReply,
    "acquire": KeysReply,
    "release": KeysReply,
    "delete": KeysReply,
    "map": MapReply,
    "stats": StatsReply,
    "read": ReadReply,
    "write": KeysReply,
    "prefetch": KeysReply,
    "touch": Reply,
}


def with_extra_hits(tiers: bytes, held: Sequence[bool], tier: int) -> tuple[int, bytes]:
    """A lookup's per-key tiers with the misses ``held`` marks (one flag per key) filled in as ``tier``,
    and the length of the cached prefix that results (the daemon adds its CXL region's hits, and so does
    a client that reads the region itself)."""
    found = bytearray(tiers)
    for i, t in enumerate(found):
        if not t and held[i]:
            found[i] = tier
    prefix = next((i for i, t in enumerate(found) if not t), len(found))
    return prefix, bytes(found)


# ---------------------------------------------------------------- framing

_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_frame(msg: msgspec.Struct) -> bytes:
    """Encode one message with its length prefix."""
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def encode_frame_into(msg: msgspec.Struct, buf: bytearray) -> None:
    """Encode one framed message into ``buf`` (reused across calls)."""
    _encoder.encode_into(msg, buf, HEADER_BYTES)
    HEADER.pack_into(buf, 0, len(buf) - HEADER_BYTES)


def describe_decode_error(body: bytes | memoryview, exc: Exception) -> tuple[int, ErrorCode, str]:
    """Turn a failed request decode into (request id, code, message)."""
    try:
        env = envelope_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0, ErrorCode.BAD_FRAME, f"frame is not a msgpack map with an op: {exc}"
    rid = env.id if isinstance(env.id, int) and not isinstance(env.id, bool) else 0
    if not isinstance(env.op, str) or env.op not in OPS:
        return rid, ErrorCode.UNKNOWN_OP, f"unknown op {env.op!r}; known ops: {', '.join(OPS)}"
    return rid, ErrorCode.BAD_REQUEST, f"bad {env.op} request: {exc}"
