"""One client connection of the control server: framing, an ordered output queue, and block-byte payloads.

Connections are plain non-blocking sockets driven by the event loop's
readiness callbacks rather than asyncio transports, because some replies
carry segment fds (SCM_RIGHTS) and must go out in order with the frame they
belong to. A bad frame gets an error reply; a frame that cannot be parsed or
is too large also closes that one connection.

A request that must wait for I/O pauses its connection until that reply is out,
so each connection sees its replies, and their effects, in order, while other
connections go on being served.
"""

from __future__ import annotations

import array
import collections
import errno
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kvrack import protocol as P
from kvrack.daemon.session import Session

if TYPE_CHECKING:
    from kvrack.daemon.server import ControlServer

log = logging.getLogger("kvrack.server")
MAX_QUEUED_OUT = 64 * 1024 * 1024  # queued bytes, block payloads included, past which a connection is not read
PRE_HELLO_FRAME_BYTES = 64 * 1024  # a connection that has not said hello sends no larger frame
RECV_BYTES = 1 << 20
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


class OutOfDescriptors(OSError):
    """accept() failed for want of file descriptors (or kernel memory): the listener must pause, or it spins."""


_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def accepted(listener: socket.socket, what: str) -> Iterator[tuple[socket.socket, Any]]:
    """The connections a non-blocking listener has ready (64 at most per readiness event), non-blocking. Out of
    file descriptors: ``OutOfDescriptors`` (the pending connections stay in the backlog)."""
    for _ in range(64):
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                raise OutOfDescriptors(exc.errno, exc.strerror) from None
            log.error("%s accept failed: %s", what, exc)  # one connection's trouble (ECONNABORTED): go on
            continue
        sock.setblocking(False)
        yield sock, addr


class RateLimitedLog:
    """One log line per ``every_s`` for a recurring condition, with how many times it happened in between: hostile
    or broken clients cannot fill the log."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return
        self.last[key] = now
        skipped = self.suppressed.pop(key, 0)
        self.logger.log(level, msg + (f" ({skipped} more like it in the last {self.every_s:g} s)" if skipped else ""),
                        *args)


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
        # (bytes, fds to pass with their first byte, called once all are sent, whether the bytes are a reply frame
        # built for this client, which costs daemon memory, rather than a view of block bytes in a tier)
        self.out: collections.deque[tuple[memoryview, tuple[int, ...], Callable[[], None] | None, bool]] = \
            collections.deque()
        self.out_bytes = 0
        self.frame_bytes = 0  # of out_bytes, reply frames (daemon memory), bounded by server.max_queued_reply_bytes
        self.over_since = 0.0  # when it went over its reply limit (its client stopped reading), else 0
        self.in_process = False  # dispatching buffered frames now (a reply sent meanwhile must not re-enter)
        self.buffered = 0  # bytes of an incomplete request frame held in inbuf (server.partial_frame_bytes)
        self.last_input = time.monotonic()  # when bytes last arrived (a frame left incomplete: close_stalled)
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
            self.last_input = time.monotonic()
            if direct:
                self._consume_sink(n)
            else:
                self.inbuf += rbuf[:n] if n < 4096 else memoryview(rbuf)[:n]
            self.process()
            if self._account_partial():
                return
            # TLS keeps decrypted bytes inside the socket object, where readiness cannot see them
            if self.closed or not self.reading or not (self.tls and self.sock.pending()):  # type: ignore[attr-defined]
                return

    def _account_partial(self) -> bool:
        """Count what stays in the input buffer (an incomplete frame) against server.max_total_partial_frame_bytes;
        a connection that takes the total past it is closed. Whether it was."""
        n = len(self.inbuf) if not self.closed else 0
        server = self.server
        server.partial_frame_bytes += n - self.buffered
        self.buffered = n
        limit = server.limits.max_total_partial_frame_bytes
        if n and server.partial_frame_bytes > limit and not self.closing:
            self.fail(P.ErrorCode.FRAME_TOO_LARGE, f"{server.partial_frame_bytes} bytes of incomplete frames are "
                      f"buffered across connections (server.max_total_partial_frame_bytes = {limit}); this "
                      f"connection's {n} are dropped")
            server.partial_frame_bytes -= self.buffered
            self.buffered = 0
            self.inbuf = bytearray()
            return True
        return False

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
        self.in_process = True
        try:
            self._process()
        finally:
            self.in_process = False
        if not (self.reading or self.paused or self.closing or self.closed or self.writing) and not self.over_limit():
            self.over_since = 0.0  # it had stopped over its limit, and its replies went out meanwhile
            self.start_reading()

    def _process(self) -> None:
        buf = self.inbuf
        max_frame = self.server.max_frame_bytes
        pos = 0
        while not self.closing and not self.paused:
            if self.frame_bytes and self.over_limit():  # its client reads no replies: take no more requests
                self.over_since = self.over_since or time.monotonic()
                if self.reading:
                    self.stop_reading()
                break
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
            if n > PRE_HELLO_FRAME_BYTES and self.session.namespace is None:
                self.fail(P.ErrorCode.FRAME_TOO_LARGE, f"frame of {n} bytes before hello (at most "
                          f"{PRE_HELLO_FRAME_BYTES} until the connection has said hello)")
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
        """Say why, then close this connection only (logged at most once per 10 s per code: hostile traffic cannot
        fill the log; ``errors`` in the stats counts every one)."""
        self.server.ratelog(logging.WARNING, code.name, "session %d: %s: %s; closing the connection", self.session.id,
                            code.name, message)
        self.send(P.encode_frame(P.ErrorReply(id=rid, code=int(code), message=message)))
        self.closing = True
        self.stop_reading()
        if not self.out:
            self.close()

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fileno)

    def start_reading(self) -> None:
        """Read again; an incomplete frame's stall clock (close_stalled) restarts, since while the daemon did
        not read, no byte could arrive."""
        self.reading = True
        self.last_input = time.monotonic()
        self.server.loop.add_reader(self.fileno, self.on_readable)

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
        if not (self.paused or self.closing or self.closed or self.reading) and not self.over_limit():
            self.start_reading()

    # -------------------------------------------------------------- writing
    def send(self, frame: bytes, fds: tuple[int, ...] = (), payload: list[memoryview] | None = None,
             done: Callable[[], None] | None = None) -> None:
        """Queue a frame (and block bytes after it); ``done`` runs when the last byte is out."""
        if self.closed:
            return
        if payload:
            self._queue(memoryview(frame), fds, None, True)
            for view in payload[:-1]:
                self._queue(view, (), None, False)
            self._queue(payload[-1], (), done, False)
        else:
            self._queue(memoryview(frame), fds, done, True)
        if not self.writing:
            self.flush()

    def _queue(self, data: memoryview, fds: tuple[int, ...], done: Callable[[], None] | None, frame: bool) -> None:
        self.out.append((data, fds, done, frame))
        n = len(data)
        self.out_bytes += n
        if frame:
            self.frame_bytes += n
            self.server.queued_frame_bytes += n
        if self.reading and self.over_limit():
            self.stop_reading()
            self.over_since = self.over_since or time.monotonic()

    def over_limit(self) -> bool:
        """Too much queued for a client that is not reading: this connection's replies past its limit, all
        connections' past theirs (then every connection with replies queued waits), or block bytes past 64 MiB."""
        limits = self.server.limits
        return self.frame_bytes > limits.max_queued_reply_bytes or self.out_bytes > MAX_QUEUED_OUT or (
            self.frame_bytes > 0 and self.server.queued_frame_bytes > limits.max_total_queued_reply_bytes)

    def _send_some(self) -> int:
        """One send call over the head of the queue; bytes sent, or -1 once the connection is closed."""
        out = self.out
        data, fds, _done, _frame = out[0]
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
                data, fds, done, frame = out[0]
                n = min(sent, len(data))
                if frame:
                    self.frame_bytes -= n
                    self.server.queued_frame_bytes -= n
                if sent < len(data):
                    out[0] = (data[sent:], (), done, frame)
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
        elif not self.reading and not self.paused and not self.over_limit():  # (a drain goes on reading)
            self.over_since = 0.0
            if self.inbuf and not self.in_process:  # requests that arrived while it was over its limit
                self.process()
                if self.closed or self.reading or self.paused or self.over_limit():
                    return
            self.start_reading()

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
        self.server.queued_frame_bytes -= self.frame_bytes
        self.frame_bytes = 0
        self.server.partial_frame_bytes -= self.buffered
        self.buffered = 0
        self.inbuf = bytearray()
        self.out.clear()  # pins held for unsent read payloads end with the session, below
        self.sink = None
        self.sink_done = None
        self.sock.close()
        self.server.forget(self)
