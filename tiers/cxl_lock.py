"""The CXL region's writer lock: a local mutex, then a lease word in the shared memory (TraCT's two levels).

The local mutex keeps a host's own threads off the shared word, so at most one
thread per host spins on it. The word holds who owns it and until when::

    bits 63..32  lease deadline, milliseconds of CLOCK_REALTIME modulo 2**32
    bits 31..22  owning host id + 1
    bits 21..0   owning process id (pid_max is at most 2**22 on Linux)

A holder that dies does not wedge the others: a waiter takes the word over
when the lease has run out, or at once when the owner is a process on the same
machine (the host table says which machine each host id is on) that no longer
exists. Holders renew the lease in long loops. Host clocks in a rack agree to
well under the lease (NTP/PTP), which is all the lease needs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from kvrack import _native
from kvrack.tiers.cxl_layout import OFF_LOCK

log = logging.getLogger("kvrack.tiers.cxl")
MASK32 = 0xFFFFFFFF


def now_ms32() -> int:
    return int(time.time() * 1000) & MASK32


def lock_word(host: int, pid: int, deadline_ms32: int) -> int:
    return (deadline_ms32 << 32) | ((host + 1) << 22) | (pid & 0x3FFFFF)


def lock_owner(word: int) -> tuple[int, int, int]:
    """(host, pid, deadline) of a held lock word."""
    return ((word >> 22) & 0x3FF) - 1, word & 0x3FFFFF, word >> 32


def expired(deadline_ms32: int, now: int) -> bool:
    """``now`` is at or past ``deadline`` in modulo-2**32 arithmetic (wraps every 49 days)."""
    return (now - deadline_ms32) & MASK32 < (1 << 31)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockTimeout(TimeoutError):
    """The region lock stayed held by a live owner for longer than the caller would wait."""


class RegionLock:
    """Acquire with ``with lock:``; ``renew()`` inside long critical sections."""

    def __init__(self, mm: memoryview, host: int, same_machine: Callable[[int], bool], lease_ms: int = 5000,
                 timeout_s: float = 30.0) -> None:
        self.mm = mm
        self.host = host
        self.pid = os.getpid()
        self.same_machine = same_machine  # host id -> is it on this machine (so its pid can be checked)
        self.lease_ms = lease_ms
        self.timeout_s = timeout_s
        self._local = threading.Lock()
        self._word = 0
        self.takeovers = 0

    def _load(self) -> int:
        _native.invalidate(self.mm, OFF_LOCK, 8)
        return _native.load64(self.mm, OFF_LOCK)

    def _abandoned(self, word: int, now: int) -> bool:
        host, pid, deadline = lock_owner(word)
        if expired(deadline, now):
            return True
        return self.same_machine(host) and not pid_alive(pid)

    def acquire(self) -> None:
        self._local.acquire()
        try:
            self._acquire_shared()
        except BaseException:
            self._local.release()
            raise

    def _acquire_shared(self) -> None:
        give_up = time.monotonic() + self.timeout_s
        spins = 0
        while True:
            now = now_ms32()
            mine = lock_word(self.host, self.pid, (now + self.lease_ms) & MASK32)
            cur = self._load()
            if cur == 0 or self._abandoned(cur, now):
                if _native.cas64(self.mm, OFF_LOCK, cur, mine) == cur:
                    _native.flush(self.mm, OFF_LOCK, 8)
                    if cur:
                        self.takeovers += 1
                        host, pid, _ = lock_owner(cur)
                        log.warning("cxl: took over the region lock from host %d pid %d (dead or lease expired)",
                                    host, pid)
                    self._word = mine
                    return
            spins += 1
            if time.monotonic() > give_up:
                host, pid, _ = lock_owner(cur)
                raise LockTimeout(f"cxl region lock held by host {host} pid {pid} for over {self.timeout_s:g} s")
            if spins > 64:
                time.sleep(min(0.001, 0.00001 * spins))

    def renew(self) -> None:
        """Push the lease deadline out; a holder that lost the lock (took longer than its lease) is told so."""
        mine = lock_word(self.host, self.pid, (now_ms32() + self.lease_ms) & MASK32)
        if _native.cas64(self.mm, OFF_LOCK, self._word, mine) != self._word:
            raise RuntimeError("cxl: the region lock was taken over during a long critical section")
        _native.flush(self.mm, OFF_LOCK, 8)
        self._word = mine

    def release(self) -> None:
        try:
            if _native.cas64(self.mm, OFF_LOCK, self._word, 0) != self._word:
                log.error("cxl: the region lock was taken over before release (lease %d ms too short?)", self.lease_ms)
            _native.flush(self.mm, OFF_LOCK, 8)
        finally:
            self._word = 0
            self._local.release()

    def __enter__(self) -> RegionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
