"""The asyncio client: the same operations as ``Client``, awaitable."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

from kvrack.clients.client import socket_path_of
from kvrack.clients.core import ClientCore, LeaseViews, LookupResult, PutResult, Step, check_put
from kvrack.clients.transport import AsyncChannel
from kvrack.daemon import protocol as P


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


class AsyncClient:
    """A connection to kvrackd for asyncio code. Requests on one client are serialised."""

    def __init__(self, channel: AsyncChannel, core: ClientCore) -> None:
        self._channel = channel
        self._core = core

    @classmethod
    async def connect(cls, address: str | None = None, namespace: str = "default", client_name: str = "") -> AsyncClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        path = socket_path_of(address)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ConnectionError(f"no kvrackd listening on {path} ({exc.strerror})") from None
        client = cls(AsyncChannel(sock), ClientCore(namespace, client_name))
        try:
            await client._run(client._core.hello())
        except BaseException:
            client.close()
            raise
        return client

    async def _run(self, gen: Step) -> Any:
        call = self._channel.call
        try:
            op, req = next(gen)
            while True:
                if op == "sleep":
                    await asyncio.sleep(req)
                    op, req = gen.send(None)
                    continue
                if op == "post":  # no reply-less send here: wait for it like any request
                    await call(req[0], P.encode_frame(req[1]))
                    op, req = gen.send(None)
                    continue
                try:
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
        """Pin blocks; zero-copy views valid inside ``async with``."""
        codes, descriptors = await self._run(self._core.acquire(keys))
        return AsyncLease(self, *self._core.lease_views(keys, descriptors))

    async def get_into(self, keys: Sequence[bytes], out: Sequence[Any]) -> list[bool]:
        """Copy blocks into caller buffers (numpy, torch CPU tensors, bytearrays); per-key hit flags."""
        return await self._run(self._core.get_into(keys, out))

    async def delete(self, keys: Sequence[bytes]) -> int:
        codes, _, _ = await self._run(self._core.keys_op("delete", P.Delete, keys))
        return sum(1 for c in codes if c == 0)

    async def stats(self) -> dict[str, Any]:
        reply, _ = await self._channel.call("stats", P.encode_frame(P.Stats(id=self._core._id())))
        return reply.stats

    def close(self) -> None:
        self._channel.close()
        self._core.segments.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
