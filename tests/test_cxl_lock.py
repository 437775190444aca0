"""The CXL region's writer lock and host table, on their own: the lease deadline across the 2**32 ms wrap,
a takeover after the lease ran out (the old holder's renew and release are refused, never clobbering the new
holder), a dead owner on this machine taken over at once, and a full host table that frees the lines of dead
hosts (a process gone on this machine, a stale heartbeat on another) before it gives up."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest

from kvrack import _native
from kvrack.tiers.cxl import CxlRegion
from kvrack.tiers.cxl_layout import OFF_LOCK
from kvrack.tiers.cxl_lock import MASK32, LockTimeout, RegionLock, expired, lock_owner, lock_word, now_ms32


def test_the_lease_deadline_is_compared_across_the_wrap_of_the_millisecond_clock():
    near_end = MASK32 - 5
    assert not expired(near_end, MASK32 - 10)
    assert expired(near_end, near_end)
    assert expired(near_end, 3), "3 ms after the wrap is past a deadline 5 ms before it"
    assert not expired(3, near_end), "a deadline just after the wrap is still ahead"
    assert lock_owner(lock_word(5, 4242, 77)) == (5, 4242, 77)


def _two_locks(region_path: str, same_machine: bool) -> tuple[CxlRegion, RegionLock, RegionLock]:
    region = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns")
    first = RegionLock(region.mm, 1, lambda h: same_machine, lease_ms=200, timeout_s=10)
    second = RegionLock(region.mm, 2, lambda h: same_machine, lease_ms=200, timeout_s=10)
    return region, first, second


def test_a_holder_past_its_lease_is_taken_over_and_cannot_renew_or_release_the_new_holders_lock(region_path):
    region, first, second = _two_locks(region_path, same_machine=False)
    try:
        first.acquire()
        second.acquire()  # waits for the 200 ms lease, then takes over
        assert second.takeovers == 1 and lock_owner(_native.load64(region.mm, OFF_LOCK))[0] == 2
        with pytest.raises(RuntimeError, match="taken over"):
            first.renew()
        first.release()  # logs, and leaves the new holder's word alone
        assert lock_owner(_native.load64(region.mm, OFF_LOCK))[0] == 2
        second.release()
        assert _native.load64(region.mm, OFF_LOCK) == 0
    finally:
        region.close()


def test_a_dead_owner_on_this_machine_is_taken_over_at_once_and_a_live_foreign_one_is_waited_for(region_path):
    region, _first, second = _two_locks(region_path, same_machine=True)
    try:
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True)
        gone = int(child.stdout)  # a pid that no longer exists
        _native.store64(region.mm, OFF_LOCK, lock_word(1, gone, (now_ms32() + 600_000) & MASK32))
        with second:  # ten minutes of lease left, the owner gone: taken over (waiting would time out in 10 s)
            assert second.takeovers == 1
        foreign = RegionLock(region.mm, 3, lambda h: False, lease_ms=200, timeout_s=0.3)
        _native.store64(region.mm, OFF_LOCK, lock_word(1, os.getpid(), (now_ms32() + 600_000) & MASK32))
        with pytest.raises(LockTimeout, match="held by host 1"):
            foreign.acquire()
        _native.store64(region.mm, OFF_LOCK, 0)
    finally:
        region.close()


def test_a_full_host_table_frees_dead_hosts_lines_before_it_gives_up(region_path):
    region = CxlRegion.create(region_path, 8 << 20, 64 << 10, "ns", max_hosts=2)
    writers = []
    try:
        assert region.register_host() == 0
        # line 1: a host on another machine whose heartbeat stopped ten minutes ago
        off = region.g.host(1)
        struct.pack_into("<QQQQ", region.mm, off, 2, region.machine ^ 0xFFFF, 1, int(time.time() * 1000) - 600_000)
        writer = CxlRegion.open(region_path, writable=True)
        writers.append(writer)
        assert writer.register_host() == 1, "the stale host's line, reclaimed"
        third = CxlRegion.open(region_path, writable=True)
        writers.append(third)
        with pytest.raises(RuntimeError, match="taken by live hosts"):  # both lines belong to live processes
            third.register_host()
        assert region.stats()["reaped_hosts"] == 0 and writer.stats()["reaped_hosts"] == 1
    finally:
        for w in writers:
            w.close()
        region.close()
