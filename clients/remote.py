"""Clients on other hosts: addresses, the TCP/TLS connection, and NIXL one-sided transfers.

A remote client speaks the same protocol as a local one; only the data path
differs. With NIXL it reads and writes the daemon's registered segments with
one-sided transfers (one transfer request per batch), after ``acquire`` or
``reserve`` as a local client does; without it, block bytes follow ``read``
and ``write`` frames on the control connection.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvrack import _native
from kvrack import protocol as P
from kvrack.address import DEFAULT_TCP_PORT, Address, parse_address  # noqa: F401  (re-exported)
from kvrack.clients.errors import DaemonUnreachable, KvrackError, RequestTimeout
from kvrack.clients.transport import kernel_timeouts


def client_tls_context(ca_file: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verifies the daemon's certificate (system CAs, or ``ca_file``); ``cert``/``key`` for mutual TLS."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def tcp_socket(host: str, port: int, timeout: float | None, tls: ssl.SSLContext | None) -> socket.socket:
    """A connected socket (no Nagle delay, keepalive; buffers autotuned by the kernel); TLS-wrapped and
    verified when ``tls`` is given."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DaemonUnreachable(message=f"cannot reach kvrackd at {host}:{port} ({exc.strerror or exc}); is "
                                        "tcp.enabled set and the port open?") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise DaemonUnreachable(message=f"TLS with {host}:{port} failed: {exc}") from exc
        sock.settimeout(timeout)  # SO_RCVTIMEO does not mix with the ssl module's own blocking
        return sock
    kernel_timeouts(sock, timeout)
    return sock


class NixlData:
    """One-sided transfers between the caller's buffers and the daemon's registered segments."""

    name = P.TRANSPORT_NIXL

    def __init__(self, timeout: float | None) -> None:
        from kvrack import nixl_agent

        self._nixl = nixl_agent
        self.agent = nixl_agent.make_agent(f"kvrack-client-{os.getpid()}-{secrets.token_hex(4)}", progress_thread=False)
        self.timeout = timeout
        self.remote_agent = ""
        self.segments: dict[int, P.RemoteSegment] = {}
        self._registered: list[tuple[int, int, Any, Any]] = []  # (start, end, reg dlist, Pinned), by the caller

    def add(self, segments: Sequence[P.RemoteSegment], metadata: bytes) -> None:
        if metadata:
            name = self.agent.add_remote_agent(metadata)
            self.remote_agent = name.decode() if isinstance(name, bytes) else name
        for seg in segments:
            self.segments[seg.segment] = seg

    def missing(self, descriptors: Sequence[P.Descriptor | None]) -> list[int]:
        return sorted({d.segment for d in descriptors if d is not None and d.segment not in self.segments})

    def register(self, buffers: Sequence[memoryview]) -> None:
        """Register buffers once (an engine's KV pool) so transfers into them skip per-call registration."""
        for view in buffers:
            pinned = self._nixl.Pinned(view)
            reg = self.agent.register_memory([(pinned.addr, pinned.nbytes, 0, "")], "DRAM")
            self._registered.append((pinned.addr, pinned.addr + pinned.nbytes, reg, pinned))

    def _covered(self, addr: int, nbytes: int) -> bool:
        for start, end, _r, _p in self._registered:
            if start <= addr and addr + nbytes <= end:
                return True
        return False

    def transfer(self, op: str, descriptors: Sequence[P.Descriptor | None], views: Sequence[memoryview | None]) -> None:
        """READ into or WRITE from ``views`` for every descriptor, as one transfer request."""
        pairs = [(d, v) for d, v in zip(descriptors, views) if d is not None and v is not None]
        if not pairs:
            return
        n = len(pairs)
        local = np.empty((n, 3), dtype=np.uint64)
        remote = np.empty((n, 3), dtype=np.uint64)
        local[:, 2] = 0
        remote[:, 2] = 0
        address = _native.address
        segments = self.segments
        for j, (d, view) in enumerate(pairs):
            local[j, 0] = address(view)
            remote[j, 0] = segments[d.segment].addr + d.offset
        local[:, 1] = remote[:, 1] = [d.length for d, _v in pairs]
        temporary: list[tuple[Any, Any]] = []
        agent = self.agent
        try:
            for j, (d, view) in enumerate(pairs):
                if not self._covered(int(local[j, 0]), d.length):
                    pinned = self._nixl.Pinned(view)
                    temporary.append((agent.register_memory([(pinned.addr, pinned.nbytes, 0, "")], "DRAM"), pinned))
            self._run(op, local, remote)
        finally:
            for reg, pinned in temporary:
                agent.deregister_memory(reg)
                pinned.release()

    def _run(self, op: str, local: np.ndarray, remote: np.ndarray) -> None:
        agent = self.agent
        handle = agent.initialize_xfer(op, agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM"),
                                       self.remote_agent)
        deadline = time.monotonic() + self.timeout if self.timeout else None
        try:
            state = agent.transfer(handle)
            polls = 0
            while state == "PROC":
                state = agent.check_xfer_state(handle)
                polls += 1
                if deadline is not None and not polls % 1024 and time.monotonic() > deadline:
                    raise RequestTimeout(message=f"NIXL {op} of {len(local)} block(s) did not finish in {self.timeout}s")
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception:  # still in flight after a timeout: the agent frees it when it closes
                pass
        if state != "DONE":
            raise KvrackError(P.ErrorCode.INTERNAL, f"NIXL {op} of {len(local)} block(s) failed ({state})")

    def close(self) -> None:
        for _start, _end, reg, pinned in self._registered:
            try:
                self.agent.deregister_memory(reg)
            except Exception:
                pass
            pinned.release()
        self._registered.clear()
        if self.remote_agent:
            try:
                self.agent.remove_remote_agent(self.remote_agent)
            except Exception:
                pass
