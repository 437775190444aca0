"""The paged-KV API: an engine's paged tensors in the common layouts to kvrack blocks and back, byte for byte,
over each transport; blocks given as pieces are checked against their layout like any block."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client, Layout, SizeMismatch
from kvrack.clients.blocks import Pieces
from kvrack.clients.paged import PagedKV, get_kv, put_kv

from .test_remote import NIXL_MISSING, TOKEN_A, start_daemon


def vllm_cpu_layers(blocks: int = 16, layers: int = 3) -> list[torch.Tensor]:
    """vLLM's CPU layout: every layer a view of one buffer, (blocks, heads, tokens, 2 * head_dim)."""
    buf = torch.randn(layers, blocks, 2, 32, 16)
    return [buf[i] for i in range(layers)]


def flash_layers(blocks: int = 16, layers: int = 3) -> list[torch.Tensor]:
    """The flash-attention layout: (2, blocks, tokens, heads, head_dim) per layer, K and V apart."""
    return [torch.randn(2, blocks, 32, 2, 8) for _ in range(layers)]


@pytest.mark.parametrize("make, block_dim", [(vllm_cpu_layers, 0), (flash_layers, 1)])
def test_paged_blocks_go_to_kvrack_and_back_into_other_pages(make, block_dim):
    src, dst = make(), [torch.zeros_like(t) for t in make()]
    a, b = PagedKV(src, block_dim), PagedKV(dst, block_dim)
    assert a.num_blocks == 16 and len(a.block(0).parts) == 3 * (1 if block_dim == 0 else 2)
    with DaemonProcess({"dram.capacity_bytes": "64MiB", "nvme.enabled": "false"}) as d, \
            Client.connect(d.socket_path) as c:
        keys = [os.urandom(32) for _ in range(5)]
        assert put_kv(c, keys, a, [1, 3, 5, 7, 9]).stored == 5
        got = get_kv(c, keys + [os.urandom(32)], b, [0, 2, 4, 6, 8, 10])
        assert got == [True] * 5 + [False] and got.nbytes[:5] == [a.block_nbytes] * 5
        for s, t in zip([1, 3, 5, 7, 9], [0, 2, 4, 6, 8]):
            for x, y in zip(src, dst):
                assert torch.equal(x.select(block_dim, s), y.select(block_dim, t))
        assert all(not y.select(block_dim, 10).any() for y in dst), "a miss leaves its block as it was"
        with c.get(keys[:1]) as lease:  # the stored block is the pages in layer order, nothing else
            want = b"".join(bytes(p) for p in a.block(1).parts)
            assert bytes(lease.views[0]) == want


def test_a_plain_cache_of_ones_own_is_one_page_a_block():
    cache = np.random.default_rng(0).integers(0, 255, (8, 2, 2, 16, 2, 8), dtype=np.uint8)
    kv = PagedKV.plain(cache)
    assert kv.block_nbytes == 2 * 2 * 16 * 2 * 8 and len(kv.block(3).parts) == 1
    with DaemonProcess({"dram.capacity_bytes": "64MiB", "nvme.enabled": "false"}) as d, \
            Client.connect(d.socket_path) as c:
        key = os.urandom(32)
        put_kv(c, [key], kv, [3])
        out = np.zeros_like(cache)
        get_kv(c, [key], PagedKV.plain(out), [6])
        assert np.array_equal(out[6], cache[3])


def test_pieces_are_checked_against_the_layout_and_their_total_size():
    layout = Layout(layers=2, kv_heads=2, head_dim=8, dtype="float32", block_tokens=16)
    half = layout.block_nbytes // 2 // 4
    with DaemonProcess({"dram.capacity_bytes": "64MiB", "nvme.enabled": "false"}) as d, \
            Client.connect(d.socket_path, layout=layout) as c:
        key = os.urandom(32)
        c.put([key], [Pieces([np.ones(half, np.float32), np.full(half, 2, np.float32)])])
        with pytest.raises(SizeMismatch, match="dtype float64"):
            c.put([os.urandom(32)], [Pieces([np.ones(half // 2, np.float64), np.ones(half, np.float32)])])
        with pytest.raises(SizeMismatch, match="bytes, but a block of this layout has"):
            c.put([os.urandom(32)], [Pieces([np.ones(half, np.float32)])])
        parts = [np.zeros(half, np.float32), np.zeros(half, np.float32)]
        assert c.get_into([key], [Pieces(parts)]) == [True]
        assert (parts[0] == 1).all() and (parts[1] == 2).all()


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_pieces_travel_over_the_remote_transports(tmp_path, transport):
    if transport == "nixl" and NIXL_MISSING is not None:
        pytest.skip(f"NIXL cannot be used here: {NIXL_MISSING}")
    src, dst = vllm_cpu_layers(), [torch.zeros_like(t) for t in vllm_cpu_layers()]
    d, address = start_daemon(tmp_path)
    try:
        with Client.connect(address, namespace="a", token=TOKEN_A, transport=transport) as c:
            assert c.transport == transport
            keys = [os.urandom(32) for _ in range(4)]
            put_kv(c, keys, PagedKV(src, 0), [0, 1, 2, 3])
            assert get_kv(c, keys, PagedKV(dst, 0), [4, 5, 6, 7]) == [True] * 4
            for x, y in zip(src, dst):
                assert torch.equal(x[0:4], y[4:8])
    finally:
        d.stop()
