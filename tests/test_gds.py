"""GPUDirect Storage reads of NVMe-tier blocks: the word checksum everywhere, the GPU path where there is one."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrack.tiers import gds
from kvrack.tiers.nvme import BackingPath, ChecksumError, NvmeTier

MASK = (1 << 64) - 1


def reference_checksum(data: bytes) -> int:
    """The documented formula, in plain integers."""
    padded = data + bytes(-len(data) % 8)
    total = 0
    for i in range(len(padded) // 8):
        total = (total + int.from_bytes(padded[8 * i: 8 * i + 8], "little") * (2 * i + 1)) & MASK
    return total ^ ((len(data) * 0x9E3779B97F4A7C15) & MASK)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_word_checksum_matches_the_documented_formula(data):
    assert gds.word_checksum(data) == reference_checksum(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.data())
def test_any_single_word_change_changes_the_word_checksum(data, draw):
    i = draw.draw(st.integers(0, len(data) - 1))
    flip = draw.draw(st.integers(1, 255))
    changed = bytearray(data)
    changed[i] ^= flip
    assert gds.word_checksum(bytes(changed)) != gds.word_checksum(data)


def test_word_checksum_of_a_large_block():
    data = np.random.default_rng(1).integers(0, 255, (2 << 20) + 3, dtype=np.uint8).tobytes()
    assert gds.word_checksum(data) == reference_checksum(data)


def test_without_a_gpu_the_reader_says_why_not():
    why = gds.unavailable_reason()
    if why is None:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="GPUDirect Storage reads unavailable"):
        gds.GdsReader(None)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_gds_reads_into_gpu_memory_bit_identical_and_detect_corruption(tmp_path):
    why = gds.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    import cupy

    size = 256 * 1024
    data_path = str(tmp_path / "t.kvr")
    tier = NvmeTier([BackingPath(data_path, 16 << 20)], str(tmp_path / "index"), region_bytes=1 << 20)
    tier.recover()
    old = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8)
    seg, slot = tier.allocate("ns", size)
    assert tier.write([("ns", b"o" * 32, seg, slot, memoryview(old))]) == [None]  # before the reader: no word sum
    reader = gds.GdsReader(tier)
    try:
        blocks = {}
        for i in range(4):
            b = np.random.default_rng(10 + i).integers(0, 255, size - 100 * i, dtype=np.uint8)
            seg, slot = tier.allocate("ns", len(b))
            assert tier.write([("ns", bytes([i]) * 32, seg, slot, memoryview(b))]) == [None]
            blocks[bytes([i]) * 32] = b
        out = cupy.zeros(size, dtype=cupy.uint8)
        for key, b in blocks.items():
            assert tier.index.get("ns", key).device_checksum == gds.word_checksum(b)
            view = reader.read_into_device("ns", key, out)
            assert cupy.asnumpy(view).tobytes() == b.tobytes()
        assert cupy.asnumpy(reader.read_into_device("ns", b"o" * 32, out)).tobytes() == old.tobytes()
        assert reader.host_checked == 1
        rec = tier.index.get("ns", b"\x01" * 32)
        with open(data_path, "r+b") as fh:  # flip a byte behind the tier's back
            fh.seek(rec.offset + 77)
            byte = fh.read(1)
            fh.seek(rec.offset + 77)
            fh.write(bytes([byte[0] ^ 0xFF]))
            fh.flush()
            os.fsync(fh.fileno())
        with pytest.raises(ChecksumError):
            reader.read_into_device("ns", b"\x01" * 32, out)
        assert tier.errors["checksum"] == 1
    finally:
        reader.close()
        tier.close()
