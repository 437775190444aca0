"""Shared fixtures: real kvrackd subprocesses and a raw protocol connection for bad-input tests."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
from pathlib import Path

import msgspec
import pytest

from kvrack import protocol as P
from kvrack.bench.spawn import DaemonProcess

# DRAM-only: these tests pin down DRAM-tier semantics; tests/test_nvme_daemon.py runs both tiers
# (and no background eviction: these tests count on the whole capacity holding blocks)
SMALL = {"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB", "nvme.enabled": "false",
         "dram.evict_high_watermark": "1.0"}


def send_frame(sock: socket.socket, obj) -> None:
    """One request by hand (any map, well-formed or not), length-prefixed."""
    body = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack("<I", len(body)) + body)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None when the daemon hung up first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict | None:
    """One reply as a dict, or None when the daemon closed the connection."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    body = recv_exact(sock, struct.unpack("<I", head)[0])
    return None if body is None else msgspec.msgpack.decode(body)


def hugetlbfs_mount(pages: int) -> tuple[str | None, str]:
    """A writable hugetlbfs mount with at least ``pages`` free huge pages (KVRACK_TEST_HUGETLBFS names one),
    or (None, why not): a machine needs vm.nr_hugepages and a mount for these tests, which skip without."""
    candidates = [os.environ["KVRACK_TEST_HUGETLBFS"]] if os.environ.get("KVRACK_TEST_HUGETLBFS") else []
    try:
        with open("/proc/mounts") as fh:
            candidates += [line.split()[1] for line in fh if line.split()[2:3] == ["hugetlbfs"]]
    except OSError:
        pass
    for path in candidates:
        if not (os.path.isdir(path) and os.access(path, os.W_OK)):
            continue
        st = os.statvfs(path)
        if st.f_bsize != 2 << 20:
            continue  # the tests are sized in 2 MiB pages
        if st.f_blocks == 0 or st.f_bavail >= pages:  # f_blocks 0: no size= limit; the pool decides
            free = _free_huge_pages()
            if free >= pages:
                return path, ""
            return None, f"{path} is hugetlbfs but only {free} huge pages are free, {pages} needed (vm.nr_hugepages)"
    return None, ("no writable hugetlbfs mount of 2 MiB pages (e.g. `sysctl vm.nr_hugepages=64; mount -t hugetlbfs none /mnt/huge`, "
                  "or KVRACK_TEST_HUGETLBFS=DIR)")


def _free_huge_pages() -> int:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("HugePages_Free:"))
    except (OSError, StopIteration):
        return 0


@pytest.fixture
def free_huge_pages():
    """At least 16 free 2 MiB huge pages in the pool (memfd MFD_HUGETLB needs no mount); skips without."""
    free = _free_huge_pages()
    if free < 16:
        pytest.skip(f"{free} free huge pages, 16 needed (sysctl vm.nr_hugepages=64)")
    return free


@pytest.fixture
def hugetlbfs_dir(tmp_path):
    """A fresh directory on hugetlbfs (64 free 2 MiB pages at least), removed after; skips without one."""
    mount, why = hugetlbfs_mount(64)
    if mount is None:
        pytest.skip(why)
    path = os.path.join(mount, f"kvrack-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    setattr(item, "rep_" + outcome.get_result().when, outcome.get_result())


@pytest.fixture(autouse=True)
def daemon_logs_on_failure(request):
    """Every daemon a test started leaves its log here when it stops (its temporary directory goes); the
    logs are printed, and so shown by pytest, only when the test failed. And every daemon must have ended
    cleanly: exit status 0 when it was stopped (not killed), and no traceback in its log (a handler bug answers
    INTERNAL and goes on, which a test looking only at replies would miss). A test that provokes tracebacks on
    purpose says so with ``@pytest.mark.daemon_tracebacks``."""
    DaemonProcess.logs = []
    yield
    logs, DaemonProcess.logs = DaemonProcess.logs, None
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for where, text, _rc, _how in logs:
            print(f"----- kvrackd log ({where}) -----\n{text}")
        return
    if rep is None or not rep.passed:
        return
    tracebacks_ok = request.node.get_closest_marker("daemon_tracebacks") is not None
    for where, text, rc, how in logs:
        if how == "stop" and rc not in (0, None):
            pytest.fail(f"kvrackd ({where}) exited with {rc}:\n{text[-4000:]}")
        if not tracebacks_ok and "Traceback (most recent call last)" in text:
            pytest.fail(f"kvrackd ({where}) logged a traceback:\n{text[-6000:]}")


@pytest.fixture
def daemon():
    d = DaemonProcess(SMALL)
    try:
        yield d
    finally:
        d.stop()


class RawConn:
    """Speaks frames by hand, so tests can send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.fds: list[int] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj) -> None:
        body = msgspec.msgpack.encode(obj)
        self.sock.sendall(struct.pack("<I", len(body)) + body)

    def recv(self) -> dict | None:
        """One reply as a dict, or None when the daemon closed the connection."""
        head = self._exact(4)
        if head is None:
            return None
        (n,) = struct.unpack("<I", head)
        body = self._exact(n)
        return msgspec.msgpack.decode(body)

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            data, anc, _f, _a = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(64 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
            if not data:
                return None
            buf += data
        return buf

    def hello(self, namespace: str = "default") -> dict:
        self.send({"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION, "namespace": namespace})
        return self.recv()

    def close(self) -> None:
        """Closing twice is harmless."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        self.sock.close()


@pytest.fixture
def raw(daemon):
    conns: list[RawConn] = []

    def connect() -> RawConn:
        c = RawConn(daemon.socket_path)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


def eventually(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll a condition, bounded in time; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


@pytest.fixture
def region_path(tmp_path):
    """Where a test's CXL region file goes (/dev/shm when writable), removed after the test."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    path = base / f"kvrack-test-cxl-{os.getpid()}-{tmp_path.name}"
    yield str(path)
    path.unlink(missing_ok=True)
