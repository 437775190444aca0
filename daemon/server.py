"""The control server: length-prefixed msgspec frames on a Unix socket.

Connections are plain non-blocking sockets driven by the event loop's
readiness callbacks rather than asyncio transports, because some replies
carry segment fds (SCM_RIGHTS) and must go out in order with the frame they
belong to. A bad frame gets an error reply; a frame that cannot be parsed or
is too large also closes that one connection. Nothing a client sends reaches
past its own session.

Most requests are answered inside the readiness callback. A request that must
wait for I/O (a get of a block whose only copy is on NVMe) returns a coroutine
instead; its connection then stops taking requests until that reply is out,
so each connection still sees its replies, and their effects, in order, while
other connections go on being served.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from kvrack.daemon import protocol as P
from kvrack.daemon.session import PeerCredentials, Session
from kvrack.daemon.store import KeysResult, Store

log = logging.getLogger("kvrack.server")
_PEERCRED = struct.Struct("3i")
_MAX_QUEUED_OUT = 64 * 1024 * 1024  # stop reading from a client that does not read its replies
_RECV_BYTES = 1 << 20
# how long a reserve may wait for write-behind copies to NVMe to free DRAM before it says NO_SPACE
_WAIT_FOR_ROOM_S = 10.0


class Connection:
    """One client socket: input buffer, ordered output queue (bytes + fds), its session."""

    def __init__(self, server: ControlServer, sock: socket.socket, session: Session) -> None:
        self.server = server
        self.sock = sock
        self.fileno = sock.fileno()
        self.session = session
        self.inbuf = bytearray()
        self.out: collections.deque[tuple[memoryview, tuple[int, ...]]] = collections.deque()
        self.out_bytes = 0
        self.reading = True
        self.paused = False  # a deferred reply is being prepared: take no further request yet
        self.closing = False  # close once the output queue is flushed
        self.closed = False

    # -------------------------------------------------------------- reading
    def on_readable(self) -> None:
        rbuf = self.server.recv_buffer
        try:
            n = self.sock.recv_into(rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:
            self.close()
            return
        self.inbuf += rbuf[:n] if n < 4096 else memoryview(rbuf)[:n]
        self.process()

    def process(self) -> None:
        """Dispatch every complete frame in the input buffer, until one needs a deferred reply."""
        buf = self.inbuf
        max_frame = self.server.max_frame_bytes
        pos = 0
        while len(buf) - pos >= P.HEADER_BYTES and not self.closing and not self.paused:
            (n,) = P.HEADER.unpack_from(buf, pos)
            if n > max_frame:
                self.fail(P.ErrorCode.FRAME_TOO_LARGE, f"frame of {n} bytes exceeds server.max_frame_bytes={max_frame}")
                break
            end = pos + P.HEADER_BYTES + n
            if len(buf) < end:
                break
            body = bytes(buf[pos + P.HEADER_BYTES : end])
            pos = end
            self.server.dispatch(self, body)
        if pos:
            del buf[:pos]

    def fail(self, code: P.ErrorCode, message: str, rid: int = 0) -> None:
        """Say why, then close this connection only."""
        log.warning("session %d: %s: %s; closing the connection", self.session.id, code.name, message)
        self.send(P.encode_frame(P.ErrorReply(id=rid, code=int(code), message=message)))
        self.closing = True
        self.stop_reading()
        if not self.out:
            self.close()

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fileno)

    def pause(self) -> None:
        self.paused = True
        self.stop_reading()

    def resume(self, frame: bytes, fds: tuple[int, ...]) -> None:
        """The deferred reply is ready: send it, then go on with buffered and new requests."""
        if self.closed:
            return
        self.send(frame, fds)
        self.paused = False
        self.process()
        if not (self.paused or self.closing or self.closed or self.reading or self.server.draining) \
                and self.out_bytes <= _MAX_QUEUED_OUT:
            self.reading = True
            self.server.loop.add_reader(self.fileno, self.on_readable)

    # -------------------------------------------------------------- writing
    def send(self, frame: bytes, fds: tuple[int, ...] = ()) -> None:
        if self.closed:
            return
        if self.out:
            self._queue(memoryview(frame), fds)
            return
        sent = self._send_now(memoryview(frame), fds)
        if sent < 0:
            return
        if sent < len(frame):
            self._queue(memoryview(frame)[sent:], fds if sent == 0 else ())
            self.server.loop.add_writer(self.fileno, self.on_writable)

    def _send_now(self, data: memoryview, fds: tuple[int, ...]) -> int:
        try:
            if fds:
                return self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.close()
            return -1

    def _queue(self, data: memoryview, fds: tuple[int, ...]) -> None:
        self.out.append((data, fds))
        self.out_bytes += len(data)
        if self.out_bytes > _MAX_QUEUED_OUT:
            self.stop_reading()

    def on_writable(self) -> None:
        while self.out:
            data, fds = self.out[0]
            sent = self._send_now(data, fds)
            if sent < 0:
                return
            self.out_bytes -= sent
            if sent < len(data):
                self.out[0] = (data[sent:], fds if sent == 0 else ())
                return
            self.out.popleft()
        self.server.loop.remove_writer(self.fileno)
        if self.closing:
            self.close()
        elif not self.reading and not self.server.draining and not self.paused:
            self.reading = True
            self.server.loop.add_reader(self.fileno, self.on_readable)

    # -------------------------------------------------------------- closing
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        if self.reading:
            loop.remove_reader(self.fileno)
        if self.out:
            loop.remove_writer(self.fileno)
        self.out.clear()
        self.sock.close()
        self.server.forget(self)


class ControlServer:
    """Accepts connections and dispatches decoded requests to the store."""

    def __init__(self, store: Store, socket_path: str, max_frame_bytes: int, max_batch_keys: int,
                 socket_mode: int = 0o666, stats_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store = store
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.max_batch_keys = max_batch_keys
        self.socket_mode = socket_mode
        self.stats_extra = stats_extra
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.listener: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.recv_buffer = bytearray(_RECV_BYTES)  # one loop thread: one reusable receive buffer
        self.draining = False
        self._next_session = 1
        self.requests = 0
        self.deferred: set[asyncio.Task[None]] = set()
        # a handler answers (reply, fds) now, or returns a coroutine that produces them after I/O
        self._handlers: dict[type, Callable[[Connection, Any], Any]] = {
            P.Hello: self._hello, P.Lookup: self._lookup, P.Reserve: self._reserve, P.Commit: self._commit,
            P.Abort: self._abort, P.Acquire: self._acquire, P.Release: self._release, P.Delete: self._delete,
            P.MapSegments: self._map, P.Stats: self._stats,
        }

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a daemon that did not shut down cleanly
            else:
                raise RuntimeError(f"another kvrackd is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, self.socket_mode)
        sock.listen(512)
        sock.setblocking(False)
        self.listener = sock
        loop.add_reader(sock.fileno(), self._accept)

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def begin_drain(self) -> None:
        """Stop taking new requests; replies already queued still go out."""
        self.draining = True
        for conn in list(self.connections):
            conn.stop_reading()

    def pending_output(self) -> int:
        return sum(c.out_bytes for c in self.connections)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                peer = PeerCredentials(pid, uid, gid)
            except OSError:
                peer = None
            session = Session(self._next_session, peer)
            self._next_session += 1
            conn = Connection(self, sock, session)
            self.connections.add(conn)
            self.loop.add_reader(conn.fileno, conn.on_readable)
            log.debug("session %d connected: %s", session.id, peer)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        aborted, unpinned = self.store.close_session(conn.session)
        if aborted or unpinned:
            log.info("session %d closed: %d reservation(s) aborted, %d pin(s) released", conn.session.id, aborted, unpinned)

    # ------------------------------------------------------------- dispatch
    def dispatch(self, conn: Connection, body: bytes) -> None:
        self.requests += 1
        try:
            req = P.request_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            rid, code, message = P.describe_decode_error(body, exc)
            if code == P.ErrorCode.BAD_FRAME:
                conn.fail(code, message, rid)
            else:
                conn.send(P.encode_frame(P.ErrorReply(id=rid, code=int(code), message=message)))
            return
        if conn.session.namespace is None and not isinstance(req, P.Hello):
            reply: P.Reply = P.ErrorReply(id=req.id, code=int(P.ErrorCode.HELLO_REQUIRED),
                                          message="the first request on a connection must be hello")
            fds: tuple[int, ...] = ()
        else:
            keys = getattr(req, "keys", None)
            if keys is not None and len(keys) > self.max_batch_keys:
                reply, fds = P.ErrorReply(id=req.id, code=int(P.ErrorCode.BATCH_TOO_LARGE),
                                          message=f"{len(keys)} keys exceed server.max_batch_keys="
                                                  f"{self.max_batch_keys}"), ()
            else:
                try:
                    out = self._handlers[type(req)](conn, req)
                except Exception:  # a bug must cost one request, never the daemon
                    log.exception("session %d: %s failed", conn.session.id, type(req).__name__)
                    out = self._internal_error(req.id)
                if not isinstance(out, tuple):  # waits for I/O: answered when it is done
                    conn.pause()
                    task = self.loop.create_task(self._deferred(conn, req, out))
                    self.deferred.add(task)
                    task.add_done_callback(self.deferred.discard)
                    return
                reply, fds = out
        conn.send(P.encode_frame(reply), fds)

    @staticmethod
    def _internal_error(rid: int) -> tuple[P.Reply, tuple[int, ...]]:
        return P.ErrorReply(id=rid, code=int(P.ErrorCode.INTERNAL), message="internal error; see the daemon log"), ()

    async def _deferred(self, conn: Connection, req: Any,
                        work: Coroutine[Any, Any, tuple[P.Reply, tuple[int, ...]]]) -> None:
        try:
            reply, fds = await work
        except Exception:
            log.exception("session %d: %s failed", conn.session.id, type(req).__name__)
            reply, fds = self._internal_error(req.id)
        conn.resume(P.encode_frame(reply), fds)

    # ------------------------------------------------------------- handlers
    def _hello(self, conn: Connection, req: P.Hello) -> tuple[P.Reply, tuple[int, ...]]:
        s = conn.session
        if s.namespace is not None:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.BAD_REQUEST), message="hello was already sent"), ()
        if req.version != P.PROTOCOL_VERSION:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.VERSION_MISMATCH),
                                message=f"client speaks protocol {req.version}, daemon speaks {P.PROTOCOL_VERSION}"), ()
        ns = self.store.namespaces.get(req.namespace)
        if ns is None:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.UNKNOWN_NAMESPACE),
                                message=f"no namespace {req.namespace!r} is configured"), ()
        peer = s.peer
        if peer is None or not ns.allows(peer.uid, peer.groups()):
            who = f"uid {peer.uid} gid {peer.gid}" if peer else "a peer without credentials"
            log.warning("session %d: %s denied namespace %r", s.id, who, ns.name)
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.PERMISSION_DENIED),
                                message=f"{who} may not use namespace {ns.name!r}"), ()
        s.namespace = ns
        s.client_name = req.client_name[:128]
        # a first batch of the namespace's segments; the client maps the rest on first use (map)
        infos, fds = self._segment_infos(self.store.tier.segments_of(ns.name)[: P.MAX_FDS_PER_FRAME])
        log.info("session %d: hello from pid %s (%s) for namespace %r", s.id, peer.pid, s.client_name or "-", ns.name)
        return P.HelloReply(id=req.id, namespace=ns.name, salt=ns.salt, session=s.id, segments=infos,
                            max_frame_bytes=self.max_frame_bytes, max_batch_keys=self.max_batch_keys,
                            reserve_lease_s=self.store.reserve_timeout_s, pin_lease_s=self.store.pin_timeout_s), fds

    def _segment_infos(self, segments: list[Any]) -> tuple[list[P.SegmentInfo], tuple[int, ...]]:
        infos = []
        fds = []
        for seg in segments:
            if isinstance(seg.handle, int):
                infos.append(P.SegmentInfo(seg.id, int(seg.tier), seg.size))
                fds.append(seg.handle)
        return infos, tuple(fds)

    def _lookup(self, conn: Connection, req: P.Lookup) -> tuple[P.Reply, tuple[int, ...]]:
        out = self.store.lookup(conn.session.namespace, req.keys)  # type: ignore[arg-type]
        if isinstance(out, str):
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.INVALID_KEY), message=out), ()
        return P.LookupReply(id=req.id, prefix=out[0], tiers=out[1]), ()

    def _keys_reply(self, rid: int, res: KeysResult) -> tuple[P.Reply, tuple[int, ...]]:
        return P.KeysReply(id=rid, codes=res.codes, descriptors=res.descriptors, message=res.message), ()

    def _reserve(self, conn: Connection, req: P.Reserve) -> Any:
        if self.draining:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.SHUTTING_DOWN), message="daemon is shutting down"), ()
        res = self.store.reserve(conn.session, req.keys, req.sizes, req.parents)
        mover = self.store.mover
        if mover is not None and mover.pending() and P.ErrorCode.NO_SPACE in res.codes:
            return self._reserve_when_room(conn, req, res)  # backpressure: wait for NVMe, don't fail
        return self._keys_reply(req.id, res)

    async def _reserve_when_room(self, conn: Connection, req: P.Reserve, res: KeysResult
                                 ) -> tuple[P.Reply, tuple[int, ...]]:
        """DRAM is full of blocks waiting for their NVMe copy: retry the keys that found no room as
        write batches finish, so a writer faster than the disk is slowed to its speed instead of failing."""
        mover = self.store.mover
        assert mover is not None
        deadline = self.loop.time() + _WAIT_FOR_ROOM_S
        while not conn.closed and not self.draining:
            todo = [i for i, c in enumerate(res.codes) if c == P.ErrorCode.NO_SPACE]
            left = deadline - self.loop.time()
            if not todo or left <= 0 or not await mover.wait_for_progress(left):
                break
            retry = self.store.reserve(conn.session, [req.keys[i] for i in todo], [req.sizes[i] for i in todo],
                                       [req.parents[i] for i in todo] if req.parents is not None else None)
            for i, code, desc in zip(todo, retry.codes, retry.descriptors):
                res.codes[i] = code
                res.descriptors[i] = desc
            self.store.counters.no_space -= len(todo) - retry.codes.count(P.ErrorCode.NO_SPACE)
            res.message = retry.message
        return self._keys_reply(req.id, res)

    def _commit(self, conn: Connection, req: P.Commit) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.commit(conn.session, req.keys))

    def _abort(self, conn: Connection, req: P.Abort) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.abort(conn.session, req.keys))

    def _acquire(self, conn: Connection, req: P.Acquire) -> Any:
        res = self.store.acquire(conn.session, req.keys)
        if res.promote:
            return self._promote_then_reply(conn, req, res)
        return self._keys_reply(req.id, res)

    async def _promote_then_reply(self, conn: Connection, req: P.Acquire, res: KeysResult
                                  ) -> tuple[P.Reply, tuple[int, ...]]:
        assert self.store.mover is not None
        await self.store.mover.promote(conn.session, req.keys, res, res.promote)
        return self._keys_reply(req.id, res)

    def _release(self, conn: Connection, req: P.Release) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.release(conn.session, req.keys))

    def _delete(self, conn: Connection, req: P.Delete) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.delete(conn.session, req.keys))

    def _map(self, conn: Connection, req: P.MapSegments) -> tuple[P.Reply, tuple[int, ...]]:
        ns = conn.session.namespace
        if len(req.segments) > P.MAX_FDS_PER_FRAME:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.BAD_REQUEST),
                                message=f"map takes at most {P.MAX_FDS_PER_FRAME} segments per request"), ()
        segments = []
        for seg_id in req.segments:
            tier = self.store.tier_of(seg_id >> 40)
            seg = tier.segment(seg_id) if tier is not None else None
            if seg is None or seg.owner != ns.name:  # type: ignore[union-attr]
                # the same answer for "no such segment" and "another tenant's": nothing to probe
                return P.ErrorReply(id=req.id, code=int(P.ErrorCode.UNKNOWN_SEGMENT),
                                    message=f"segment {seg_id:#x} is not mappable by namespace {ns.name!r}"), ()  # type: ignore[union-attr]
            segments.append(seg)
        infos, fds = self._segment_infos(segments)
        return P.MapReply(id=req.id, segments=infos), fds

    def _stats(self, conn: Connection, req: P.Stats) -> tuple[P.Reply, tuple[int, ...]]:
        stats = self.store.stats()
        ns = conn.session.namespace
        # a client sees its own namespace's figures only
        stats["namespaces"] = {ns.name: stats["namespaces"][ns.name]}  # type: ignore[union-attr]
        stats["server"] = {"sessions": len(self.connections), "requests": self.requests}
        if self.stats_extra is not None:
            stats.update(self.stats_extra())
        return P.StatsReply(id=req.id, stats=stats), ()
