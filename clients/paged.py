"""Paged KV caches as kvrack blocks, for engines of one's own and the engine connectors.

An engine keeps KV in pages: per layer, a tensor whose ``block_dim`` indexes blocks of ``block_tokens`` tokens.
kvrack block ``b`` of such a cache is the engine's block ``b`` in every layer, in layer order: for each layer,
for each index of the dimensions before ``block_dim`` (K and V, when the layout splits them there), that
index's page of block ``b``. ``put_kv`` copies those pages straight into the reserved slots, ``get_kv`` copies
the slots straight back into the pages (``Pieces``): one copy each way, no staging buffer.

Layouts, by their per-layer tensor shape:

- vLLM's CPU backend: ``(num_blocks, kv_heads, block_tokens, 2 * head_dim)``, ``block_dim=0`` (one page a layer);
- vLLM's flash-attention layout: ``(2, num_blocks, block_tokens, kv_heads, head_dim)``, ``block_dim=1`` (a K and a
  V page a layer);
- a plain cache of one's own, ``(num_blocks, layers, 2, block_tokens, kv_heads, head_dim)`` as one tensor:
  ``PagedKV.plain(cache)`` (one page a block).

CPU tensors (torch or numpy) now; CUDA tensors go through the GPU client path (device to host on put, host or
HBM to device on get).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kvrack.clients.blocks import Pieces
from kvrack.clients.gpu import DeviceSpan
from kvrack.clients.results import GetResult, PutResult


class _Layer:
    """One layer's paged tensor as raw memory: where each block's pages start, and how long a page is."""

    __slots__ = ("owner", "ptr", "device", "block_stride", "page_bytes", "page_offsets", "memory", "base")

    def __init__(self, tensor: Any, block_dim: int) -> None:
        ptr, shape, strides, itemsize, device, span = _raw(tensor)
        if not 0 <= block_dim < len(shape):
            raise ValueError(f"block_dim {block_dim} is not a dimension of a tensor of shape {tuple(shape)}")
        inner, expect = shape[block_dim + 1:], itemsize
        for size, stride in zip(reversed(inner), reversed(strides[block_dim + 1:])):
            if size > 1 and stride != expect:
                raise ValueError(f"the dimensions after block_dim {block_dim} of a tensor of shape {tuple(shape)} "
                                 "must be contiguous (one page of a block)")
            expect *= size
        self.owner = tensor  # keeps the memory alive
        self.ptr = ptr
        self.device = device
        self.block_stride = strides[block_dim]
        self.page_bytes = math.prod(inner) * itemsize
        outer = shape[:block_dim]
        offsets = [0]
        for size, stride in zip(outer, strides[:block_dim]):
            offsets = [o + i * stride for o in offsets for i in range(size)]
        self.page_offsets = offsets
        # host memory: one buffer over the whole span, sliced per page (no per-page object from the tensor library)
        self.memory = None if device is not None else memoryview((ctypes.c_ubyte * span[1]).from_address(span[0])).cast("B")
        self.base = ptr - span[0]  # where the tensor starts in ``memory``

    def pages(self, block: int) -> list[Any]:
        start = block * self.block_stride
        if self.device is not None:
            return [DeviceSpan(self.ptr + start + off, self.page_bytes, self.device) for off in self.page_offsets]
        memory, at, n = self.memory, self.base + start, self.page_bytes
        assert memory is not None
        return [memory[at + off: at + off + n] for off in self.page_offsets]


def _raw(tensor: Any) -> tuple[int, list[int], list[int], int, int | None, tuple[int, int]]:
    """(data pointer, shape, strides in bytes, item size, CUDA device or None, (start, length) of the memory
    that holds it) of a torch tensor or a numpy array."""
    if type(tensor).__module__.startswith("torch"):
        itemsize = tensor.element_size()
        storage = tensor.untyped_storage()
        device = tensor.device.index or 0 if tensor.device.type == "cuda" else None
        if device is None and tensor.device.type != "cpu":
            raise ValueError(f"tensors on {tensor.device} are not supported; CPU or CUDA")
        return (int(tensor.data_ptr()), list(tensor.shape), [s * itemsize for s in tensor.stride()], itemsize, device,
                (int(storage.data_ptr()), int(storage.nbytes())))
    iface = getattr(tensor, "__array_interface__", None)
    if iface is None:
        raise TypeError(f"{type(tensor).__name__} is not a torch tensor or a numpy array")
    base = tensor
    while getattr(base, "base", None) is not None:
        base = base.base
    base_iface = base.__array_interface__
    return (int(iface["data"][0]), list(tensor.shape), list(tensor.strides), tensor.itemsize, None,
            (int(base_iface["data"][0]), int(base.nbytes)))


class PagedKV:
    """An engine's paged KV cache, seen block by block (see the module's docstring for layouts)."""

    def __init__(self, layers: Sequence[Any] | Mapping[str, Any], block_dim: int = 0) -> None:
        tensors = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        if not tensors:
            raise ValueError("a paged KV cache needs at least one layer")
        self.layers = [_Layer(t, block_dim) for t in tensors]
        self.num_blocks = int(tensors[0].shape[block_dim])
        if any(int(t.shape[block_dim]) != self.num_blocks for t in tensors):
            raise ValueError("every layer must have the same number of blocks")
        self.dtype = getattr(tensors[0], "dtype", None)
        self.block_nbytes = sum(layer.page_bytes * len(layer.page_offsets) for layer in self.layers)

    @classmethod
    def plain(cls, cache: Any) -> PagedKV:
        """One tensor ``(num_blocks, layers, 2, block_tokens, kv_heads, head_dim)``: a block is one page."""
        if len(cache.shape) != 6:
            raise ValueError(f"a plain paged cache is (num_blocks, layers, 2, block_tokens, kv_heads, head_dim), "
                             f"got shape {tuple(cache.shape)}")
        return cls([cache], block_dim=0)

    def block(self, block_id: int) -> Pieces:
        """Block ``block_id``'s pages, in kvrack's order (layer by layer)."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} is not in a cache of {self.num_blocks} blocks")
        pieces = Pieces([page for layer in self.layers for page in layer.pages(block_id)])
        return pieces

    def blocks(self, block_ids: Sequence[int]) -> list[Pieces]:
        return [self.block(b) for b in block_ids]


def put_kv(client: Any, keys: Sequence[bytes], kv_cache: PagedKV, block_ids: Sequence[int],
           parents: Sequence[bytes | None] | None = None, **kwargs: Any) -> PutResult:
    """Store the engine's blocks ``block_ids`` under ``keys`` (``Client.put``'s options apply)."""
    if len(block_ids) != len(keys):
        raise ValueError("put_kv: one block id per key")
    return client.put(keys, kv_cache.blocks(block_ids), parents, **kwargs)


def get_kv(client: Any, keys: Sequence[bytes], kv_cache: PagedKV, block_ids: Sequence[int]) -> GetResult:
    """Read ``keys`` into the engine's blocks ``block_ids``; per-key hit flags (a miss leaves its block as it was)."""
    if len(block_ids) != len(keys):
        raise ValueError("get_kv: one block id per key")
    return client.get_into(keys, kv_cache.blocks(block_ids))
