"""A daemon connection for engine plug-ins that must never fail a request because kvrackd is down or slow.

Used while it works, dropped on the first error (a timeout included), tried again after ``retry_s``; the outage
is logged once when it starts and once when it ends. The engine treats a missing connection as a cache miss.
"""

from __future__ import annotations

import logging
import threading
import time

from kvrack.clients.client import Client

log = logging.getLogger("kvrack.clients")


class Link:
    """One fail-soft client connection, shared by an engine's threads (hold ``lock`` around a call)."""

    def __init__(self, address: str | None, namespace: str, token: str, timeout: float, retry_s: float,
                 name: str) -> None:
        self.address = address
        self.namespace = namespace
        self.token = token
        self.timeout = timeout
        self.retry_s = retry_s
        self.name = name
        self.client: Client | None = None
        self.retry_at = 0.0
        self.down_since: float | None = None
        self.lock = threading.Lock()

    def get(self) -> Client | None:
        """The connection, or None while the daemon is unreachable (between retries)."""
        if self.client is not None:
            return self.client
        now = time.monotonic()
        if now < self.retry_at:
            return None
        try:
            self.client = Client.connect(self.address, namespace=self.namespace, client_name=self.name,
                                         timeout=self.timeout, token=self.token)
        except Exception as exc:
            self.failed(exc)
            return None
        if self.down_since is not None:
            log.warning("kvrack: %s reconnected to kvrackd after %.1f s", self.name, now - self.down_since)
            self.down_since = None
        return self.client

    def failed(self, exc: BaseException) -> None:
        """Drop the connection; say so once per outage."""
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None
        self.retry_at = time.monotonic() + self.retry_s
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("kvrack: %s cannot use kvrackd (%s); recomputing instead, trying again every %g s",
                        self.name, exc, self.retry_s)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
