"""The asyncio client: the same operations as ``Client``, awaitable.

``connect`` and ``get`` return objects that can be awaited or used with ``async with`` directly::

    async with AsyncClient.connect() as kv:
        async with kv.get(keys) as lease:
            ...
    kv = await AsyncClient.connect(); ...; await kv.close()
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from kvrack import protocol as P
from kvrack.address import Address
from kvrack.clients.buffers import byte_view
from kvrack.clients.client import Search, as_client_error
from kvrack.clients.core import ClientCore, LeaseViews, check_put
from kvrack.clients.errors import ClientClosed, DaemonUnreachable
from kvrack.clients.layout import Layout
from kvrack.clients.remote import client_tls_context
from kvrack.clients.results import GetResult, LookupResult, PutResult
from kvrack.clients.steps import Call, Op, Post, ReadCall, Sleep, Step, Transfer, WriteCall
from kvrack.clients.transport import AsyncChannel


class AsyncResource(Protocol):
    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...


T = TypeVar("T", bound=AsyncResource)


class Ready(Generic[T]):
    """An awaitable that is also an async context manager: ``await x`` gives the object, ``async with x as o``
    gives it too and closes (or releases) it on exit."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._make().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._make()
        return await self._value.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        if self._value is not None:
            await self._value.__aexit__(*exc)


class Done:
    """What ``close`` returns: it has already happened, and awaiting it is allowed (``await kv.close()``)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


class AsyncLease(LeaseViews):
    """Pinned blocks as zero-copy read-only views; the pins end when ``async with`` exits."""

    def __init__(self, client: AsyncClient, keys: list[bytes], views: list[memoryview | None]) -> None:
        super().__init__(keys, views)
        self._client = client

    async def release(self) -> None:
        keys = self._end()
        if keys and not self._client.closed:
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
        raise DaemonUnreachable(message=f"cannot reach kvrackd at {host}:{port} ({exc.strerror or exc})") from exc
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
        raise DaemonUnreachable(message=f"TLS with {host}:{port} failed: {exc}") from exc
    return channel


async def _unix_channel(path: str, timeout: float | None) -> AsyncChannel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonUnreachable(message=f"no kvrackd listening on {path} ({exc.strerror})") from exc
    return AsyncChannel(sock)


async def open_async_channel(address: str | None, timeout: float | None, tls: ssl.SSLContext | bool | None
                             ) -> tuple[AsyncChannel, Address]:
    """As ``open_sync_channel``, for asyncio."""
    search = Search(address)
    for where in search:
        try:
            if where.scheme == "unix":
                return await _unix_channel(where.path, timeout), where
            if where.scheme == "tls" and not tls:
                tls = True
            ctx = client_tls_context() if tls is True else (tls or None)
            return await asyncio.wait_for(_tcp_channel(where.host, where.port, ctx), timeout), where
        except DaemonUnreachable as exc:
            search.failed(where, exc)
    raise search.error()


class AsyncClient:
    """A connection to kvrackd for asyncio code. Requests on one client are serialised."""

    address = ""  # where this client is connected

    def __init__(self, channel: AsyncChannel, core: ClientCore) -> None:
        self._channel = channel
        self._core = core
        self.closed = False

    @classmethod
    def connect(cls, address: str | None = None, namespace: str = "default", client_name: str = "", *,
                token: str | None = None, transport: str | None = None, tls: ssl.SSLContext | bool | None = None,
                timeout: float | None = 30.0, layout: Layout | None = None,
                copy_threads: int | None = None) -> Ready[AsyncClient]:
        """As ``Client.connect`` (the same default search, ``unix:///path``, ``tcp://host:port`` or
        ``tls://host:port``). Await it, or use it directly with ``async with``."""
        return Ready(lambda: cls._connect(address, namespace, client_name, token, transport, tls, timeout, layout,
                                          copy_threads))

    @classmethod
    async def _connect(cls, address: str | None, namespace: str, client_name: str, token: str | None,
                       transport: str | None, tls: ssl.SSLContext | bool | None, timeout: float | None,
                       layout: Layout | None, copy_threads: int | None = None) -> AsyncClient:
        token = token if token is not None else os.environ.get("KVRACK_TOKEN", "")
        transport = transport or os.environ.get("KVRACK_TRANSPORT", "auto")
        channel, where = await open_async_channel(address, timeout, tls)
        core = ClientCore(namespace, client_name, token, transport, remote=where.scheme != "unix", data_timeout=timeout,
                          layout=layout, copy_threads=copy_threads)
        client = cls(channel, core)
        client.address = str(where)
        try:
            await client._run(client._core.hello())
        except BaseException:
            client.close()
            raise
        return client

    async def _perform(self, step: Step) -> Any:
        channel = self._channel
        kind = type(step)
        if kind is Call:
            return await channel.call(step.op, P.encode_frame(step.request))  # type: ignore[union-attr]
        if kind is Post:  # no reply-less send here: wait for it like any request
            await channel.call(step.op, P.encode_frame(step.request))  # type: ignore[union-attr]
            return None
        if kind is Transfer:  # NIXL polls until done: off the event loop
            return await asyncio.to_thread(self._core.nixl.transfer, step.op, step.descriptors,  # type: ignore[union-attr]
                                           step.views)  # type: ignore[union-attr]
        if kind is ReadCall:
            return await channel.call_read("read", P.encode_frame(step.request), step.sinks)  # type: ignore[union-attr]
        if kind is WriteCall:
            return await channel.call_write("write", P.encode_frame(step.request), step.payload)  # type: ignore[union-attr]
        assert isinstance(step, Sleep)
        await asyncio.sleep(step.seconds)
        return None

    async def _run(self, gen: Op[Any]) -> Any:
        if self.closed:
            gen.close()
            raise ClientClosed(message="this client is closed; connect a new one")
        try:
            step = next(gen)
            while True:
                try:
                    result = await self._perform(step)
                except BaseException as exc:
                    step = gen.throw(as_client_error(exc))
                else:
                    step = gen.send(result)
        except StopIteration as stop:
            return stop.value

    @property
    def namespace_salt(self) -> bytes:
        return self._core.salt

    @property
    def layout(self) -> Layout | None:
        return self._core.layout

    @layout.setter
    def layout(self, layout: Layout | None) -> None:
        self._core.layout = layout

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return await self._run(self._core.lookup(keys))

    async def put(self, keys: Sequence[bytes], buffers: Sequence[Any], parents: Sequence[bytes | None] | None = None,
                  *, wait_timeout: float | None = None, raise_on_error: bool = True) -> PutResult:
        result, message = await self._run(self._core.put(keys, buffers, parents))
        if wait_timeout and result.in_progress:
            await self._run(self._core.wait_for_writers(keys, result, wait_timeout))
        return check_put(result, message, raise_on_error)

    def get(self, keys: Sequence[bytes]) -> Ready[AsyncLease]:
        """Pin blocks; zero-copy views valid inside ``async with kv.get(keys) as lease`` (remote: views of
        private copies). ``await kv.get(keys)`` gives the lease, to ``release()`` yourself."""
        return Ready(lambda: self._get(keys))

    async def _get(self, keys: Sequence[bytes]) -> AsyncLease:
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

    async def get_into(self, keys: Sequence[bytes], out: Sequence[Any], *, exact: bool = True) -> GetResult:
        """As ``Client.get_into``: per-key hit flags; buffers of another size than their block raise."""
        return await self._run(self._core.get_into(keys, out, exact))

    async def prefetch(self, keys: Sequence[bytes], wait: bool = False) -> int:
        """Have blocks whose only copy is on NVMe read into DRAM now, before a get needs them (a decode
        node warming a prefix). Nothing stays pinned. ``wait``: return once they are in DRAM. Returns how
        many of the keys the daemon holds."""
        return await self._run(self._core.prefetch(keys, wait))

    async def delete(self, keys: Sequence[bytes]) -> int:
        codes, _, _ = await self._run(self._core.keys_op("delete", P.Delete, keys))
        return sum(1 for c in codes if c == 0)

    async def stats(self) -> dict[str, Any]:
        reply, _ = await self._run(_stats_call(self._core))
        stats: dict[str, Any] = reply.stats
        stats["client"] = self._core.client_stats(self._channel.requests)
        return stats

    def close(self) -> Done:
        """End the connection now; ``await kv.close()`` and a plain ``kv.close()`` both work."""
        if not self.closed:
            self.closed = True
            self._channel.close()
            self._core.close()
        return Done()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _stats_call(core: ClientCore) -> Op[Any]:
    return (yield Call("stats", P.Stats(id=core._id())))
