"""Content-addressed block keys: the one place where tokens become keys.

``key_0 = H(namespace_salt, model_fingerprint, layout_id, tokens_0)`` and
``key_i = H(key_{i-1}, tokens_i)`` (docs/index.md, Concepts), with H = blake3 over a
length-delimited encoding so that no two different inputs share bytes. A key
names its whole prefix, so looking up a chain tells how many leading blocks
are cached. The daemon never hashes tokens.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NewType

import blake3

from kvrack.clients.layout import Layout

BlockKey = NewType("BlockKey", bytes)
KEY_BYTES = 32
_ROOT_TAG = b"kvrack-key-v1/root"
_NEXT_TAG = b"kvrack-key-v1/next"
_SALT_TAG = b"kvrack-key-v1/salt"
_LEN = struct.Struct("<Q")


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 (ids are < 2**32 in every tokenizer we know)."""
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def as_key(value: bytes) -> BlockKey:
    """Check that ``value`` is a 32-byte key and type it as one."""
    if not isinstance(value, (bytes, bytearray)) or len(value) != KEY_BYTES:
        raise ValueError(f"a block key is {KEY_BYTES} bytes, got {type(value).__name__} of length {len(value)}")
    return BlockKey(bytes(value))


class KeyBuilder:
    """Builds the key chain of a token sequence for one namespace, model and layout."""

    def __init__(self, namespace_salt: bytes, model_fingerprint: str | bytes, layout: Layout) -> None:
        if isinstance(model_fingerprint, str):
            model_fingerprint = model_fingerprint.encode()
        self.layout = layout
        self.block_tokens = layout.block_tokens
        self._root = _ROOT_TAG + _field(bytes(namespace_salt)) + _field(model_fingerprint) + _field(layout.layout_id)

    def first_key(self, tokens: Sequence[int], salt: bytes | str = b"") -> BlockKey:
        """Key of a chain's first block. ``salt`` (a request's ``cache_salt``: one tenant's, within a namespace)
        enters the first key, and so every key of the chain: requests salted differently never share a block."""
        if isinstance(salt, str):
            salt = salt.encode()
        tail = _field(_tokens_bytes(tokens))
        if salt:
            tail = _SALT_TAG + _field(salt) + tail
        return BlockKey(blake3.blake3(self._root + tail).digest())

    def next_key(self, parent: bytes, tokens: Sequence[int]) -> BlockKey:
        """Key of the block that follows ``parent`` in its chain."""
        return BlockKey(blake3.blake3(_NEXT_TAG + _field(parent) + _field(_tokens_bytes(tokens))).digest())

    def chain(self, tokens: Sequence[int], *, partial: bool = False, salt: bytes | str = b"",
              start: Sequence[bytes] = ()) -> list[BlockKey]:
        """Keys of every full block of ``tokens`` (and the trailing partial one if asked). ``salt``: see
        ``first_key``. ``start``: the keys already built for the first blocks of ``tokens`` (a request that
        grew): only the blocks after them are hashed, and the result includes them."""
        keys: list[BlockKey] = [BlockKey(bytes(k)) for k in start]
        n = self.block_tokens
        end = len(tokens) if partial else len(tokens) - len(tokens) % n
        parent: BlockKey | None = keys[-1] if keys else None
        for begin in range(len(keys) * n, end, n):
            chunk = tokens[begin : begin + n]
            parent = self.first_key(chunk, salt) if parent is None else self.next_key(parent, chunk)
            keys.append(parent)
        return keys

    @staticmethod
    def parents(keys: Iterable[bytes]) -> list[bytes | None]:
        """Each key's parent in a chain: None for the first, then the previous key."""
        out: list[bytes | None] = []
        prev: bytes | None = None
        for key in keys:
            out.append(prev)
            prev = key
        return out
