"""The synchronous client: ``Client.connect(...)``, then lookup / put / get / get_into / delete."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvrack import protocol as P
from kvrack.address import Address, candidate_addresses, targets, worth_trying
from kvrack.clients.buffers import byte_view
from kvrack.clients.core import ClientCore, LeaseViews, check_put
from kvrack.clients.errors import ClientClosed, ConnectionLost, DaemonUnreachable, KvrackError
from kvrack.clients.layout import Layout
from kvrack.clients.remote import client_tls_context, tcp_socket
from kvrack.clients.results import GetResult, LookupResult, PutResult
from kvrack.clients.steps import Call, Op, Post, ReadCall, Sleep, Step, Transfer, WriteCall
from kvrack.clients.transport import StreamChannel, SyncChannel, unix_socket

DEFAULT_SPIN_US = 50.0


def socket_path_of(address: str | None) -> str:
    """The Unix socket a client would use for ``address`` (None: the default search's pick)."""
    ts = targets(address)
    found = [w for i, w in enumerate(ts) if worth_trying(w, i, len(ts))]
    where = found[0] if found else ts[-1]
    if where.scheme != "unix":
        raise ValueError(f"{where} is not a Unix socket address")
    return where.path


def unreachable(tried: list[str], searched: bool) -> DaemonUnreachable:
    """The error when no place answered: every place looked at, and how to point clients elsewhere."""
    how = ("start one with `kvrackd` (or `make run`), or point clients at one with $KVRACK_ADDRESS "
           "(unix:///path/kvrack.sock or tcp://host:port)")
    if searched:
        return DaemonUnreachable(message=f"no kvrackd listening; looked at $KVRACK_ADDRESS (unset), "
                                         f"{', '.join(tried)}; {how}")
    return DaemonUnreachable(message=f"no kvrackd listening at {tried[0]}; {how}")


class Search:
    """The places a client tries in turn (the address given, else the default search), and why each failed: the
    error names them all."""

    def __init__(self, address: str | None) -> None:
        self.places = targets(address)
        self.searched = address is None and len(candidate_addresses()) > 1
        self.tried: list[str] = []

    def __iter__(self) -> Iterator[Address]:
        for i, where in enumerate(self.places):
            if worth_trying(where, i, len(self.places)):
                yield where
            else:
                self.tried.append(f"{where} (absent)")

    def failed(self, where: Address, exc: DaemonUnreachable) -> None:
        """``where`` did not answer: go on to the next place (the one place there was: its error as it is)."""
        if len(self.places) == 1:
            raise exc
        self.tried.append(f"{where} ({exc.__cause__.strerror if isinstance(exc.__cause__, OSError) else exc})")

    def error(self) -> DaemonUnreachable:
        return unreachable(self.tried, self.searched)


def open_sync_channel(address: str | None, timeout: float | None, spin_us: float,
                      tls: ssl.SSLContext | bool | None) -> tuple[SyncChannel, Address]:
    """A connected channel to the address given, else to the first place of the default search that answers."""
    search = Search(address)
    for where in search:
        try:
            if where.scheme == "unix":
                return SyncChannel(unix_socket(where.path, timeout), spin_us), where
            if where.scheme == "tls" and not tls:
                tls = True
            ctx = client_tls_context() if tls is True else (tls or None)
            return StreamChannel(tcp_socket(where.host, where.port, timeout, ctx), spin_us, tls=ctx is not None), where
        except DaemonUnreachable as exc:
            search.failed(where, exc)
    raise search.error()


def as_client_error(exc: BaseException) -> BaseException:
    """An ``OSError`` of the socket as the ``ConnectionLost`` it means (cause chained); others unchanged."""
    if isinstance(exc, OSError) and not isinstance(exc, KvrackError):
        err = ConnectionLost(message=f"connection to kvrackd failed: {exc.strerror or exc}")
        err.__cause__ = exc
        return err
    return exc


class Lease(LeaseViews):
    """Pinned blocks as zero-copy read-only views; the pins end when the context exits."""

    def __init__(self, client: Client, keys: list[bytes], views: list[memoryview | None]) -> None:
        super().__init__(keys, views)
        self._client = client

    def release(self) -> None:
        keys = self._end()
        if keys and not self._client.closed:
            self._client._run(self._client._core.keys_op("release", P.Release, keys))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Client:
    """A connection to kvrackd (Unix socket, or TCP/TLS for a daemon on another host). Not thread-safe: one
    per thread."""

    def __init__(self, channel: SyncChannel, core: ClientCore) -> None:
        self._channel = channel
        self._core = core
        self.closed = False

    @classmethod
    def connect(cls, address: str | None = None, namespace: str = "default", client_name: str = "",
                timeout: float | None = 30.0, spin_us: float | None = None, *, token: str | None = None,
                transport: str | None = None, tls: ssl.SSLContext | bool | None = None,
                layout: Layout | None = None, copy_threads: int | None = None) -> Client:
        """Connect and say hello.

        ``address``: ``unix:///path`` (or a path), or ``tcp://host:port`` / ``tls://host:port`` for a
        daemon on another host, which needs the namespace's ``token`` (default: ``$KVRACK_TOKEN``).
        Without an address the client looks, in order, at ``$KVRACK_ADDRESS``, ``/run/kvrack/kvrack.sock``
        (the system service) and ``$XDG_RUNTIME_DIR/kvrack/kvrack.sock`` (else ``/tmp/kvrack/kvrack.sock``).
        ``transport`` (default ``$KVRACK_TRANSPORT``, else ``auto``) picks how block bytes move: ``shm``
        (mapped segments, local only), ``nixl`` (one-sided transfers) or ``tcp`` (bytes on the
        connection); ``auto`` takes the best the daemon offers. ``tls``: an ``ssl.SSLContext``,
        or True for one that verifies the daemon against the system CAs. ``layout``: every block put or
        read must be one block of it (size and dtype are checked before anything is sent).
        ``copy_threads`` (default ``$KVRACK_COPY_THREADS``, else the CPUs it may run on, at most 4): threads
        sharing the block copies of a same-host request that moves 16 MiB or more.

        ``timeout`` bounds each send and receive. ``spin_us`` is how long to poll for a reply
        before sleeping (default 50 µs when this process may run on more than one CPU, else 0);
        polling saves a wake-up per request at the cost of that much CPU while waiting.
        """
        if spin_us is None:
            spin_us = DEFAULT_SPIN_US if len(os.sched_getaffinity(0)) > 1 else 0.0
        token = token if token is not None else os.environ.get("KVRACK_TOKEN", "")
        transport = transport or os.environ.get("KVRACK_TRANSPORT", "auto")
        channel, where = open_sync_channel(address, timeout, spin_us, tls)
        core = ClientCore(namespace, client_name, token, transport, remote=where.scheme != "unix", data_timeout=timeout,
                          layout=layout, copy_threads=copy_threads)
        client = cls(channel, core)
        client.address = str(where)
        try:
            client._run(client._core.hello())
        except BaseException:
            client.close()
            raise
        return client

    address = ""  # where this client is connected

    def _perform(self, step: Step) -> Any:
        """One step of an operation: a request to the daemon, a NIXL transfer or a pause."""
        channel = self._channel
        kind = type(step)
        if kind is Call:
            return channel.call(step.op, P.encode_frame(step.request))  # type: ignore[union-attr]
        if kind is Post:
            channel.post(step.op, P.encode_frame(step.request))  # type: ignore[union-attr]
            return None
        if kind is Transfer:  # NIXL one-sided READ / WRITE
            return self._core.nixl.transfer(step.op, step.descriptors, step.views)  # type: ignore[union-attr]
        if kind is ReadCall:  # block bytes follow the reply (TCP byte stream)
            return channel.call_read("read", P.encode_frame(step.request), step.sinks)  # type: ignore[union-attr]
        if kind is WriteCall:  # block bytes follow the request
            return channel.call_write("write", P.encode_frame(step.request), step.payload)  # type: ignore[union-attr]
        assert isinstance(step, Sleep)
        time.sleep(step.seconds)
        return None

    def _run(self, gen: Op[Any]) -> Any:
        """Drive an operation: each step is performed here and its result sent back in."""
        if self.closed:
            gen.close()
            raise ClientClosed(message="this client is closed; connect a new one")
        perform = self._perform
        try:
            step = next(gen)
            while True:
                try:
                    result = perform(step)
                except BaseException as exc:
                    step = gen.throw(as_client_error(exc))
                else:
                    step = gen.send(result)
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------------ ops
    @property
    def namespace_salt(self) -> bytes:
        """The salt to build this namespace's first block keys with (``KeyBuilder``)."""
        return self._core.salt

    @property
    def layout(self) -> Layout | None:
        """The layout every block put or read is checked against (None: sizes only against stored blocks)."""
        return self._core.layout

    @layout.setter
    def layout(self, layout: Layout | None) -> None:
        self._core.layout = layout

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading keys are cached, and each key's tier."""
        core = self._core
        if len(keys) <= core.max_batch and core.cxl is None and not self.closed:  # one request: no generator
            frame = P.encode_frame(P.Lookup(id=core._id(), keys=keys if isinstance(keys, list) else list(keys)))
            try:
                reply, _ = self._channel.call("lookup", frame)
            except OSError as exc:
                raise as_client_error(exc) from exc
            assert isinstance(reply, P.LookupReply)
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

    def get_into(self, keys: Sequence[bytes], out: Sequence[Any], *, exact: bool = True) -> GetResult:
        """Copy blocks into caller buffers (numpy, torch tensors, bytearrays); per-key hit flags.

        Each buffer must have its block's size: a buffer of another size raises ``SizeMismatch`` naming
        both sizes, before any byte is copied. ``exact=False`` accepts larger buffers; the result's
        ``nbytes`` then says how many bytes each hit wrote."""
        return self._run(self._core.get_into(keys, out, exact))

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
        reply, _ = self._run(_stats_call(self._core))
        stats = reply.stats
        stats["client"] = self._core.client_stats(self._channel.requests)
        return stats

    def close(self) -> None:
        """End the connection: pins and reservations it holds end with it. Closing twice is harmless."""
        if self.closed:
            return
        self.closed = True
        self._channel.close()
        self._core.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stats_call(core: ClientCore) -> Op[Any]:
    return (yield Call("stats", P.Stats(id=core._id())))


__all__ = ["Client", "Lease", "KvrackError", "socket_path_of"]
