"""KV events: what a daemon stores and drops, in vLLM's KV-event wire format, for prefix-aware routers.

A batch is vLLM's ``KVEventBatch``: a msgpack array ``[ts, [events...], data_parallel_rank]``, each event a map
tagged ``{"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...}``; it goes out on a ZMQ PUB socket
as ``[topic, sequence (8 bytes, big-endian), payload]``, and a ROUTER socket replays a range to a subscriber that
missed it (request ``[b"", start_seq]``; replies ``[b"", topic, seq, payload]``, ended by ``[b"", b"", -1, b""]``).
A vLLM decoder reads kvrack's batches (it ignores the fields vLLM lacks; tests/engines checks it with vLLM's own). kvrack's blocks are named by their
32-byte keys (``block_hashes`` are bytes), ``medium`` is the tier (``DRAM``, ``NVME``, ``CXL``, ``HBM``) and
``namespace`` the tenant, ``epoch`` the daemon's run (numbers start again at 0 in a new one); the topic is
``<prefix><namespace>``.
"""

from __future__ import annotations

from typing import Any

import msgspec

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's last frame


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """A tagged event: encoded as a map with ``"type"`` naming its class."""


class BlockStored(KVCacheEvent):
    """Blocks now held on ``medium``: a chain (each block's parent is the one before it; the first one's is
    ``parent_block_hash``)."""

    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None  # always sent: vLLM's decoder requires it
    namespace: str | None = None
    block_bytes: list[int] | None = None  # each block's size in bytes (kvrack)
    epoch: int | None = None  # the publishing daemon's run (kvrack): a new one means a restart, numbers from 0


class BlockRemoved(KVCacheEvent):
    """Blocks no longer held on ``medium`` (they may still be held on another)."""

    block_hashes: list[bytes | int]
    medium: str | None
    namespace: str | None = None
    epoch: int | None = None


class AllBlocksCleared(KVCacheEvent):
    """Forget everything this publisher said it holds (of ``namespace``, or all): sent when a daemon starts, before
    the blocks it recovered are announced."""

    namespace: str | None = None
    epoch: int | None = None


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(KVEventBatch)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def seq_of(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)
