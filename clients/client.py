"""The synchronous client: ``Client.connect(...)``, then lookup / put / get / get_into / delete."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Sequence
from typing import Any

from kvrack.clients.buffers import byte_view
from kvrack.clients.core import ClientCore, LeaseViews, LookupResult, PutResult, Step, check_put
from kvrack.clients.errors import KvrackError
from kvrack.clients.remote import Address, client_tls_context, parse_address, tcp_socket
from kvrack.clients.transport import StreamChannel, SyncChannel, unix_socket
from kvrack.daemon import protocol as P
from kvrack.daemon.settings import default_socket_path

DEFAULT_SPIN_US = 50.0


def socket_path_of(address: str | None) -> str:
    """``unix:///path``, ``unix:/path`` or a plain path; None means the default socket."""
    if address is None:
        return default_socket_path()
    parsed = parse_address(address, default_socket_path())
    if parsed.scheme != "unix":
        raise ValueError(f"{address!r} is not a Unix socket address")
    return parsed.path


class Lease(LeaseViews):
    """Pinned blocks as zero-copy read-only views; the pins end when the context exits."""

    def __init__(self, client: Client, keys: list[bytes], views: list[memoryview | None]) -> None:
        super().__init__(keys, views)
        self._client = client

    def release(self) -> None:
        keys = self._end()
        if keys:
            self._client._run(self._client._core.keys_op("release", P.Release, keys))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Client:
    """A connection to kvrackd over its Unix socket. Not thread-safe: one per thread."""

    def __init__(self, channel: SyncChannel, core: ClientCore) -> None:
        self._channel = channel
        self._core = core

    @classmethod
    def connect(cls, address: str | None = None, namespace: str = "default", client_name: str = "",
                timeout: float | None = 30.0, spin_us: float | None = None, *, token: str | None = None,
                transport: str | None = None, tls: ssl.SSLContext | bool | None = None) -> Client:
        """Connect and say hello.

        ``address``: ``unix:///path`` (or a path; default: the local daemon's socket), or
        ``tcp://host:port`` / ``tls://host:port`` for a daemon on another host, which needs the
        namespace's ``token`` (default: ``$KVRACK_TOKEN``). ``transport`` (default
        ``$KVRACK_TRANSPORT``, else ``auto``) picks how block bytes move: ``shm`` (mapped
        segments, local only), ``nixl`` (one-sided transfers) or ``tcp`` (bytes on the
        connection); ``auto`` takes the best the daemon offers. ``tls``: an ``ssl.SSLContext``,
        or True for one that verifies the daemon against the system CAs.

        ``timeout`` bounds each send and receive. ``spin_us`` is how long to poll for a reply
        before sleeping (default 50 µs when this process may run on more than one CPU, else 0);
        polling saves a wake-up per request at the cost of that much CPU while waiting.
        """
        if spin_us is None:
            spin_us = DEFAULT_SPIN_US if len(os.sched_getaffinity(0)) > 1 else 0.0
        where = parse_address(address, default_socket_path()) if address else Address("unix", default_socket_path())
        token = token if token is not None else os.environ.get("KVRACK_TOKEN", "")
        transport = transport or os.environ.get("KVRACK_TRANSPORT", "auto")
        channel: SyncChannel
        if where.scheme == "unix":
            channel = SyncChannel(unix_socket(where.path, timeout), spin_us)
        else:
            if where.scheme == "tls" and not tls:
                tls = True
            ctx = client_tls_context() if tls is True else (tls or None)
            channel = StreamChannel(tcp_socket(where.host, where.port, timeout, ctx), spin_us, tls=ctx is not None)
        core = ClientCore(namespace, client_name, token, transport, remote=where.scheme != "unix", data_timeout=timeout)
        client = cls(channel, core)
        try:
            client._run(client._core.hello())
        except BaseException:
            client.close()
            raise
        return client

    def _run(self, gen: Step) -> Any:
        """Drive an operation: each yielded request goes to the daemon, its reply comes back in."""
        channel = self._channel
        call = channel.call
        try:
            op, req = next(gen)
            while True:
                if op == "sleep":
                    time.sleep(req)
                    op, req = gen.send(None)
                    continue
                if op == "post":
                    channel.post(req[0], P.encode_frame(req[1]))
                    op, req = gen.send(None)
                    continue
                try:
                    if op == "transfer":  # NIXL one-sided READ / WRITE
                        reply = self._core.nixl.transfer(*req)
                    elif op == "read":  # block bytes follow the reply (TCP byte stream)
                        reply = channel.call_read(op, P.encode_frame(req[0]), req[1])  # type: ignore[attr-defined]
                    elif op == "write":  # block bytes follow the request
                        reply = channel.call_write(op, P.encode_frame(req[0]), req[1])  # type: ignore[attr-defined]
                    else:
                        reply = call(op, P.encode_frame(req))
                except BaseException as exc:
                    op, req = gen.throw(exc)
                else:
                    op, req = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------------ ops
    @property
    def namespace_salt(self) -> bytes:
        """The salt to build this namespace's first block keys with (``KeyBuilder``)."""
        return self._core.salt

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading keys are cached, and each key's tier."""
        core = self._core
        if len(keys) <= core.max_batch and core.cxl is None:  # one request: skip the generator machinery
            frame = P.encode_frame(P.Lookup(id=core._id(), keys=keys if isinstance(keys, list) else list(keys)))
            reply, _ = self._channel.call("lookup", frame)
            return LookupResult(reply.prefix, reply.tiers)
        return self._run(core.lookup(keys))

    def put(self, keys: Sequence[bytes], buffers: Sequence[Any], parents: Sequence[bytes | None] | None = None,
            *, wait_timeout: float | None = None, raise_on_error: bool = True) -> PutResult:
        """Store blocks: reserve, copy into the mapped segments, commit.

        Keys already stored are skipped; keys another client is writing are
        skipped too, or waited for up to ``wait_timeout`` seconds.
        """
        result, message = self._run(self._core.put(keys, buffers, parents))
        if wait_timeout and result.in_progress:
            self._run(self._core.wait_for_writers(keys, result, wait_timeout))
        return check_put(result, message, raise_on_error)

    def get(self, keys: Sequence[bytes]) -> Lease:
        """Pin blocks and return zero-copy views (None for misses), valid inside ``with``.

        Over NIXL or TCP the views are of private copies (nothing stays pinned)."""
        if self._core.transport != P.TRANSPORT_SHM:
            return Lease(self, [], self._run(self._core.copies(keys)))
        codes, descriptors = self._run(self._core.acquire(keys))
        return Lease(self, *self._core.lease_views(keys, descriptors))

    @property
    def transport(self) -> str:
        """How block bytes move on this connection: ``shm``, ``nixl`` or ``tcp``."""
        return self._core.transport

    def register(self, buffers: Sequence[Any]) -> None:
        """Register buffers (an engine's KV pool) once for NIXL, so transfers into them skip per-call
        registration. A no-op for the other transports."""
        if self._core.nixl is not None:
            self._core.nixl.register([byte_view(b, writable=False) for b in buffers])

    def get_into(self, keys: Sequence[bytes], out: Sequence[Any]) -> list[bool]:
        """Copy blocks into caller buffers (numpy, torch CPU tensors, bytearrays); per-key hit flags."""
        return self._run(self._core.get_into(keys, out))

    def prefetch(self, keys: Sequence[bytes], wait: bool = False) -> int:
        """Have blocks whose only copy is on NVMe read into DRAM now, before a get needs them (a decode
        node warming a prefix). Nothing stays pinned. ``wait``: return once they are in DRAM. Returns how
        many of the keys the daemon holds."""
        return self._run(self._core.prefetch(keys, wait))

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many existed."""
        codes, _, _ = self._run(self._core.keys_op("delete", P.Delete, keys))
        return sum(1 for c in codes if c == 0)

    def stats(self) -> dict[str, Any]:
        """The daemon's figures for this namespace, plus this client's ``client`` section (its transport)."""
        reply = self._channel.call("stats", P.encode_frame(P.Stats(id=self._core._id())))
        stats = reply[0].stats
        stats["client"] = self._core.client_stats(self._channel.requests)
        return stats

    def close(self) -> None:
        self._channel.close()
        self._core.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "Lease", "KvrackError", "socket_path_of"]
