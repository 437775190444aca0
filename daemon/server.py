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
import itertools
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from kvrack import protocol as P
from kvrack.daemon.hbm_pool import absent_stats
from kvrack.daemon.session import PeerCredentials, Session
from kvrack.daemon.store import KeysResult, Store

if TYPE_CHECKING:
    from kvrack.daemon.cxl_pool import CxlPool
    from kvrack.daemon.hbm_pool import HbmPool
    from kvrack.daemon.nixl_export import NixlExport
    from kvrack.daemon.tcp_listener import TcpListener

log = logging.getLogger("kvrack.server")
_PEERCRED = struct.Struct("3i")
_MAX_QUEUED_OUT = 64 * 1024 * 1024  # stop reading from a client that does not read its replies
_RECV_BYTES = 1 << 20
# how long a reserve may wait for write-behind copies to NVMe to free DRAM before it says NO_SPACE
_WAIT_FOR_ROOM_S = 10.0
_IOV_MAX = 512  # buffers per gathering sendmsg (the kernel allows 1024)


def socket_answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` (a running daemon)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def accepted(listener: socket.socket, what: str) -> Iterator[tuple[socket.socket, Any]]:
    """The connections a non-blocking listener has ready (64 at most per readiness event), non-blocking."""
    for _ in range(64):
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("%s accept failed: %s", what, exc)
            return
        sock.setblocking(False)
        yield sock, addr


class Connection:
    """One client socket: input buffer, ordered output queue (bytes + fds), its session.

    A ``write`` request's block bytes follow its frame; while they arrive the
    connection is in payload mode and receives straight into the reserved slots.
    A ``read`` reply's block bytes go out from the daemon's own mapping of the
    segments with one gathering ``sendmsg`` per readiness event.
    """

    def __init__(self, server: ControlServer, sock: socket.socket, session: Session, tls: bool = False) -> None:
        self.server = server
        self.sock = sock
        self.fileno = sock.fileno()
        self.session = session
        self.tls = tls  # an ssl.SSLSocket: no sendmsg, and decrypted bytes may wait inside it
        self.inbuf = bytearray()
        # (bytes to send, fds to pass with their first byte, called once they are all sent)
        self.out: collections.deque[tuple[memoryview, tuple[int, ...], Callable[[], None] | None]] = \
            collections.deque()
        self.out_bytes = 0
        self.writing = False
        self.reading = True
        self.paused = False  # a deferred reply is being prepared: take no further request yet
        self.closing = False  # close once the output queue is flushed
        self.closed = False
        self.sink: collections.deque[memoryview | int] | None = None  # payload targets; an int is bytes to drop
        self.sink_done: Callable[[], None] | None = None

    # -------------------------------------------------------------- reading
    def on_readable(self) -> None:
        rbuf = self.server.recv_buffer
        while True:
            direct = self.sink is not None and not self.inbuf  # payload bytes: straight to their slot
            if direct:
                head = self.sink[0]  # type: ignore[index]
                target = memoryview(rbuf)[: min(head, len(rbuf))] if isinstance(head, int) else head
            else:
                target = rbuf
            try:
                n = self.sock.recv_into(target)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self.close()
                return
            if not n:
                self.close()
                return
            if direct:
                self._consume_sink(n)
            else:
                self.inbuf += rbuf[:n] if n < 4096 else memoryview(rbuf)[:n]
            self.process()
            # TLS keeps decrypted bytes inside the socket object, where readiness cannot see them
            if self.closed or not self.reading or not (self.tls and self.sock.pending()):  # type: ignore[attr-defined]
                return

    def _consume_sink(self, n: int) -> None:
        """``n`` bytes of payload were received into (or dropped for) the sink's head."""
        sink = self.sink
        assert sink is not None
        head = sink[0]
        rest = head - n if isinstance(head, int) else head[n:]
        if rest if isinstance(rest, int) else len(rest):
            sink[0] = rest
        else:
            sink.popleft()
            if not sink:
                self._sink_complete()

    def _sink_complete(self) -> None:
        done, self.sink, self.sink_done = self.sink_done, None, None
        if done is not None:
            done()

    def expect_payload(self, targets: list[memoryview | int], done: Callable[[], None]) -> None:
        """The next bytes on this connection are a payload: fill ``targets`` in order, then call ``done``."""
        targets = [t for t in targets if (t if isinstance(t, int) else len(t))]
        if not targets:
            done()
            return
        self.sink = collections.deque(targets)
        self.sink_done = done

    def _feed_sink(self, buf: bytearray, pos: int) -> int:
        """Move buffered bytes into the payload sink; returns the new read position."""
        sink = self.sink
        while sink and pos < len(buf):
            head = sink[0]
            want = head if isinstance(head, int) else len(head)
            n = min(want, len(buf) - pos)
            if not isinstance(head, int):
                head[:n] = buf[pos: pos + n]
            pos += n
            self._consume_sink(n)
            sink = self.sink
        return pos

    def process(self) -> None:
        """Dispatch every complete frame in the input buffer, until one needs a deferred reply."""
        buf = self.inbuf
        max_frame = self.server.max_frame_bytes
        pos = 0
        while not self.closing and not self.paused:
            if self.sink is not None:
                pos = self._feed_sink(buf, pos)
                if self.sink is not None:
                    break
                continue
            if len(buf) - pos < P.HEADER_BYTES:
                break
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

    def resume(self, frame: bytes, fds: tuple[int, ...], payload: list[memoryview] | None = None,
               done: Callable[[], None] | None = None) -> None:
        """The deferred reply is ready: send it, then go on with buffered and new requests."""
        if self.closed:
            return
        self.send(frame, fds, payload, done)
        self.paused = False
        self.process()
        if not (self.paused or self.closing or self.closed or self.reading or self.server.draining) \
                and self.out_bytes <= _MAX_QUEUED_OUT:
            self.reading = True
            self.server.loop.add_reader(self.fileno, self.on_readable)

    # -------------------------------------------------------------- writing
    def send(self, frame: bytes, fds: tuple[int, ...] = (), payload: list[memoryview] | None = None,
             done: Callable[[], None] | None = None) -> None:
        """Queue a frame (and block bytes after it); ``done`` runs when the last byte is out."""
        if self.closed:
            return
        if payload:
            self._queue(memoryview(frame), fds, None)
            for view in payload[:-1]:
                self._queue(view, (), None)
            self._queue(payload[-1], (), done)
        else:
            self._queue(memoryview(frame), fds, done)
        if not self.writing:
            self.flush()

    def _queue(self, data: memoryview, fds: tuple[int, ...], done: Callable[[], None] | None) -> None:
        self.out.append((data, fds, done))
        self.out_bytes += len(data)
        if self.out_bytes > _MAX_QUEUED_OUT:
            self.stop_reading()

    def _send_some(self) -> int:
        """One send call over the head of the queue; bytes sent, or -1 once the connection is closed."""
        out = self.out
        data, fds, _done = out[0]
        try:
            if fds:
                return self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            if self.tls or len(out) == 1:
                return self.sock.send(data)
            bufs = [data]
            for item in itertools.islice(out, 1, _IOV_MAX):
                if item[1]:
                    break
                bufs.append(item[0])
            return self.sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError:
            self.close()
            return -1

    def flush(self) -> None:
        """Send what the socket takes now; wait for writability if anything is left."""
        out = self.out
        while out:
            sent = self._send_some()
            if sent < 0:
                return
            if sent == 0:
                break
            self.out_bytes -= sent
            while sent:
                data, fds, done = out[0]
                if sent < len(data):
                    out[0] = (data[sent:], (), done)
                    break
                sent -= len(data)
                out.popleft()
                if done is not None:
                    done()
        loop = self.server.loop
        if out:
            if not self.writing:
                self.writing = True
                loop.add_writer(self.fileno, self.flush)
            return
        if self.writing:
            self.writing = False
            loop.remove_writer(self.fileno)
        if self.closing:
            self.close()
        elif not self.reading and not self.server.draining and not self.paused:
            self.reading = True
            loop.add_reader(self.fileno, self.on_readable)

    # -------------------------------------------------------------- closing
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        if self.reading:
            loop.remove_reader(self.fileno)
        if self.writing:
            loop.remove_writer(self.fileno)
        self.out.clear()  # pins held for unsent read payloads end with the session, below
        self.sink = None
        self.sink_done = None
        self.sock.close()
        self.server.forget(self)


class ControlServer:
    """Accepts connections and dispatches decoded requests to the store."""

    def __init__(self, store: Store, socket_path: str, max_frame_bytes: int, max_batch_keys: int,
                 socket_mode: int = 0o666, stats_extra: Callable[[], dict[str, Any]] | None = None,
                 nixl: NixlExport | None = None) -> None:
        self.store = store
        self.nixl = nixl  # remote one-sided access to the DRAM segments, when NIXL loaded
        self.cxl: CxlPool | None = None  # the CXL tier, when cxl.enabled
        self.hbm: HbmPool | None = None  # the HBM tier, when hbm.enabled and a GPU is there
        self.hbm_absent = "hbm.enabled is false"  # why there is no HBM tier, for stats
        self.tcp: TcpListener | None = None
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
        self.deferred: set[asyncio.Task[Any]] = set()
        # a handler answers (reply, fds) now, or returns a coroutine that produces them after I/O
        self._handlers: dict[type, Callable[[Connection, Any], Any]] = {
            P.Hello: self._hello, P.Lookup: self._lookup, P.Reserve: self._reserve, P.Commit: self._commit,
            P.Abort: self._abort, P.Acquire: self._acquire, P.Release: self._release, P.Delete: self._delete,
            P.MapSegments: self._map, P.Stats: self._stats, P.Read: self._read, P.Write: self._write,
            P.Prefetch: self._prefetch, P.Touch: self._touch,
        }

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            if socket_answers(path):
                raise RuntimeError(f"another kvrackd is already listening on {path}")
            os.unlink(path)  # stale socket of a daemon that did not shut down cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, self.socket_mode)
        sock.listen(512)
        sock.setblocking(False)
        self.listener = sock
        loop.add_reader(sock.fileno(), self._accept)
        if self.tcp is not None:
            self.tcp.start()

    def stop_accepting(self) -> None:
        if self.tcp is not None:
            self.tcp.stop()
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
        for sock, _addr in accepted(self.listener, "unix"):
            try:
                pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                peer = PeerCredentials(pid, uid, gid)
            except OSError:
                peer = None
            self.adopt(sock, peer, None)

    def adopt(self, sock: socket.socket, peer: PeerCredentials | None, remote: str | None,
              tls: bool = False) -> Connection | None:
        """Serve a connected socket: local (peer credentials) or remote (its address; token in hello)."""
        if self.draining:
            sock.close()
            return None
        session = Session(self._next_session, peer, remote)
        self._next_session += 1
        conn = Connection(self, sock, session, tls)
        self.connections.add(conn)
        self.loop.add_reader(conn.fileno, conn.on_readable)
        log.debug("session %d connected: %s", session.id, remote or peer)
        return conn

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
                if out is None:  # a write: the reply goes out once its payload is in
                    return
                if not isinstance(out, tuple):  # waits for I/O: answered when it is done
                    conn.pause()
                    task = self.loop.create_task(self._deferred(conn, req, out))
                    self.deferred.add(task)
                    task.add_done_callback(self.deferred.discard)
                    return
                reply, fds, *payload = out
                conn.send(P.encode_frame(reply), fds, *payload)
                return
        conn.send(P.encode_frame(reply), fds)

    @staticmethod
    def _internal_error(rid: int) -> tuple[P.Reply, tuple[int, ...]]:
        return P.ErrorReply(id=rid, code=int(P.ErrorCode.INTERNAL), message="internal error; see the daemon log"), ()

    async def _deferred(self, conn: Connection, req: Any, work: Coroutine[Any, Any, tuple[Any, ...]]) -> None:
        try:
            reply, fds, *payload = await work
        except Exception:
            log.exception("session %d: %s failed", conn.session.id, type(req).__name__)
            reply, fds = self._internal_error(req.id)
            payload = []
        conn.resume(P.encode_frame(reply), fds, *payload)

    # ------------------------------------------------------------- handlers
    def _hello(self, conn: Connection, req: P.Hello) -> tuple[P.Reply, tuple[int, ...]] | None:
        s = conn.session
        if s.namespace is not None:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.BAD_REQUEST), message="hello was already sent"), ()
        if req.version != P.PROTOCOL_VERSION:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.VERSION_MISMATCH),
                                message=f"client speaks protocol {req.version}, daemon speaks {P.PROTOCOL_VERSION}"), ()
        ns = self.store.namespaces.get(req.namespace)
        if s.remote is not None:
            return self._hello_remote(conn, req, ns)
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
        infos, fds = self._segment_infos(self.store.tier.segments_of(ns.name)[: P.MAX_FDS_PER_FRAME - 1])
        extra, cxl_fd = self._cxl_hello(ns.name)
        if cxl_fd is not None:  # the region's fd rides after the segments' fds
            fds += (cxl_fd,)
        if self.hbm is not None:  # same host: the arena's CUDA IPC handles
            extra["hbm_segments"] = self.hbm.hello_segments(ns.name)
        log.info("session %d: hello from pid %s (%s) for namespace %r", s.id, peer.pid, s.client_name or "-", ns.name)
        return self._hello_reply(req.id, ns, s, [P.TRANSPORT_SHM, P.TRANSPORT_TCP], segments=infos, **extra), fds

    def _cxl_hello(self, namespace: str) -> tuple[dict[str, Any], int | None]:
        """The hello fields naming the namespace's CXL region, and its fd (for the Unix socket)."""
        info = self.cxl.hello_info(namespace) if self.cxl is not None else None
        if info is None:
            return {}, None
        path, size, fd = info
        return {"cxl_path": path, "cxl_bytes": size, "cxl_coherent": self.cxl.coherent}, fd  # type: ignore[union-attr]

    def _hello_reply(self, rid: int, ns: Any, s: Session, transports: list[str], **extra: Any) -> P.HelloReply:
        return P.HelloReply(id=rid, namespace=ns.name, salt=ns.salt, session=s.id, transports=transports,
                            max_frame_bytes=self.max_frame_bytes, max_batch_keys=self.max_batch_keys,
                            reserve_lease_s=self.store.reserve_timeout_s, pin_lease_s=self.store.pin_timeout_s, **extra)

    def _hello_remote(self, conn: Connection, req: P.Hello, ns: Any) -> None | tuple[P.Reply, tuple[int, ...]]:
        """A TCP client proves it may use the namespace with its token; a failed hello closes the connection."""
        s = conn.session
        if ns is None or not ns.accepts_token(req.token):
            # one answer for "no such namespace", "no TCP access" and "wrong token": nothing to probe
            log.warning("session %d: %s: hello for namespace %r refused (no token or a wrong one)",
                        s.id, s.remote, req.namespace[:64])
            if not req.token:  # saying that none was given tells a prober nothing about the namespace
                conn.fail(P.ErrorCode.UNAUTHENTICATED, "no token was given: a TCP client must present its "
                          f"namespace's token (Client.connect(..., token=...) or $KVRACK_TOKEN); namespace "
                          f"{req.namespace[:64]!r}", req.id)
            else:
                conn.fail(P.ErrorCode.UNAUTHENTICATED, f"namespace {req.namespace[:64]!r} does not accept this "
                          "token (or is not open to TCP clients)", req.id)
            return None
        s.namespace = ns
        s.client_name = req.client_name[:128]
        transports = [P.TRANSPORT_TCP]
        extra: dict[str, Any] = {}
        if self.nixl is not None:
            transports.insert(0, P.TRANSPORT_NIXL)
            extra["remote_segments"], extra["nixl_metadata"] = self.nixl.export(self.store.tier.segments_of(ns.name))
        extra.update(self._cxl_hello(ns.name)[0])  # hosts on the CXL fabric open it by path: no fd over TCP
        log.info("session %d: hello from %s (%s) for namespace %r over %s", s.id, s.remote, s.client_name or "-",
                 ns.name, "TLS" if conn.tls else "TCP")
        return self._hello_reply(req.id, ns, s, transports, **extra), ()

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
        prefix, tiers = out
        if self.cxl is not None and prefix < len(req.keys):  # blocks only the CXL region still holds
            missing = [i for i, t in enumerate(tiers) if not t]
            held = [False] * len(tiers)
            for i, h in zip(missing, self.cxl.holds(conn.session.namespace.name,  # type: ignore[union-attr]
                                                     [req.keys[i] for i in missing])):
                held[i] = h
            prefix, tiers = P.with_extra_hits(tiers, held, P.TierId.CXL)
        return P.LookupReply(id=req.id, prefix=prefix, tiers=tiers), ()

    def _from_cxl(self, conn: Connection, keys: list[bytes], then: Callable[[], Any]) -> Any:
        """``then()``, after blocks the daemon's index lost but the CXL region holds are back in DRAM
        (copied off the event loop: the reply is deferred only when there is something to copy)."""
        if self.cxl is not None:
            ns = conn.session.namespace
            todo = self.cxl.promotable(ns, keys)
            if todo:
                return self._promoted_then(self.cxl.promote(ns, todo), then)
        return then()

    @staticmethod
    async def _promoted_then(work: Coroutine[Any, Any, int], then: Callable[[], Any]) -> Any:
        await work
        out = then()
        return out if isinstance(out, tuple) else await out

    def _keys_reply(self, rid: int, res: KeysResult, hbm: list[P.Descriptor | None] | None = None
                    ) -> tuple[P.Reply, tuple[int, ...]]:
        return P.KeysReply(id=rid, codes=res.codes, descriptors=res.descriptors, message=res.message,
                           hbm=hbm or []), ()

    def _reserve(self, conn: Connection, req: P.Reserve) -> Any:
        if self.draining:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.SHUTTING_DOWN), message="daemon is shutting down"), ()
        res = self.store.reserve(conn.session, req.keys, req.sizes, req.parents)
        if P.ErrorCode.NO_SPACE in res.codes and self._copiers():
            return self._reserve_when_room(conn, req, res)  # backpressure: wait for the copies, don't fail
        return self._keys_reply(req.id, res)

    def _copiers(self) -> list[Any]:
        """Tiers whose copies out of DRAM are running (their blocks are pinned until they finish)."""
        return [m for m in (self.store.mover, self.cxl) if m is not None and m.pending()]

    async def _reserve_when_room(self, conn: Connection, req: P.Reserve, res: KeysResult
                                 ) -> tuple[P.Reply, tuple[int, ...]]:
        """DRAM is full of blocks waiting for their NVMe (or CXL) copy: retry the keys that found no room
        as copies finish, so a writer faster than the copies is slowed to their speed instead of failing."""
        deadline = self.loop.time() + _WAIT_FOR_ROOM_S
        while not conn.closed and not self.draining:
            todo = [i for i, c in enumerate(res.codes) if c == P.ErrorCode.NO_SPACE]
            left = deadline - self.loop.time()
            if not todo or left <= 0:
                break
            copiers = self._copiers()
            if copiers:
                waits = [asyncio.ensure_future(c.wait_for_progress(left)) for c in copiers]
                _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
            # retry even when the wait said "nothing running": the copies may have finished between the
            # check and the wait; a retry with nothing running is the last one
            retry = self.store.reserve(conn.session, [req.keys[i] for i in todo], [req.sizes[i] for i in todo],
                                       [req.parents[i] for i in todo] if req.parents is not None else None)
            for i, code, desc in zip(todo, retry.codes, retry.descriptors):
                res.codes[i] = code
                res.descriptors[i] = desc
            self.store.counters.no_space -= len(todo) - retry.codes.count(P.ErrorCode.NO_SPACE)
            res.message = retry.message
            if not copiers:
                break
        return self._keys_reply(req.id, res)

    def _commit(self, conn: Connection, req: P.Commit) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.commit(conn.session, req.keys))

    def _abort(self, conn: Connection, req: P.Abort) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.abort(conn.session, req.keys))

    def _acquire(self, conn: Connection, req: P.Acquire) -> Any:
        return self._from_cxl(conn, req.keys, lambda: self._acquire_now(conn, req))

    def _acquire_now(self, conn: Connection, req: P.Acquire) -> Any:
        res = self.store.acquire(conn.session, req.keys)
        if res.promote:
            return self._promote_then_reply(conn, req, res)
        if self.hbm is not None and conn.session.remote is None:
            return self._acquire_reply_hbm(conn, req, res)
        return self._keys_reply(req.id, res)

    def _acquire_reply_hbm(self, conn: Connection, req: P.Acquire, res: KeysResult) -> tuple[P.Reply, tuple[int, ...]]:
        """Count the reads toward promotion into HBM, and name the HBM copies the reader may use."""
        hbm = self.hbm
        assert hbm is not None
        ns = conn.session.namespace
        entries = ns.entries  # type: ignore[union-attr]
        hbm.read([e for e in (entries.get(k) for k, d in zip(req.keys, res.descriptors) if d is not None)
                  if e is not None])
        return self._keys_reply(req.id, res, hbm.descriptors(ns.name, req.keys, res.descriptors))  # type: ignore[union-attr]

    async def _promote_then_reply(self, conn: Connection, req: P.Acquire, res: KeysResult
                                  ) -> tuple[P.Reply, tuple[int, ...]]:
        assert self.store.mover is not None
        await self.store.mover.promote(conn.session, req.keys, res, res.promote)
        return self._keys_reply(req.id, res)

    def _prefetch(self, conn: Connection, req: P.Prefetch) -> Any:
        """Start reading NVMe-only (or CXL-only) blocks into DRAM; OK per key that is, or is becoming,
        a DRAM block."""
        return self._from_cxl(conn, req.keys, lambda: self._prefetch_now(conn, req))

    def _prefetch_now(self, conn: Connection, req: P.Prefetch) -> Any:
        session = conn.session
        store = self.store
        res = store.acquire(session, req.keys)  # the pins last only as long as the promotion
        store.counters.get_keys -= len(req.keys)  # a prefetch is not a get
        store.counters.get_hits -= sum(1 for c in res.codes if c == P.ErrorCode.OK)
        store.counters.prefetch_keys += len(req.keys)
        in_dram = [k for k, d in zip(req.keys, res.descriptors) if d is not None]
        if in_dram:
            store.release(session, in_dram)
        codes = list(res.codes)
        if not res.promote:
            return P.KeysReply(id=req.id, codes=codes, message=res.message), ()
        store.counters.prefetched_blocks += len(res.promote)
        work = self._promote_and_release(session, req.id, req.keys, res)
        if req.wait:
            return work
        task = self.loop.create_task(work)
        self.deferred.add(task)
        task.add_done_callback(self.deferred.discard)
        return P.KeysReply(id=req.id, codes=codes), ()

    async def _promote_and_release(self, session: Session, rid: int, keys: list[bytes], res: KeysResult
                                   ) -> tuple[P.Reply, tuple[int, ...]]:
        assert self.store.mover is not None
        try:
            await self.store.mover.promote(session, keys, res, res.promote)
        finally:  # the mover released the keys it could not bring up; these are ours to release
            self.store.release(session, [keys[i] for i, _e in res.promote if res.descriptors[i] is not None])
        return P.KeysReply(id=rid, codes=res.codes, message=res.message), ()

    def _touch(self, conn: Connection, req: P.Touch) -> tuple[P.Reply, tuple[int, ...]]:
        """Reads a client served from the CXL mapping itself: hits for the region's eviction order."""
        if self.cxl is not None:
            self.cxl.touch(conn.session.namespace.name, req.keys)  # type: ignore[union-attr]
        return P.Reply(id=req.id), ()

    def _release(self, conn: Connection, req: P.Release) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.release(conn.session, req.keys))

    def _delete(self, conn: Connection, req: P.Delete) -> tuple[P.Reply, tuple[int, ...]]:
        res = self.store.delete(conn.session, req.keys)
        if self.cxl is not None:  # blocks that left DRAM (and NVMe) may still be in the CXL region
            ns = conn.session.namespace.name  # type: ignore[union-attr]
            for i, code in enumerate(res.codes):
                if code == P.ErrorCode.NOT_FOUND and self.cxl.delete(ns, req.keys[i]):
                    res.codes[i] = int(P.ErrorCode.OK)
        return self._keys_reply(req.id, res)

    def _map(self, conn: Connection, req: P.MapSegments) -> tuple[P.Reply, tuple[int, ...]]:
        ns = conn.session.namespace
        remote = conn.session.remote is not None
        if len(req.segments) > P.MAX_FDS_PER_FRAME:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.BAD_REQUEST),
                                message=f"map takes at most {P.MAX_FDS_PER_FRAME} segments per request"), ()
        if remote and self.nixl is None:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.BAD_REQUEST),
                                message="segments cannot be mapped over TCP without NIXL; use read and write"), ()
        segments = []
        for seg_id in req.segments:
            tier = self.store.tier_of(seg_id >> 40)
            seg = tier.segment(seg_id) if tier is not None else None
            if seg is None or seg.owner != ns.name:  # type: ignore[union-attr]
                # the same answer for "no such segment" and "another tenant's": nothing to probe
                return P.ErrorReply(id=req.id, code=int(P.ErrorCode.UNKNOWN_SEGMENT),
                                    message=f"segment {seg_id:#x} is not mappable by namespace {ns.name!r}"), ()  # type: ignore[union-attr]
            segments.append(seg)
        if remote:
            assert self.nixl is not None
            found, metadata = self.nixl.export(segments)
            return P.MapReply(id=req.id, remote_segments=found, nixl_metadata=metadata), ()
        infos, fds = self._segment_infos(segments)
        return P.MapReply(id=req.id, segments=infos), fds

    # ------------------------------------------------- TCP byte-stream data
    def _read(self, conn: Connection, req: P.Read) -> Any:
        """Pin the hits, send their bytes after the reply from the daemon's mapping, then unpin."""
        return self._from_cxl(conn, req.keys, lambda: self._read_now(conn, req))

    def _read_now(self, conn: Connection, req: P.Read) -> Any:
        res = self.store.acquire(conn.session, req.keys)
        if res.promote:
            return self._promote_then_read(conn, req, res)
        return self._read_reply(conn, req, res)

    async def _promote_then_read(self, conn: Connection, req: P.Read, res: KeysResult) -> tuple[Any, ...]:
        assert self.store.mover is not None
        await self.store.mover.promote(conn.session, req.keys, res, res.promote)
        return self._read_reply(conn, req, res)

    def _read_reply(self, conn: Connection, req: P.Read, res: KeysResult) -> tuple[Any, ...]:
        payload = []
        lengths = [0] * len(req.keys)
        for i, d in enumerate(res.descriptors):
            if d is not None:
                tier = self.store.tier_of(d.tier)
                payload.append(tier.window(tier.segment(d.segment), d.offset, d.length))  # type: ignore[union-attr]
                lengths[i] = d.length
        reply = P.ReadReply(id=req.id, codes=res.codes, lengths=lengths, message=res.message)
        pinned = [k for k, d in zip(req.keys, res.descriptors) if d is not None]
        if not pinned:
            return reply, ()
        session = conn.session
        return reply, (), payload, lambda: self.store.release(session, pinned)

    def _write(self, conn: Connection, req: P.Write) -> None | tuple[P.Reply, tuple[int, ...]]:
        """Receive block bytes into this session's reserved slots, then commit the keys that arrived whole."""
        max_block = self.store.tier.max_block_bytes
        if len(req.sizes) != len(req.keys) or any(n < 0 or n > max_block for n in req.sizes):
            # the payload's length cannot be trusted: the stream cannot be followed past it
            conn.fail(P.ErrorCode.BAD_REQUEST, f"write: one size per key, each 0..{max_block} bytes", req.id)
            return None
        session = conn.session
        targets: list[memoryview | int] = []
        codes = [int(P.ErrorCode.OK)] * len(req.keys)
        for i, (key, size) in enumerate(zip(req.keys, req.sizes)):
            held = session.reserved.get(key)
            e = held[0] if held is not None else None
            if e is None or e.nbytes != size:
                codes[i] = int(P.ErrorCode.NOT_RESERVED if e is None else P.ErrorCode.INVALID_SIZE)
                targets.append(size)  # read and dropped
            else:
                targets.append(self.store.tier.view(e.seg, e.slot, size))

        def landed() -> None:
            session.receiving = False
            ok = [k for k, c in zip(req.keys, codes) if c == P.ErrorCode.OK]
            committed = self.store.commit(session, ok)
            by_key = dict(zip(ok, committed.codes))
            final = [by_key.get(k, c) if c == P.ErrorCode.OK else c for k, c in zip(req.keys, codes)]
            conn.send(P.encode_frame(P.KeysReply(id=req.id, codes=final)))

        session.receiving = True
        conn.expect_payload(targets, landed)
        return None

    def _moves(self) -> dict[str, dict[str, int]]:
        """Blocks and bytes moved between tiers, per direction."""
        moves: dict[str, dict[str, int]] = {}
        mover = self.store.mover
        if mover is not None:
            c = mover.counters
            moves["dram_to_nvme"] = {"blocks": c.written_blocks, "bytes": c.written_bytes}
            moves["nvme_to_dram"] = {"blocks": c.promoted_blocks, "bytes": c.promoted_bytes}
        if self.cxl is not None:
            moves["dram_to_cxl"] = {"blocks": self.cxl.copied, "bytes": self.cxl.copied_bytes}
        if self.hbm is not None:
            moves["dram_to_hbm"] = {"blocks": self.hbm.promoted, "bytes": self.hbm.promoted_bytes}
        return moves

    def _stats(self, conn: Connection, req: P.Stats) -> tuple[P.Reply, tuple[int, ...]]:
        stats = self.store.stats()
        ns = conn.session.namespace
        # a client sees its own namespace's figures only
        stats["namespaces"] = {ns.name: stats["namespaces"][ns.name]}  # type: ignore[union-attr]
        stats["server"] = {"sessions": len(self.connections), "requests": self.requests}
        if self.cxl is not None:
            stats["tiers"].append(self.cxl.stats(ns.name))  # type: ignore[union-attr]
        stats["tiers"].append(self.hbm.stats(ns.name) if self.hbm is not None  # type: ignore[union-attr]
                              else absent_stats(self.hbm_absent))
        stats["moves"] = self._moves()
        if self.stats_extra is not None:
            stats.update(self.stats_extra())
        return P.StatsReply(id=req.id, stats=stats), ()
