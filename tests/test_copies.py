"""A large request's block copies spread over threads (kvrack.clients.copies)."""

from __future__ import annotations

import threading

import pytest

from kvrack.clients.copies import PARALLEL_BYTES, CopyPool, default_threads, runs


@pytest.mark.parametrize("sizes,parts", [([1] * 16, 2), ([1] * 16, 3), ([5, 1, 1, 1, 1, 1], 2), ([7], 4),
                                         ([2, 2, 2], 8), ([0, 3, 0, 3], 2)])
def test_runs_cover_every_copy_once_in_order_and_balance_bytes(sizes, parts):
    got = runs(sizes, parts)
    assert [i for r in got for i in r] == list(range(len(sizes)))
    assert len(got) <= min(parts, len(sizes)) and all(len(r) for r in got)
    if sizes == [1] * 16:
        assert {len(r) for r in got} <= {16 // parts, 16 // parts + 1}


def _recorder(seen: list[int], bytes_each: int, fail_at: int | None = None):
    def fn(i: int) -> None:
        seen.append(threading.get_ident())
        if i == fail_at:
            raise OSError(f"copy {i} failed")
    return [(fn, (i,), bytes_each) for i in range(16)]


def test_a_large_request_is_shared_by_threads_and_a_small_one_is_not():
    pool = CopyPool(3)
    try:
        seen: list[int] = []
        pool.run(_recorder(seen, PARALLEL_BYTES // 16))
        assert len(seen) == 16 and len(set(seen)) >= 2 and threading.get_ident() in seen
        assert pool.parallel_requests == 1
        seen.clear()
        pool.run(_recorder(seen, PARALLEL_BYTES // 16 - 1))
        assert set(seen) == {threading.get_ident()} and pool.parallel_requests == 1
    finally:
        pool.close()


def test_an_error_in_a_helper_is_raised_after_every_copy_has_ended():
    pool = CopyPool(2)
    try:
        seen: list[int] = []
        with pytest.raises(OSError, match="copy 12 failed"):
            pool.run(_recorder(seen, PARALLEL_BYTES, fail_at=12))
        assert len(seen) == 13  # the caller's run of 8 and the helper's up to its failure
    finally:
        pool.close()


def test_no_helper_is_still_copying_when_an_error_is_raised():
    """The caller's own run fails at once while three helpers are still copying: ``run`` raises only after they
    have all ended (the next step, an abort or a release, may free the memory they write)."""
    import time

    pool = CopyPool(4)
    done: list[int] = []

    def slow(i: int) -> None:
        time.sleep(0.05)
        done.append(i)

    def failing(i: int) -> None:
        raise KeyboardInterrupt

    copies = [(failing, (0,), PARALLEL_BYTES)] + [(slow, (i,), PARALLEL_BYTES) for i in range(1, 4)]
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run(copies)
        assert sorted(done) == [1, 2, 3]
    finally:
        pool.close()


def test_copies_that_keep_the_gil_stay_on_the_caller():
    from kvrack.clients.blocks import Pieces, block_view, copies_run_unlocked
    from kvrack.clients.buffers import GIL_RELEASE_BYTES

    big, small = bytearray(GIL_RELEASE_BYTES), bytearray(GIL_RELEASE_BYTES - 1)
    assert copies_run_unlocked([block_view(big), block_view(Pieces([big, big]))])
    assert not copies_run_unlocked([block_view(big), block_view(Pieces([big, small]))])
    pool = CopyPool(3)
    seen: list[int] = []
    pool.run(_recorder(seen, PARALLEL_BYTES), shareable=False)
    assert set(seen) == {threading.get_ident()} and pool.parallel_requests == 0


def test_one_thread_copies_on_the_caller_alone():
    pool = CopyPool(1)
    seen: list[int] = []
    pool.run(_recorder(seen, PARALLEL_BYTES))
    assert set(seen) == {threading.get_ident()} and pool.parallel_requests == 0


def test_threads_come_from_the_environment_or_the_cpus(monkeypatch):
    monkeypatch.setenv("KVRACK_COPY_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("KVRACK_COPY_THREADS", bad)
        with pytest.raises(ValueError, match="KVRACK_COPY_THREADS"):
            default_threads()
    monkeypatch.delenv("KVRACK_COPY_THREADS")
    import os
    assert default_threads() == max(1, min(4, len(os.sched_getaffinity(0))))
    with pytest.raises(ValueError, match="copy_threads"):
        CopyPool(0)
