"""The C extension: copies, cache-line flush/invalidate, fences, atomics and the CXL index calls."""

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert set(feats) == {"clflush", "clflushopt", "clwb", "sse2", "sse4_1", "avx2"}
    assert all(isinstance(v, bool) for v in feats.values())


# ---- cache-line primitives, non-temporal copies, atomics (the CXL tier's building blocks) ----


def test_primitives_report_the_instructions_chosen_at_import():
    prims = _native.primitives()
    feats = _native.cpu_features()
    assert prims["flush"] in {"clwb", "clflushopt", "clflush", "none"}
    assert prims["invalidate"] in {"clflushopt", "clflush", "none"}
    if feats["clwb"]:
        assert prims["flush"] == "clwb"
    if feats["clflushopt"]:
        assert prims["invalidate"] == "clflushopt"  # clwb keeps the line: it cannot invalidate


@settings(max_examples=60, deadline=None)
@given(dst_off=st.integers(0, 130), src_off=st.integers(0, 130), n=st.integers(0, 5000))
def test_nt_store_and_nt_load_copy_any_alignment(dst_off, src_off, n):
    src = np.random.default_rng(n).integers(0, 255, 5200, dtype=np.uint8)
    for fn in (_native.nt_store, _native.nt_load):
        dst = bytearray(5200)
        assert fn(dst, dst_off, src, src_off, n) == n
        assert bytes(dst[dst_off: dst_off + n]) == src[src_off: src_off + n].tobytes()
        assert dst[:dst_off] == bytearray(dst_off) and dst[dst_off + n:] == bytearray(5200 - dst_off - n)


def test_nt_copies_of_large_blocks_into_a_shared_mapping():
    m = mmap.mmap(-1, 4 << 20)
    big = np.random.default_rng(1).integers(0, 255, (2 << 20) + 77, dtype=np.uint8)
    _native.nt_store(m, 3, big, 0, big.nbytes)
    out = np.zeros(big.nbytes, dtype=np.uint8)
    _native.nt_load(out, 0, m, 3, big.nbytes)
    assert np.array_equal(out, big)
    m.close()


@pytest.mark.parametrize("fn", ["flush", "invalidate"])
def test_flush_and_invalidate_keep_contents_on_any_range(fn):
    m = mmap.mmap(-1, 1 << 20)
    data = np.random.default_rng(2).integers(0, 255, 1 << 20, dtype=np.uint8)
    m[:] = data.tobytes()
    op = getattr(_native, fn)
    for off, n in ((0, 0), (1, 1), (63, 2), (100, 5000), (0, 1 << 20), ((1 << 20) - 1, 1)):
        assert op(m, off, n) is None
    op(b"read-only buffers are fine", 3, 5)  # a reader's mapping may be read-only
    assert m[:] == data.tobytes()
    with pytest.raises(ValueError, match="outside"):
        op(m, (1 << 20) - 10, 11)
    with pytest.raises(ValueError, match=">= 0"):
        op(m, -1, 4)
    m.close()


def test_fences_run():
    assert _native.store_fence() is None and _native.load_fence() is None and _native.full_fence() is None


def test_atomics_on_mapped_memory():
    m = mmap.mmap(-1, 4096)
    _native.store64(m, 8, 41)
    assert _native.load64(m, 8) == 41
    assert _native.fetch_add64(m, 8, 1) == 41 and _native.load64(m, 8) == 42
    assert _native.cas64(m, 8, 7, 9) == 42 and _native.load64(m, 8) == 42  # failed swap reports what it saw
    assert _native.cas64(m, 8, 42, 2**64 - 1) == 42 and _native.load64(m, 8) == 2**64 - 1
    assert _native.fetch_add64(m, 8, 1) == 2**64 - 1 and _native.load64(m, 8) == 0  # wraps
    assert _native.fetch_add64(m, 8, -1) == 0 and _native.load64(m, 8) == 2**64 - 1
    assert int.from_bytes(m[8:16], "little") == 2**64 - 1  # plain little-endian words in the mapping
    for fn, args in ((_native.load64, (m, 4)), (_native.store64, (m, 12, 1)), (_native.cas64, (m, 1, 0, 1)),
                     (_native.fetch_add64, (m, 3, 1))):
        with pytest.raises(ValueError, match="aligned"):
            fn(*args)
    with pytest.raises(ValueError, match="outside"):
        _native.load64(m, 4096)
    with pytest.raises(TypeError):
        _native.store64(b"\0" * 16, 0, 1)  # read-only
    m.close()


def test_atomic_fetch_add_is_atomic_across_processes():
    import multiprocessing as mp

    m = mmap.mmap(-1, 4096)

    def bump(n):
        for _ in range(n):
            _native.fetch_add64(m, 64, 1)

    procs = [mp.get_context("fork").Process(target=bump, args=(20000,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert _native.load64(m, 64) == 60000
    m.close()


def test_cxl_index_calls_reject_bad_geometry_and_keys():
    m = mmap.mmap(-1, 1 << 16)
    out = np.empty(1, dtype=np.int64)
    with pytest.raises(ValueError, match="aligned offset"):
        _native.cxl_lookup(m, 32, 4, bytes(32), out, True)
    with pytest.raises(ValueError, match="outside"):
        _native.cxl_lookup(m, 0, 2000, bytes(32), out, True)
    with pytest.raises(ValueError, match="multiple of 32"):
        _native.cxl_lookup(m, 0, 4, bytes(31), out, True)
    with pytest.raises(ValueError, match="out holds"):
        _native.cxl_lookup(m, 0, 4, bytes(64), out, True)
    with pytest.raises(ValueError, match="a key is 32 bytes"):
        _native.cxl_read(m, 0, 4, 4096, 4096, bytes(16), bytearray(10), 0, True, 3)
    with pytest.raises(ValueError, match="a key is 32 bytes"):
        _native.cxl_publish(m, 0, 2, bytes(8), 0, 0)
    with pytest.raises(ValueError, match="cache line"):
        _native.cxl_publish(m, 8, 2, bytes(32), 0, 0)
    # an empty index: every key misses
    assert _native.cxl_lookup(m, 0, 4, bytes(64), np.empty(2, dtype=np.int64), True) == 0
    assert _native.cxl_read(m, 0, 4, 4096, 4096, bytes(32), bytearray(10), 0, True, 3) == -1
    with pytest.raises(ValueError, match="validated must be 6"):
        _native.cxl_read(m, 0, 4, 4096, 4096, bytes(32), bytearray(10), 0, True, 3, np.zeros(5, np.uint64))
    with pytest.raises(BufferError, match="not writable"):
        _native.cxl_read(m, 0, 4, 4096, 4096, bytes(32), bytearray(10), 0, True, 3, bytes(48))
    assert _native.cxl_read(m, 0, 4, 4096, 4096, bytes(32), bytearray(10), 0, True, 3, np.zeros(6, np.uint64)) == -1
    with pytest.raises(ValueError, match="multiple of 32"):
        _native.cxl_read_many(m, 0, 4, 4096, 4096, bytes(33), [bytearray(10)], True, 3)
    with pytest.raises(TypeError, match="sequence of writable buffers"):
        _native.cxl_read_many(m, 0, 4, 4096, 4096, bytes(32), 7, True, 3)
    with pytest.raises(ValueError, match="bad data geometry"):
        _native.cxl_read_many(m, 0, 4, 4096, 0, bytes(32), [bytearray(10)], True, 3)
    assert _native.cxl_read_many(m, 0, 4, 4096, 4096, bytes(64), [bytearray(10), bytearray(1)], True, 3) == [-1, -1]
    m.close()


def test_address_is_where_the_buffer_starts():
    import numpy as np

    a = np.zeros(4096, np.uint8)
    assert _native.address(a) == a.ctypes.data
    assert _native.address(memoryview(a)[100:]) == a.ctypes.data + 100
    assert _native.address(b"read-only is fine") > 0
    with pytest.raises((BufferError, ValueError)):
        _native.address(np.zeros((8, 8), np.uint8)[:, ::2])  # not contiguous
    with pytest.raises(TypeError):
        _native.address(12345)
