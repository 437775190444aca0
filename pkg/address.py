"""Where clients find the daemon: one search that every client, CLI command and engine connector uses.

1. ``$KVRACK_ADDRESS`` when it is set (``unix:///path``, a path, ``tcp://host:port`` or ``tls://host:port``);
   nothing else is tried then.
2. ``/run/kvrack/kvrack.sock``, the system service's socket (deploy/systemd), when it exists.
3. ``$XDG_RUNTIME_DIR/kvrack/kvrack.sock`` (else ``/tmp/kvrack/kvrack.sock``): where ``kvrackd`` run by a
   user (``make run``) listens by default.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

ADDRESS_ENV = "KVRACK_ADDRESS"
SYSTEM_SOCKET = "/run/kvrack/kvrack.sock"


def user_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/kvrack/kvrack.sock``, or under /tmp when that is unset: the daemon's default."""
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), "kvrack", "kvrack.sock")


def candidate_addresses() -> list[str]:
    """The addresses the search tries, in order (``$KVRACK_ADDRESS`` alone when it is set)."""
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if env:
        return [env]
    user = user_socket_path()
    return [SYSTEM_SOCKET, user] if user != SYSTEM_SOCKET else [user]


def default_address() -> str:
    """The first candidate that exists (a socket file, or any TCP address), else the last one."""
    candidates = candidate_addresses()
    for address in candidates:
        if "://" in address and not address.startswith("unix:"):
            return address
        if os.path.exists(address.removeprefix("unix://").removeprefix("unix:")):
            return address
    return candidates[-1]


DEFAULT_TCP_PORT = 7433


@dataclasses.dataclass(frozen=True)
class Address:
    scheme: str  # "unix", "tcp" or "tls"
    path: str = ""
    host: str = ""
    port: int = DEFAULT_TCP_PORT

    def __str__(self) -> str:
        if self.scheme == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(address: str, default_unix: str | None = None) -> Address:
    """``unix:///path``, ``unix:/path``, a plain path, ``tcp://host:port`` or ``tls://host:port``."""
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return Address("unix", path=address[len(prefix):] or default_unix or user_socket_path())
    scheme, sep, rest = address.partition("://")
    if not sep:
        return Address("unix", path=address)
    if scheme not in ("tcp", "tls"):
        raise ValueError(f"unsupported address {address!r}: use unix://PATH, tcp://HOST:PORT or tls://HOST:PORT")
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [v6-address]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise ValueError(f"address {address!r} names no host")
    try:
        return Address(scheme, host=host, port=int(port) if port else DEFAULT_TCP_PORT)
    except ValueError:
        raise ValueError(f"address {address!r}: the port must be a number") from None


def targets(address: str | None) -> list[Address]:
    """What a client tries, in order: the address given, else the default search's candidates."""
    if address:
        return [parse_address(address)]
    return [parse_address(a) for a in candidate_addresses()]


def worth_trying(where: Address, i: int, n: int) -> bool:
    """A searched Unix socket that does not exist is skipped, unless it is the search's last place."""
    return where.scheme != "unix" or i == n - 1 or os.path.exists(where.path)
