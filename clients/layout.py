"""Block geometry: what a block holds and how many bytes it takes."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import blake3

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
KV_ORDERS = ("layer_kv_token_head_dim", "kv_layer_token_head_dim", "layer_token_kv_head_dim")
# an engine's own page order (its connector names it): blocks of different engines or backends never share a key
ENGINE_ORDER = re.compile(r"[a-z][a-z0-9_]*:[A-Za-z0-9_.:-]+")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The geometry of one block: one TP rank's KV for ``block_tokens`` tokens, all layers.

    ``kv_order`` names the order of the axes inside the block's contiguous bytes.
    Blocks of different layouts never share a key (``layout_id`` enters the first key).
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    block_tokens: int = 16
    tp_rank: int = 0
    tp_size: int = 1
    kv_order: str = "layer_kv_token_head_dim"

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "block_tokens", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Layout.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"Layout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        if self.kv_order not in KV_ORDERS and not ENGINE_ORDER.fullmatch(self.kv_order):
            raise ValueError(f"unknown kv_order {self.kv_order!r}; known: {', '.join(KV_ORDERS)}, or an engine's "
                             "page order as ENGINE:NAME (e.g. vllm:LBHNC:cpu)")

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: 2 (K and V) · layers · kv_heads · head_dim · tokens · dtype size."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.block_tokens * DTYPE_BYTES[self.dtype]

    def canonical(self) -> str:
        """A stable text form; its hash is the layout id. Field order is part of the format."""
        return (
            f"kvrack-layout-v1;layers={self.layers};kv_heads={self.kv_heads};head_dim={self.head_dim};"
            f"dtype={self.dtype};block_tokens={self.block_tokens};tp_rank={self.tp_rank};"
            f"tp_size={self.tp_size};kv_order={self.kv_order}"
        )

    def mismatch(self, buffer: Any, nbytes: int) -> str | None:
        """Why ``buffer`` (``nbytes`` long) cannot hold one block of this layout, or None when it can.

        Raw bytes (uint8 arrays, bytearrays) need only the size; a typed array or tensor must also be of
        the layout's dtype, so that a float32 tensor is not stored under a bfloat16 layout."""
        if nbytes != self.block_nbytes:
            return (f"{nbytes} bytes, but a block of this layout has {self.block_nbytes} (2 x {self.layers} layers x "
                    f"{self.kv_heads} kv heads x {self.head_dim} head dim x {self.block_tokens} tokens x "
                    f"{DTYPE_BYTES[self.dtype]} bytes of {self.dtype})")
        dtype = getattr(buffer, "dtype", None)
        if dtype is None:
            return None
        name = str(dtype).removeprefix("torch.")
        if name not in ("uint8", self.dtype):
            return f"dtype {name}, but the layout's dtype is {self.dtype}"
        return None

    @property
    def layout_id(self) -> bytes:
        """16-byte blake3 digest of the canonical form."""
        return blake3.blake3(self.canonical().encode()).digest(length=16)
