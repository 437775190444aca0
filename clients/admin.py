"""A client of the daemon's admin API (``kvrack.daemon.admin``): what the ``kvrack`` command uses, and what an
operator's scripts can use. Plain HTTP/1.1 over the admin Unix socket (or TCP), JSON in and out.

Where: ``admin`` given (a socket path, ``unix:PATH`` or ``http://HOST:PORT``), else ``$KVRACK_ADMIN``, else
``kvrack-admin.sock`` beside the data socket the usual search finds. The token (mutations, and reads when the
daemon sets ``admin.read_auth``): given, else ``$KVRACK_ADMIN_TOKEN``, else the file ``$KVRACK_ADMIN_TOKEN_FILE``,
else ``kvrack-admin.token`` beside the admin socket when this user may read it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from typing import Any

from kvrack.address import candidate_addresses, parse_address

ADMIN_ENV = "KVRACK_ADMIN"
TOKEN_ENV = "KVRACK_ADMIN_TOKEN"
TOKEN_FILE_ENV = "KVRACK_ADMIN_TOKEN_FILE"
ADMIN_SOCKET = "kvrack-admin.sock"


class AdminApiError(Exception):
    """The admin API answered with an error (``status``, kvrack's ``code`` and its ``error`` name), or could not
    be reached (``status`` 0)."""

    def __init__(self, status: int, code: int, error: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error = error
        self.message = message
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "error": self.error, "message": self.message,
                "detail": self.detail}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def find_admin(admin: str | None = None, data_address: str | None = None) -> str:
    """The admin endpoint to use (see the module's docstring)."""
    if admin:
        return admin
    env = os.environ.get(ADMIN_ENV, "").strip()
    if env:
        return env
    candidates = [data_address] if data_address else candidate_addresses()
    found = []
    for address in candidates:
        where = parse_address(address)
        if where.scheme == "unix":
            path = os.path.join(os.path.dirname(where.path) or ".", ADMIN_SOCKET)
            if os.path.exists(path):
                return path
            found.append(path)
    return found[-1] if found else os.path.join(".", ADMIN_SOCKET)


def find_token(admin: str) -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if not path and "://" not in admin:
        path = os.path.join(os.path.dirname(admin.removeprefix("unix:")) or ".", "kvrack-admin.token")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() or None
    except OSError:
        return None


class AdminClient:
    """One admin endpoint; a connection per request (an admin call is rare next to its cost)."""

    def __init__(self, admin: str | None = None, token: str | None = None, data_address: str | None = None,
                 timeout: float = 30.0) -> None:
        self.admin = find_admin(admin, data_address)
        self.token = token if token is not None else find_token(self.admin)
        self.timeout = timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.admin.startswith(("http://", "https://")):
            url = urllib.parse.urlsplit(self.admin)
            cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            return cls(url.hostname or "localhost", url.port, timeout=timeout)
        return _UnixConnection(self.admin.removeprefix("unix:"), timeout)

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                timeout: float | None = None, raw: bool = False) -> Any:
        """The decoded JSON answer (the text with ``raw``), or ``AdminApiError``."""
        if query:
            path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(self.timeout if timeout is None else timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AdminApiError(0, 0, "UNREACHABLE", f"cannot reach the admin API at {self.admin}: {exc}") from None
        finally:
            conn.close()
        if raw and resp.status < 400:
            return data.decode()
        try:
            answer = json.loads(data) if data else None
        except ValueError:
            answer = None
        if resp.status >= 400:
            if isinstance(answer, dict) and "code" in answer:
                raise AdminApiError(resp.status, answer["code"], answer.get("error", ""), answer.get("message", ""),
                                    answer.get("detail"))
            raise AdminApiError(resp.status, 0, "HTTP", f"HTTP {resp.status}: {data[:200]!r}")
        return answer

    # the endpoints, by name
    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/v1/stats")

    def tiers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/tiers")

    def namespaces(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/namespaces")

    def blocks(self, namespace: str, prefix: str = "", limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        return self.request("GET", f"/v1/namespaces/{_q(namespace)}/blocks",
                            query={"prefix": prefix or None, "limit": limit, "cursor": cursor})

    def block(self, namespace: str, key_hex: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/blocks/{_q(namespace)}/{_q(key_hex)}")

    def delete_block(self, namespace: str, key_hex: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/blocks/{_q(namespace)}/{_q(key_hex)}")

    def clear(self, namespace: str, limit: int | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/namespaces/{_q(namespace)}/clear",
                            query={"limit": limit})

    def quota(self, namespace: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/namespaces/{_q(namespace)}/quota")

    def set_quota(self, namespace: str, **limits: int) -> dict[str, Any]:
        return self.request("PUT", f"/v1/namespaces/{_q(namespace)}/quota", body=limits)

    def config(self) -> dict[str, Any]:
        return self.request("GET", "/v1/config")

    def set_config(self, values: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", "/v1/config", body=values)

    def evict(self, tier: str, nbytes: int | None = None, share: float | None = None) -> dict[str, Any]:
        body = {"bytes": nbytes} if nbytes is not None else {"share": share}
        return self.request("POST", f"/v1/tiers/{_q(tier)}/evict", body=body)

    def drain(self, grace_s: float | None = None, wait: bool = False) -> dict[str, Any]:
        return self.request("POST", "/v1/drain", body={"grace_s": grace_s} if grace_s is not None else None,
                            query={"wait": "true" if wait else None})

    def drain_status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/drain")

    def metrics(self) -> str:
        return self.request("GET", "/metrics", raw=True)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
