"""Client-side framing over the Unix socket (segment fds arriving beside frames), TCP and TLS."""

from __future__ import annotations

import array
import asyncio
import functools
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvrack import protocol as P
from kvrack.clients.errors import ConnectionLost, DaemonUnreachable, RequestTimeout, error_for

_ANC_BYTES = socket.CMSG_SPACE(256 * 4)
_RECV_BYTES = 1 << 20
_IOV_BATCH = 512  # destinations per scattering receive (the kernel takes up to IOV_MAX = 1024)


class FrameBuffer:
    """Sans-I/O frame reassembly: feed bytes and fds, take whole frames."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self, data: bytes | memoryview, ancdata: list[tuple[int, int, bytes]]) -> None:
        self.buf += data
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)

    def received(self, buf: bytearray, n: int, ancdata: list[tuple[int, int, bytes]]) -> None:
        """Take one ``recvmsg_into`` result; zero bytes means the daemon hung up."""
        if not n:
            self.close_fds()
            raise ConnectionLost(message="kvrackd closed the connection")
        self.feed(memoryview(buf)[:n], ancdata)

    def next_frame(self) -> bytes | None:
        buf = self.buf
        if len(buf) < P.HEADER_BYTES:
            return None
        (n,) = P.HEADER.unpack_from(buf)
        end = P.HEADER_BYTES + n
        if len(buf) < end:
            return None
        body = bytes(buf[P.HEADER_BYTES : end])
        del buf[:end]
        return body

    def take_into(self, view: memoryview) -> int:
        """Move already received bytes (block bytes that came in with a frame) into ``view``; how many."""
        got = min(len(view), len(self.buf))
        if got:
            view[:got] = self.buf[:got]
            del self.buf[:got]
        return got

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


_decoders = {op: msgspec.msgpack.Decoder(t) for op, t in P.REPLY_TYPES.items()}
_error_decoder = msgspec.msgpack.Decoder(P.ErrorReply)


def decode_reply(op: str, body: bytes) -> P.Reply:
    """Decode a reply; a non-OK overall code becomes ``KvrackError``."""
    try:
        reply = _decoders[op].decode(body)
    except msgspec.ValidationError:
        reply = _error_decoder.decode(body)  # an error reply lacks the op's fields' shapes
    if reply.code != 0:
        raise error_for(reply.code, reply.message)
    return reply


def unix_socket(path: str, timeout: float | None) -> socket.socket:
    """A connected, blocking socket; ``timeout`` bounds each send and receive in the kernel.

    A Python-level timeout (``settimeout``) would turn every receive into poll() plus a
    non-blocking read, which costs more than the daemon's whole reply on the latency path;
    SO_RCVTIMEO/SO_SNDTIMEO give the same bound with one syscall.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonUnreachable(message=f"no kvrackd listening on {path} ({exc.strerror})") from exc
    kernel_timeouts(sock, timeout)
    return sock


def kernel_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """Blocking mode, each send and receive bounded by ``timeout`` in the kernel (SO_RCVTIMEO/SO_SNDTIMEO)."""
    sock.settimeout(None)
    if timeout:
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def is_listening(path: str, timeout: float = 1.0) -> bool:
    """Whether a kvrackd accepts connections on ``path``."""
    try:
        unix_socket(path, timeout).close()
    except (ConnectionError, OSError):
        return False
    return True


class SyncChannel:
    """One request in flight at a time; the reply's fds come back with it.

    After sending, the channel polls for the reply without sleeping for up to
    ``spin_us`` microseconds before it blocks: a small request's reply usually
    comes back within that time, and not going to sleep saves the wake-up,
    which on virtual machines costs about as much as the daemon's whole work.
    ``spin_us=0`` blocks at once (no CPU spent waiting).
    """

    tls = False

    def __init__(self, sock: socket.socket, spin_us: float = 50.0) -> None:
        self.sock = sock
        self.frames = FrameBuffer()
        self.rbuf = bytearray(_RECV_BYTES)
        self.spin_ns = int(spin_us * 1000)
        self.posted: list[str] = []  # ops sent whose replies have not been read yet, oldest first
        self.requests = 0  # requests sent on this connection

    def post(self, op: str, frame: bytes) -> None:
        """Send a request whose reply nobody waits for (a release): it is read, and dropped, before the
        next reply. The daemon handles requests in order, so the op takes effect before any later one."""
        self.requests += 1
        try:
            self.sock.sendall(frame)
        except BlockingIOError:
            raise RequestTimeout(message=f"kvrackd did not take {op} in time") from None
        self.posted.append(op)

    def _recv_once(self, flags: int) -> tuple[int, list[tuple[int, int, bytes]]]:
        n, anc, _flags, _addr = self.sock.recvmsg_into([self.rbuf], _ANC_BYTES, flags)
        return n, anc

    def _receive(self) -> None:
        if self.spin_ns:
            deadline = time.perf_counter_ns() + self.spin_ns
            while True:
                try:
                    n, anc = self._recv_once(socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter_ns() < deadline:
                        continue
                    break
                self.frames.received(self.rbuf, n, anc)
                return
        n, anc = self._recv_once(0)
        self.frames.received(self.rbuf, n, anc)

    def call(self, op: str, frame: bytes) -> tuple[P.Reply, list[int]]:
        try:
            self.sock.sendall(frame)
            return self._reply(op)
        except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
            raise RequestTimeout(message=f"kvrackd did not answer {op} in time") from None

    def _send_all(self, parts: list[memoryview]) -> None:
        if self.tls:
            for part in parts:
                self.sock.sendall(part)
            return
        while parts:
            sent = self.sock.sendmsg(parts[:512])
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if sent:
                parts[0] = parts[0][sent:]

    def call_write(self, op: str, frame: bytes, payload: list[memoryview]) -> tuple[P.Reply, list[int]]:
        """Send a frame and the block bytes after it, then wait for the reply."""
        try:
            self._send_all([memoryview(frame), *payload])
            return self._reply(op)
        except BlockingIOError:
            raise RequestTimeout(message=f"kvrackd did not answer {op} in time") from None

    def call_read(self, op: str, frame: bytes, sinks: Callable[[P.Reply], list[memoryview]]) -> tuple[P.Reply, list[int]]:
        """Send a frame; the reply is followed by block bytes, which go where ``sinks(reply)`` says, in order."""
        try:
            self.sock.sendall(frame)
            reply, fds = self._reply(op)
            rest = []
            for view in sinks(reply):
                got = self.frames.take_into(view)  # what came in with the reply's frame first
                if got < len(view):
                    rest.append(view[got:])
            if rest:
                self._recv_blocks(rest)
            return reply, fds
        except BlockingIOError:
            raise RequestTimeout(message=f"kvrackd did not send the {op} bytes in time") from None

    def _recv_blocks(self, views: list[memoryview]) -> None:
        """Fill ``views`` in order from the socket: one scattering ``recvmsg_into`` over as many of them as the
        kernel takes at once, so that a batch of small blocks costs a few system calls, not one per block."""
        i = 0
        while i < len(views):
            n = self.sock.recvmsg_into(views[i: i + _IOV_BATCH])[0]
            if not n:
                raise ConnectionLost(message="kvrackd closed the connection in the middle of a read")
            while i < len(views) and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]

    def _reply(self, op: str) -> tuple[P.Reply, list[int]]:
        self.requests += 1
        frames = self.frames
        while True:
            body = frames.next_frame()
            if body is None:
                self._receive()
            elif self.posted:  # the reply to an earlier posted request: per-key codes nobody needs
                self.posted.pop(0)
                for fd in frames.take_fds():
                    os.close(fd)
            else:
                return decode_reply(op, body), frames.take_fds()

    def close(self) -> None:
        self.frames.close_fds()
        self.sock.close()


class StreamChannel(SyncChannel):
    """The same over TCP or TLS: no fds, and block bytes may follow a frame (``read``/``write`` ops).

    Payloads go from and to the caller's buffers directly: a gathering ``sendmsg``
    of the frame and the blocks, and ``recv_into`` each destination.
    """

    def __init__(self, sock: socket.socket, spin_us: float = 50.0, tls: bool = False) -> None:
        super().__init__(sock, 0.0 if tls else spin_us)  # a TLS socket cannot poll with MSG_DONTWAIT
        self.tls = tls

    def _recv_once(self, flags: int) -> tuple[int, list[tuple[int, int, bytes]]]:
        return self.sock.recv_into(self.rbuf, 0, flags), []  # no ancillary data on TCP

    def _recv_blocks(self, views: list[memoryview]) -> None:
        if not self.tls:
            super()._recv_blocks(views)
            return
        for view in views:  # an SSL socket has no recvmsg_into: one destination at a time
            got = 0
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if not n:
                    raise ConnectionLost(message="kvrackd closed the connection in the middle of a read")
                got += n


class AsyncChannel:
    """The same over asyncio, for the Unix socket (fds read with ``recvmsg_into``), TCP and TLS.

    Readiness callbacks rather than asyncio transports, so that SCM_RIGHTS can
    be read and block bytes can go straight from and into the caller's buffers.
    """

    def __init__(self, sock: socket.socket, tls: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.tls = tls
        self.unix = sock.family == socket.AF_UNIX
        self.frames = FrameBuffer()
        self.rbuf = bytearray(_RECV_BYTES)
        self.lock = asyncio.Lock()
        self.requests = 0  # requests sent on this connection

    async def _wait(self, add: Callable[..., Any], remove: Callable[..., Any]) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        add(self.sock.fileno(), wake)
        try:
            await fut
        finally:
            remove(self.sock.fileno())

    async def when_ready(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` once the socket lets it through (TLS may need to write to read, or read to write)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return fn()
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                await self._wait(loop.add_reader, loop.remove_reader)
            except ssl.SSLWantWriteError:
                await self._wait(loop.add_writer, loop.remove_writer)

    async def _send_all(self, parts: list[memoryview]) -> None:
        sock = self.sock
        while parts:
            head = parts[:1] if self.tls else parts[:512]
            def send(head: list[memoryview] = head) -> int:
                return sock.send(head[0]) if self.tls else sock.sendmsg(head)

            sent = await self.when_ready(send)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if sent:
                parts[0] = parts[0][sent:]

    def _recv_frame_bytes(self) -> None:
        if self.unix:
            n, anc, _flags, _addr = self.sock.recvmsg_into([self.rbuf], _ANC_BYTES)
            self.frames.received(self.rbuf, n, anc)
        else:
            self.frames.received(self.rbuf, self.sock.recv_into(self.rbuf), [])

    async def _reply(self, op: str) -> tuple[P.Reply, list[int]]:
        self.requests += 1
        frames = self.frames
        while True:
            body = frames.next_frame()
            if body is not None:
                return decode_reply(op, body), frames.take_fds()
            await self.when_ready(self._recv_frame_bytes)

    async def call(self, op: str, frame: bytes) -> tuple[P.Reply, list[int]]:
        async with self.lock:
            await self._send_all([memoryview(frame)])
            return await self._reply(op)

    async def call_write(self, op: str, frame: bytes, payload: list[memoryview]) -> tuple[P.Reply, list[int]]:
        async with self.lock:
            await self._send_all([memoryview(frame), *payload])
            return await self._reply(op)

    async def call_read(self, op: str, frame: bytes, sinks: Callable[[P.Reply], list[memoryview]]
                        ) -> tuple[P.Reply, list[int]]:
        async with self.lock:
            await self._send_all([memoryview(frame)])
            reply, fds = await self._reply(op)
            for view in sinks(reply):
                got = self.frames.take_into(view)
                while got < len(view):
                    n = await self.when_ready(functools.partial(self.sock.recv_into, view[got:]))
                    if not n:
                        raise ConnectionLost(message="kvrackd closed the connection in the middle of a read")
                    got += n
            return reply, fds

    def close(self) -> None:
        self.frames.close_fds()
        self.sock.close()
