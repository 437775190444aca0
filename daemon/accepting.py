"""Who gets a connection, and for how long: the listeners' accept path (paused, not spinning, when file
descriptors run out), the caps on connections (all, and per local user), the hello deadline, and closing clients
that leave their replies unread. Part of ``ControlServer`` (kvrack.daemon.server)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from kvrack import protocol as P
from kvrack.daemon.connection import Connection, OutOfDescriptors, RateLimitedLog, accepted
from kvrack.daemon.session import PeerCredentials, Session
from kvrack.daemon.store import Store

if TYPE_CHECKING:
    from kvrack.daemon.server import ControlServer
    from kvrack.daemon.tcp_listener import TcpListener

log = logging.getLogger("kvrack.server")
_PEERCRED = struct.Struct("3i")
ACCEPT_PAUSE_S = 0.1  # out of file descriptors: how long a listener rests before it tries again


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one client, one user or all of them may hold of the daemon's connections and memory (server.*)."""

    hello_timeout_s: float = 10.0
    max_connections: int = 4096
    max_connections_per_uid: int = 1024
    max_queued_reply_bytes: int = 4 << 20
    max_total_queued_reply_bytes: int = 256 << 20
    stalled_client_timeout_s: float = 60.0
    max_total_partial_frame_bytes: int = 256 << 20



class Accepting:
    """The accepting side of ``ControlServer``: the attributes below are the server's."""

    loop: asyncio.AbstractEventLoop
    listener: socket.socket | None
    tcp: TcpListener | None
    connections: set[Connection]
    draining: bool
    limits: ServerLimits
    per_uid: dict[int, int]
    ratelog: RateLimitedLog
    refused: int
    accept_pauses: int
    stalled_closed: int
    store: Store
    _next_session: int

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            for sock, _addr in accepted(self.listener, "unix"):
                try:
                    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                     _PEERCRED.size))
                    peer = PeerCredentials(pid, uid, gid)
                except OSError:
                    peer = None
                self.adopt(sock, peer, None)
        except OutOfDescriptors as exc:
            self.pause_accepting(self.listener, self._accept, "unix", exc)

    def pause_accepting(self, listener: socket.socket, on_ready: Callable[[], None], what: str,
                        exc: OSError) -> None:
        """Out of file descriptors: rest the listener briefly (clients wait in its backlog, none is lost) instead of
        being called again at once, which would spin; say so at most every 10 s."""
        self.accept_pauses += 1
        self.loop.remove_reader(listener.fileno())
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.ratelog(logging.ERROR, "accept", "%s accept: %s with %d connection(s) open (file descriptor limit %d): "
                     "accepting again in %.1f s; raise LimitNOFILE or server.max_connections", what, exc.strerror,
                     len(self.connections), soft, ACCEPT_PAUSE_S)
        self.loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting, listener, on_ready)

    def _resume_accepting(self, listener: socket.socket, on_ready: Callable[[], None]) -> None:
        if listener.fileno() >= 0 and (listener is self.listener or (self.tcp is not None and listener is self.tcp.sock)):
            self.loop.add_reader(listener.fileno(), on_ready)

    def adopt(self, sock: socket.socket, peer: PeerCredentials | None, remote: str | None,
              tls: bool = False) -> Connection | None:
        """Serve a connected socket: local (peer credentials) or remote (its address; token in hello). Past the
        connection caps (all, or this user's) it gets a BUSY error and is closed."""
        if self.draining:
            sock.close()
            return None
        limits = self.limits
        uid = peer.uid if peer is not None else None
        if len(self.connections) >= limits.max_connections or (
                uid is not None and self.per_uid.get(uid, 0) >= limits.max_connections_per_uid):
            self._refuse(sock, uid)
            return None
        session = Session(self._next_session, peer, remote)
        self._next_session += 1
        conn = Connection(cast("ControlServer", self), sock, session, tls)
        self.connections.add(conn)
        if uid is not None:
            self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        self.loop.add_reader(conn.fileno, conn.on_readable)
        if remote is None:  # (TCP connections have tcp.hello_timeout_s, set by the listener)
            self.loop.call_later(limits.hello_timeout_s, self._hello_deadline, conn)
        log.debug("session %d connected: %s", session.id, remote or peer)
        return conn

    def _refuse(self, sock: socket.socket, uid: int | None) -> None:
        self.refused += 1
        mine = self.per_uid.get(uid, 0) if uid is not None else 0
        why = (f"too many connections from uid {uid} ({mine}, server.max_connections_per_uid)"
               if uid is not None and mine >= self.limits.max_connections_per_uid
               else f"too many connections ({len(self.connections)}, server.max_connections)")
        self.ratelog(logging.WARNING, "busy", "connection refused: %s", why)
        try:
            sock.send(P.encode_frame(P.ErrorReply(id=0, code=int(P.ErrorCode.BUSY), message=why)))
        except OSError:
            pass
        sock.close()

    def _hello_deadline(self, conn: Connection) -> None:
        if not conn.closed and not conn.closing and conn.session.namespace is None:
            conn.fail(P.ErrorCode.HELLO_REQUIRED, f"no hello within {self.limits.hello_timeout_s:g} s "
                                                  "(server.hello_timeout_s)")

    def close_stalled(self, now: float) -> int:
        """Close connections kept over their reply limit longer than server.stalled_client_timeout_s (their
        clients do not read), and those whose incomplete frame got no byte for as long (their clients started
        a request and stopped sending). Returns how many."""
        limit = self.limits.stalled_client_timeout_s
        stalled = [c for c in self.connections if c.over_since and now - c.over_since > limit]
        for conn in stalled:
            self.ratelog(logging.WARNING, "stalled", "session %d: %d reply bytes queued for %.0f s and its client "
                         "reads none; closing the connection", conn.session.id, conn.frame_bytes, now - conn.over_since)
            conn.close()
        # only connections the daemon reads: one it stopped reading (its replies pile up, or a reply is being
        # prepared) cannot be sent the rest of a frame, and is the first kind or none
        halted = [c for c in self.connections
                  if c.buffered and c.reading and not c.closed and now - c.last_input > limit]
        for conn in halted:
            self.ratelog(logging.WARNING, "stalled", "session %d: an incomplete frame (%d bytes) got no byte for "
                         "%.0f s; closing the connection", conn.session.id, conn.buffered, now - conn.last_input)
            conn.close()
        self.stalled_closed += len(stalled) + len(halted)
        return len(stalled) + len(halted)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        peer = conn.session.peer
        if peer is not None and conn.session.remote is None:
            left = self.per_uid.get(peer.uid, 0) - 1
            if left > 0:
                self.per_uid[peer.uid] = left
            else:
                self.per_uid.pop(peer.uid, None)
        aborted, unpinned = self.store.close_session(conn.session)
        if aborted or unpinned:
            log.info("session %d closed: %d reservation(s) aborted, %d pin(s) released", conn.session.id, aborted, unpinned)

