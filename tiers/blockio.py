"""Block I/O for the NVMe tier: O_DIRECT files or block devices, aligned buffers, fault injection.

A preallocated file on a local NVMe file system and a raw block device
(`/dev/nvmeXnY`, which is also what an NVMe-oF namespace attached by the
kernel initiator looks like) are driven by the same code: positional
O_DIRECT reads and writes of aligned buffers, then ``fdatasync`` so that
data is durable before the index entry that names it is committed.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

ALIGN = 4096  # logical block size we align to; covers 512 B and 4 KiB devices


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory, as O_DIRECT needs."""
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN))


class BlockFile(Protocol):
    """What the tier needs of its medium; the fault-injecting wrapper implements it too."""

    path: str
    capacity: int

    def pwrite(self, buf: memoryview | mmap.mmap, offset: int) -> int: ...

    def pread_into(self, buf: memoryview | mmap.mmap, offset: int) -> int: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class DirectFile:
    """One backing file or block device opened with O_DIRECT."""

    def __init__(self, path: str, capacity: int, create: bool = True) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC
        exists = os.path.exists(path)
        if not exists and not create:
            raise FileNotFoundError(errno.ENOENT, f"backing file {path} is missing")
        if not exists:
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise FileNotFoundError(errno.ENOENT, f"directory {parent} for the NVMe tier does not exist")
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise OSError(exc.errno, f"{path}: the file system does not support O_DIRECT") from None
            raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        self.is_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        try:
            if self.is_device:
                size = os.lseek(self.fd, 0, os.SEEK_END)
                if capacity <= 0 or capacity > size:
                    capacity = size  # a device's capacity is its size unless configured smaller
            else:
                capacity = capacity // ALIGN * ALIGN
                current = os.fstat(self.fd).st_size
                if current < capacity:
                    # reserve the blocks now: a full disk shows at start-up, not in the middle of a put
                    os.posix_fallocate(self.fd, 0, capacity)
                elif current > capacity:
                    capacity = current // ALIGN * ALIGN  # never shrink a file that may hold blocks
        except OSError as exc:
            os.close(self.fd)
            raise OSError(exc.errno, f"cannot size {path} to {capacity} bytes: {exc.strerror}") from None
        self.capacity = capacity

    def _check(self, nbytes: int, offset: int) -> None:
        if offset % ALIGN or nbytes % ALIGN:
            raise ValueError(f"unaligned I/O: offset {offset}, length {nbytes} (alignment {ALIGN})")
        if offset + nbytes > self.capacity:
            raise ValueError(f"I/O past the end of {self.path}: {offset}+{nbytes} > {self.capacity}")

    def pwrite(self, buf: memoryview | mmap.mmap, offset: int) -> int:
        return self._transfer(os.pwritev, buf, offset)

    def pread_into(self, buf: memoryview | mmap.mmap, offset: int) -> int:
        return self._transfer(os.preadv, buf, offset)

    def _transfer(self, call: Callable[[int, list[memoryview], int], int], buf: memoryview | mmap.mmap,
                  offset: int) -> int:
        """The whole buffer, resuming short transfers; one that moves nothing means the file ends early."""
        n = len(buf)
        self._check(n, offset)
        done = 0
        view = memoryview(buf)
        while done < n:
            got = call(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path} ends at {offset + done}: truncated behind our back?")
            done += got
        return done

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FaultPlan:
    """Which faults to inject; shared by the wrappers of one test, changeable while running."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.write_errno = 0
        self.read_errno = 0
        self.sync_errno = 0
        self.delay_s = 0.0
        self.fail_after_writes: int | None = None  # writes that still succeed before write_errno applies
        self.torn_writes = False  # a failing write first writes the first half of its bytes (a torn write)
        self.writes = 0

    def refresh(self) -> None:
        """Take in changes made from outside (``FileFaultPlan``); nothing for a plan set in-process."""


class FileFaultPlan(FaultPlan):
    """A plan read from a JSON file and re-read when the file changes (``nvme.fault_plan``), so that a test can
    inject faults into a running daemon: ``{"write_errno": "EIO", "delay_s": 0.2, "torn_writes": true}``
    (errno names or numbers; a missing file or field means no fault)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.refresh_lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """A stat per I/O call (a test path): a change takes effect at the next call of every thread."""
        with self.refresh_lock:  # one thread takes a change in; the others wait for it, never act on the old plan
            try:
                st = os.stat(self.path)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self.stamp:
                return
            values: dict[str, Any] = {}
            if stamp is not None:
                import json

                try:
                    with open(self.path, encoding="utf-8") as fh:
                        values = json.load(fh)
                except (OSError, ValueError):
                    return  # being rewritten: the next call takes it
            with self.lock:
                for name in ("write_errno", "read_errno", "sync_errno"):
                    value = values.get(name, 0)
                    setattr(self, name, getattr(errno, value) if isinstance(value, str) else int(value or 0))
                self.delay_s = float(values.get("delay_s", 0.0) or 0.0)
                after = values.get("fail_after_writes")
                self.fail_after_writes = None if after is None else int(after)
                self.torn_writes = bool(values.get("torn_writes", False))
            self.stamp = stamp


class FaultyFile:
    """A ``BlockFile`` that fails or slows down on request (EIO, ENOSPC, slow I/O) for reliability tests."""

    def __init__(self, inner: BlockFile, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.path = inner.path
        self.capacity = inner.capacity

    def _maybe_fail(self, code: int, what: str) -> None:
        if self.plan.delay_s:
            time.sleep(self.plan.delay_s)
        if code:
            raise OSError(code, f"injected {errno.errorcode.get(code, code)} on {what} of {self.path}")

    def pwrite(self, buf: memoryview | mmap.mmap, offset: int) -> int:
        self.plan.refresh()
        with self.plan.lock:
            self.plan.writes += 1
            after = self.plan.fail_after_writes
            code = self.plan.write_errno if after is None or self.plan.writes > after else 0
            torn = self.plan.torn_writes
        if code and torn:  # the first half reaches the medium, then the write fails
            half = (len(buf) // 2) // ALIGN * ALIGN
            if half:
                self.inner.pwrite(memoryview(buf)[:half], offset)
        self._maybe_fail(code, "write")
        return self.inner.pwrite(buf, offset)

    def pread_into(self, buf: memoryview | mmap.mmap, offset: int) -> int:
        self.plan.refresh()
        self._maybe_fail(self.plan.read_errno, "read")
        return self.inner.pread_into(buf, offset)

    def sync(self) -> None:
        self.plan.refresh()
        self._maybe_fail(self.plan.sync_errno, "sync")
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()
