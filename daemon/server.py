"""The control server: accepts connections, decodes requests and dispatches them to the store.

Framing, output queues and payloads are each connection's (``kvrack.daemon.connection``); the block logic is
the store's. A handler answers ``(reply, fds)`` at once, or returns a coroutine when the store must wait for
a copy from another tier; its connection then takes no further request until that reply is out. Nothing a
client sends reaches past its own session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from kvrack import protocol as P
from kvrack.daemon.accepting import Accepting, ServerLimits
from kvrack.daemon.connection import RECV_BYTES, Connection, RateLimitedLog, socket_answers
from kvrack.daemon.opstats import OpStats
from kvrack.daemon.session import Session
from kvrack.daemon.store import KeysResult, Store

if TYPE_CHECKING:
    from kvrack.daemon.nixl_export import NixlExport
    from kvrack.daemon.stats import StatsRegistry
    from kvrack.daemon.tcp_listener import TcpListener

log = logging.getLogger("kvrack.server")
Answer = tuple[Any, ...]
_now_ns = time.perf_counter_ns
# request type -> the op name in stats and metrics
OP_NAMES: dict[type, str] = {cls: cls.__name__.lower().replace("segments", "") for cls in (
    P.Hello, P.Lookup, P.Reserve, P.Commit, P.Abort, P.Acquire, P.Release, P.Delete, P.MapSegments, P.Stats,
    P.Read, P.Write, P.Prefetch, P.Touch)}
TRANSPORTS = (P.TRANSPORT_SHM, P.TRANSPORT_NIXL, P.TRANSPORT_TCP)
class ControlServer(Accepting):
    """Accepts connections and dispatches decoded requests to the store."""

    def __init__(self, store: Store, socket_path: str, max_frame_bytes: int, max_batch_keys: int,
                 socket_mode: int = 0o666, registry: StatsRegistry | None = None,
                 nixl: NixlExport | None = None, limits: ServerLimits | None = None) -> None:
        self.store = store
        self.nixl = nixl  # remote one-sided access to the DRAM segments, when NIXL loaded
        self.tcp: TcpListener | None = None
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.max_batch_keys = max_batch_keys
        self.socket_mode = socket_mode
        self.registry = registry
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.listener: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.recv_buffer = bytearray(RECV_BYTES)  # one loop thread: one reusable receive buffer
        self.draining = False
        self.limits = limits or ServerLimits()
        self.queued_frame_bytes = 0  # reply frames queued on all connections (Connection.frame_bytes)
        self.partial_frame_bytes = 0  # incomplete request frames buffered on all connections (Connection.buffered)
        self.per_uid: dict[int, int] = {}  # connections per local user
        self.ratelog = RateLimitedLog(log)
        self.refused = 0  # connections turned away: too many (BUSY)
        self.accept_pauses = 0  # times accepting paused for want of file descriptors
        self.stalled_closed = 0  # connections closed for not reading their replies
        self._next_session = 1
        self.requests = 0
        self.deferred: set[asyncio.Task[Any]] = set()
        self.opstats = OpStats()
        # block bytes clients wrote ("in": committed) and were handed ("out": acquired or read), by transport
        self.transfers: dict[str, dict[str, int]] = {"in": dict.fromkeys(TRANSPORTS, 0),
                                                     "out": dict.fromkeys(TRANSPORTS, 0)}
        # a handler answers (reply, fds[, payload, done]) now, or returns a coroutine that produces them after I/O
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
        """Admit no new clients and no new puts (reserve answers SHUTTING_DOWN); requests on open connections
        go on, so readers finish and writers commit what they reserved."""
        self.draining = True

    def quiet(self) -> bool:
        """Nothing in flight: no reservation or pin held, no request waiting on I/O, no reply still queued."""
        if self.deferred or self.pending_output():
            return False
        return not any(c.session.reserved or c.session.pins or c.session.receiving for c in self.connections)

    def pending_output(self) -> int:
        return sum(c.out_bytes for c in self.connections)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close()

    def stats(self, namespace: str | None = None) -> dict[str, int]:
        """The ``server`` section of the stats."""
        return {"sessions": len(self.connections), "requests": self.requests, "in_flight": self.in_flight(),
                "draining": int(self.draining), "queued_reply_bytes": self.queued_frame_bytes,
                "partial_frame_bytes": self.partial_frame_bytes,
                "refused_connections": self.refused, "accept_pauses": self.accept_pauses,
                "stalled_closed": self.stalled_closed}

    def in_flight(self) -> int:
        """Requests started and not yet answered: deferred ones and writes whose bytes are still arriving."""
        return len(self.deferred) + sum(1 for c in self.connections if c.session.receiving)

    def transfer_stats(self, namespace: str | None = None) -> dict[str, dict[str, int]]:
        """Bytes in and out by transport, all namespaces together (none in a tenant's view)."""
        if namespace is not None:
            return {}
        return {direction: dict(by) for direction, by in self.transfers.items()}

    def _account(self, conn: Connection, req: Any, reply: Any, started_ns: int) -> None:
        """One answered request in the op stats; bytes handed out in the transfer counters."""
        self.opstats.record(OP_NAMES[type(req)], _now_ns() - started_ns, reply.code, getattr(reply, "codes", None))
        if type(reply) is P.KeysReply and reply.descriptors:
            out = self.transfers["out"]
            transport = P.TRANSPORT_SHM if conn.session.remote is None else P.TRANSPORT_NIXL
            out[transport] += sum(d.length for d in reply.descriptors if d is not None)
        elif type(reply) is P.ReadReply:
            self.transfers["out"][P.TRANSPORT_TCP] += sum(reply.lengths)

    # ------------------------------------------------------------- dispatch
    def dispatch(self, conn: Connection, body: bytes) -> None:
        started = _now_ns()
        self.requests += 1
        try:
            req = P.request_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            rid, code, message = P.describe_decode_error(body, exc)
            self.opstats.record("invalid", _now_ns() - started, int(code))
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
                    task = self.loop.create_task(self._deferred(conn, req, out, started))
                    self.deferred.add(task)
                    task.add_done_callback(self.deferred.discard)
                    return
                reply, fds, *payload = out
                conn.send(P.encode_frame(reply), fds, *payload)
                self._account(conn, req, reply, started)
                return
        conn.send(P.encode_frame(reply), fds)
        self._account(conn, req, reply, started)

    @staticmethod
    def _internal_error(rid: int) -> tuple[P.Reply, tuple[int, ...]]:
        return P.ErrorReply(id=rid, code=int(P.ErrorCode.INTERNAL), message="internal error; see the daemon log"), ()

    async def _deferred(self, conn: Connection, req: Any, work: Coroutine[Any, Any, Answer], started: int) -> None:
        try:
            reply, fds, *payload = await work
        except Exception:
            log.exception("session %d: %s failed", conn.session.id, type(req).__name__)
            reply, fds = self._internal_error(req.id)
            payload = []
        conn.resume(P.encode_frame(reply), fds, *payload)
        self._account(conn, req, reply, started)

    def _then(self, out: KeysResult | Coroutine[Any, Any, KeysResult], reply: Callable[[KeysResult], Answer]) -> Any:
        """``reply(result)`` now, or a coroutine producing it once the store's result is ready."""
        if isinstance(out, KeysResult):
            return reply(out)
        return self._await_then(out, reply)

    @staticmethod
    async def _await_then(work: Coroutine[Any, Any, KeysResult], reply: Callable[[KeysResult], Answer]) -> Answer:
        return reply(await work)

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
            self.ratelog(logging.WARNING, "denied", "session %d: %s denied namespace %r", s.id, who, ns.name)
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.PERMISSION_DENIED),
                                message=f"{who} may not use namespace {ns.name!r}"), ()
        s.namespace = ns
        s.client_name = req.client_name[:128]
        # a first batch of the namespace's segments; the client maps the rest on first use (map)
        infos, fds = self._segment_infos(self.store.tier.segments_of(ns.name)[: P.MAX_FDS_PER_FRAME - 1])
        extra, more_fds = self.store.movement.hello(ns, local=True)  # e.g. the CXL region's fd, after the segments'
        log.info("session %d: hello from pid %s (%s) for namespace %r", s.id, peer.pid, s.client_name or "-", ns.name)
        return self._hello_reply(req.id, ns, s, [P.TRANSPORT_SHM, P.TRANSPORT_TCP], segments=infos, **extra), \
            fds + tuple(more_fds)

    def _hello_reply(self, rid: int, ns: Any, s: Session, transports: list[str], **extra: Any) -> P.HelloReply:
        return P.HelloReply(id=rid, namespace=ns.name, salt=ns.salt, session=s.id, transports=transports,
                            max_frame_bytes=self.max_frame_bytes, max_batch_keys=self.max_batch_keys,
                            reserve_lease_s=self.store.reserve_timeout_s, pin_lease_s=self.store.pin_timeout_s, **extra)

    def _hello_remote(self, conn: Connection, req: P.Hello, ns: Any) -> None | tuple[P.Reply, tuple[int, ...]]:
        """A TCP client proves it may use the namespace with its token; a failed hello closes the connection."""
        s = conn.session
        if ns is None or not ns.accepts_token(req.token):
            # one answer for "no such namespace", "no TCP access" and "wrong token": nothing to probe
            self.ratelog(logging.WARNING, "token", "session %d: %s: hello for namespace %r refused (no token or a "
                         "wrong one)", s.id, s.remote, req.namespace[:64])
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
        extra.update(self.store.movement.hello(ns, local=False)[0])  # a CXL region by path: no fd over TCP
        log.info("session %d: hello from %s (%s) for namespace %r over %s", s.id, s.remote, s.client_name or "-",
                 ns.name, "TLS" if conn.tls else "TCP")
        return self._hello_reply(req.id, ns, s, transports, **extra), ()

    @staticmethod
    def _segment_infos(segments: list[Any]) -> tuple[list[P.SegmentInfo], tuple[int, ...]]:
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

    @staticmethod
    def _keys_reply(rid: int, res: KeysResult) -> tuple[P.Reply, tuple[int, ...]]:
        return P.KeysReply(id=rid, codes=res.codes, descriptors=res.descriptors, message=res.message,
                           hbm=res.hbm or []), ()

    def _reserve(self, conn: Connection, req: P.Reserve) -> Any:
        if self.draining:
            return P.ErrorReply(id=req.id, code=int(P.ErrorCode.SHUTTING_DOWN), message="daemon is shutting down"), ()
        out = self.store.reserve_or_wait(conn.session, req.keys, req.sizes, req.parents,
                                         still_wanted=lambda: not conn.closed and not self.draining)
        return self._then(out, lambda res: self._keys_reply(req.id, res))

    def _commit(self, conn: Connection, req: P.Commit) -> tuple[P.Reply, tuple[int, ...]]:
        counters = self.store.counters
        before = counters.put_bytes
        res = self.store.commit(conn.session, req.keys)
        transport = P.TRANSPORT_SHM if conn.session.remote is None else P.TRANSPORT_NIXL
        self.transfers["in"][transport] += counters.put_bytes - before
        return self._keys_reply(req.id, res)

    def _abort(self, conn: Connection, req: P.Abort) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.abort(conn.session, req.keys))

    def _acquire(self, conn: Connection, req: P.Acquire) -> Any:
        out = self.store.read(conn.session, req.keys, local=conn.session.remote is None)
        return self._then(out, lambda res: self._keys_reply(req.id, res))

    def _prefetch(self, conn: Connection, req: P.Prefetch) -> Any:
        """Start reading NVMe-only (or CXL-only) blocks into DRAM; OK per key that is, or is becoming,
        a DRAM block."""
        bring = self.store.movement.promotable(conn.session.namespace, req.keys)  # type: ignore[arg-type]
        if bring:
            return self._prefetch_after(conn, req, bring)
        return self._prefetch_now(conn, req)

    async def _prefetch_after(self, conn: Connection, req: P.Prefetch, bring: list[Any]) -> Answer:
        for tier, todo in bring:
            await tier.promote_keys(conn.session.namespace, todo)
        out = self._prefetch_now(conn, req)
        return out if isinstance(out, tuple) else await out

    def _prefetch_now(self, conn: Connection, req: P.Prefetch) -> Any:
        res, work = self.store.prefetch(conn.session, req.keys)
        reply = P.KeysReply(id=req.id, codes=res.codes, message=res.message if work is None else ""), ()
        if work is None:
            return reply
        if req.wait:
            return self._await_reply(work, lambda: (P.KeysReply(id=req.id, codes=res.codes, message=res.message), ()))
        task = self.loop.create_task(work)
        self.deferred.add(task)
        task.add_done_callback(self.deferred.discard)
        return reply

    @staticmethod
    async def _await_reply(work: Coroutine[Any, Any, None], reply: Callable[[], Answer]) -> Answer:
        await work
        return reply()

    def _touch(self, conn: Connection, req: P.Touch) -> tuple[P.Reply, tuple[int, ...]]:
        """Reads a client served from the CXL mapping itself: hits for the region's eviction order."""
        self.store.touch(conn.session.namespace, req.keys)  # type: ignore[arg-type]
        return P.Reply(id=req.id), ()

    def _release(self, conn: Connection, req: P.Release) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.release(conn.session, req.keys))

    def _delete(self, conn: Connection, req: P.Delete) -> tuple[P.Reply, tuple[int, ...]]:
        return self._keys_reply(req.id, self.store.delete(conn.session, req.keys))

    def _map(self, conn: Connection, req: P.MapSegments) -> tuple[P.Reply, tuple[int, ...]]:
        ns = conn.session.namespace
        assert ns is not None
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
            if seg is None or seg.owner != ns.name:
                # the same answer for "no such segment" and "another tenant's": nothing to probe
                return P.ErrorReply(id=req.id, code=int(P.ErrorCode.UNKNOWN_SEGMENT),
                                    message=f"segment {seg_id:#x} is not mappable by namespace {ns.name!r}"), ()
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
        out = self.store.read(conn.session, req.keys, local=False)
        return self._then(out, lambda res: self._read_reply(conn, req, res))

    def _read_reply(self, conn: Connection, req: P.Read, res: KeysResult) -> Answer:
        payload = []
        lengths = [0] * len(req.keys)
        for i, d in enumerate(res.descriptors):
            if d is not None:
                tier = self.store.tier_of(d.tier)
                seg = tier.segment(d.segment) if tier is not None else None
                assert tier is not None and seg is not None
                payload.append(tier.window(seg, d.offset, d.length))
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
        started = _now_ns()
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
            before = self.store.counters.put_bytes
            committed = self.store.commit(session, ok)
            self.transfers["in"][P.TRANSPORT_TCP] += self.store.counters.put_bytes - before
            by_key = dict(zip(ok, committed.codes))
            final = [by_key.get(k, c) if c == P.ErrorCode.OK else c for k, c in zip(req.keys, codes)]
            reply = P.KeysReply(id=req.id, codes=final)
            conn.send(P.encode_frame(reply))
            self._account(conn, req, reply, started)

        session.receiving = True
        conn.expect_payload(targets, landed)
        return None

    def _stats(self, conn: Connection, req: P.Stats) -> tuple[P.Reply, tuple[int, ...]]:
        """The registry's figures, a client seeing its own namespace's only."""
        ns = conn.session.namespace
        assert ns is not None and self.registry is not None
        return P.StatsReply(id=req.id, stats=self.registry.snapshot(ns.name)), ()
