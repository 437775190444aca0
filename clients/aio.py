"""The asyncio client: the same operations as ``Client``, awaitable."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from kvrack.clients.buffers import byte_view
from kvrack.clients.core import ClientCore, LeaseViews, LookupResult, PutResult, Step, check_put
from kvrack.clients.remote import Address, client_tls_context, parse_address
from kvrack.clients.transport import AsyncChannel
from kvrack.daemon import protocol as P
from kvrack.daemon.settings import default_socket_path


class AsyncLease(LeaseViews):
    """Pinned blocks as zero-copy read-only views; the pins end when ``async with`` exits."""

    def __init__(self, client: AsyncClient, keys: list[bytes], views: list[memoryview | None]) -> None:
        super().__init__(keys, views)
        self._client = client

    async def release(self) -> None:
        keys = self._end()
        if keys:
            await self._client._run(self._client._core.keys_op("release", P.Release, keys))

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def _tcp_channel(host: str, port: int, tls: ssl.SSLContext | None) -> AsyncChannel:
    """A connected non-blocking TCP socket (TLS handshake done and verified) wrapped in a channel."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _name, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
    except OSError as exc:
        raise ConnectionError(f"cannot reach kvrackd at {host}:{port} ({exc.strerror or exc})") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if tls is None:
        return AsyncChannel(sock)
    tls_sock = tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    channel = AsyncChannel(tls_sock, tls=True)
    try:
        await channel.when_ready(tls_sock.do_handshake)
    except (OSError, ssl.SSLError) as exc:
        channel.close()
        raise ConnectionError(f"TLS with {host}:{port} failed: {exc}") from None
    return channel


class AsyncClient:
    """A connection to kvrackd for asyncio code. Requests on one client are serialised."""

    def __init__(self, channel: AsyncChannel, core: ClientCore) -> None:
        self._channel = channel
        self._core = core

    @classmethod
    async def connect(cls, address: str | None = None, namespace: str = "default", client_name: str = "", *,
                      token: str | None = None, transport: str | None = None,
                      tls: ssl.SSLContext | bool | None = None, timeout: float | None = 30.0) -> AsyncClient:
        """As ``Client.connect``: ``unix:///path``, ``tcp://host:port`` or ``tls://host:port``."""
        where = parse_address(address, default_socket_path()) if address else Address("unix", default_socket_path())
        token = token if token is not None else os.environ.get("KVRACK_TOKEN", "")
        transport = transport or os.environ.get("KVRACK_TRANSPORT", "auto")
        if where.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, where.path), timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise ConnectionError(f"no kvrackd listening on {where.path} ({exc.strerror})") from None
            channel = AsyncChannel(sock)
        else:
            if where.scheme == "tls" and not tls:
                tls = True
            ctx = client_tls_context() if tls is True else (tls or None)
            channel = await asyncio.wait_for(_tcp_channel(where.host, where.port, ctx), timeout)
        core = ClientCore(namespace, client_name, token, transport, remote=where.scheme != "unix", data_timeout=timeout)
        client = cls(channel, core)
        try:
            await client._run(client._core.hello())
        except BaseException:
            client.close()
            raise
        return client

    async def _run(self, gen: Step) -> Any:
        channel = self._channel
        call = channel.call
        try:
            op, req = next(gen)
            while True:
                if op == "sleep":
                    await asyncio.sleep(req)
                    op, req = gen.send(None)
                    continue
                try:
                    if op == "transfer":  # NIXL polls until done: off the event loop
                        reply = await asyncio.to_thread(self._core.nixl.transfer, *req)
                    elif op == "read":
                        reply = await channel.call_read(op, P.encode_frame(req[0]), req[1])
                    elif op == "write":
                        reply = await channel.call_write(op, P.encode_frame(req[0]), req[1])
                    elif op == "post":  # no reply-less send here: wait for it like any request
                        reply = await call(req[0], P.encode_frame(req[1]))
                        reply = None
                    else:
                        reply = await call(op, P.encode_frame(req))
                except BaseException as exc:
                    op, req = gen.throw(exc)
                else:
                    op, req = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    @property
    def namespace_salt(self) -> bytes:
        return self._core.salt

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return await self._run(self._core.lookup(keys))

    async def put(self, keys: Sequence[bytes], buffers: Sequence[Any], parents: Sequence[bytes | None] | None = None,
                  *, wait_timeout: float | None = None, raise_on_error: bool = True) -> PutResult:
        result, message = await self._run(self._core.put(keys, buffers, parents))
        if wait_timeout and result.in_progress:
            await self._run(self._core.wait_for_writers(keys, result, wait_timeout))
        return check_put(result, message, raise_on_error)

    async def get(self, keys: Sequence[bytes]) -> AsyncLease:
        """Pin blocks; zero-copy views valid inside ``async with`` (remote: views of private copies)."""
        if self._core.transport != P.TRANSPORT_SHM:
            return AsyncLease(self, [], await self._run(self._core.copies(keys)))
        codes, descriptors = await self._run(self._core.acquire(keys))
        return AsyncLease(self, *self._core.lease_views(keys, descriptors))

    @property
    def transport(self) -> str:
        return self._core.transport

    def register(self, buffers: Sequence[Any]) -> None:
        """As ``Client.register``."""
        if self._core.nixl is not None:
            self._core.nixl.register([byte_view(b) for b in buffers])

    async def get_into(self, keys: Sequence[bytes], out: Sequence[Any]) -> list[bool]:
        """Copy blocks into caller buffers (numpy, torch CPU tensors, bytearrays); per-key hit flags."""
        return await self._run(self._core.get_into(keys, out))

    async def prefetch(self, keys: Sequence[bytes], wait: bool = False) -> int:
        """Have blocks whose only copy is on NVMe read into DRAM now, before a get needs them (a decode
        node warming a prefix). Nothing stays pinned. ``wait``: return once they are in DRAM. Returns how
        many of the keys the daemon holds."""
        return await self._run(self._core.prefetch(keys, wait))

    async def delete(self, keys: Sequence[bytes]) -> int:
        codes, _, _ = await self._run(self._core.keys_op("delete", P.Delete, keys))
        return sum(1 for c in codes if c == 0)

    async def stats(self) -> dict[str, Any]:
        reply, _ = await self._channel.call("stats", P.encode_frame(P.Stats(id=self._core._id())))
        stats = reply.stats
        stats["client"] = self._core.client_stats(self._channel.requests)
        return stats

    def close(self) -> None:
        self._channel.close()
        self._core.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
