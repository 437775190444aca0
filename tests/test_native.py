"""The C extension: bounds-checked copies between any buffers."""

import mmap

import numpy as np
import pytest

from kvrack import _native


def test_copy_between_buffer_kinds_and_unaligned_offsets():
    src = np.arange(1000, dtype=np.uint8)
    dst = bytearray(1000)
    assert _native.copy(dst, 3, src, 7, 500) == 500
    assert bytes(dst[3:503]) == src[7:507].tobytes() and dst[:3] == b"\0\0\0"
    m = mmap.mmap(-1, 1 << 20)
    big = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    _native.copy(m, 0, big, 0, 1 << 20)  # large: the GIL-releasing path
    assert m[:] == big.tobytes()
    m.close()


@pytest.mark.parametrize("args, match", [
    ((0, 0, 101), "destination range"),
    ((50, 0, 51), "destination range"),
    ((0, 60, 51), "source range"),
    ((-1, 0, 1), ">= 0"),
])
def test_copy_bounds_errors(args, match):
    with pytest.raises(ValueError, match=match):
        _native.copy(bytearray(100), args[0], bytes(110), args[1], args[2])


def test_copy_refuses_read_only_destination():
    with pytest.raises(TypeError):
        _native.copy(b"immutable", 0, b"x", 0, 1)


def test_cpu_features_report():
    feats = _native.cpu_features()
    assert set(feats) == {"clflush", "clflushopt", "clwb", "sse2", "avx2"}
    assert all(isinstance(v, bool) for v in feats.values())
