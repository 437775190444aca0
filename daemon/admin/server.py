"""The admin listeners: uvicorn serving the admin app on a thread of its own, on a Unix socket (always) and a
TCP port (``admin.tcp_port``), plus the admin token."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
from typing import Any

import uvicorn

from kvrack.daemon.connection import socket_answers

log = logging.getLogger("kvrack.admin")
MIN_TOKEN_CHARS = 16


class AdminTokenError(ValueError):
    """The configured token file cannot be read or holds no usable token."""


def admin_token(token_file: str, default_path: str) -> tuple[bytes, str]:
    """The admin token and where it lives: read from ``token_file`` when configured, else a fresh random one
    written to ``default_path`` (mode 0600, readable by the daemon's user only)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AdminTokenError(f"admin.token_file: cannot read {token_file}: {exc}") from None
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise AdminTokenError(f"admin.token_file: {token_file} must hold a token of at least {MIN_TOKEN_CHARS} "
                                  "characters without spaces on its first line")
        return token.encode(), token_file
    token = secrets.token_urlsafe(32)
    tmp = f"{default_path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, default_path)
    return token.encode(), default_path


def _unix_listener(path: str, mode: int) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        if socket_answers(path):
            raise RuntimeError(f"another process already serves {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


def _tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


class AdminServer:
    """uvicorn on its own thread and event loop: a slow admin client or scrape never waits on, or in, the
    data loop except for the short calls the app makes through the bridge."""

    def __init__(self, app: Any, socket_path: str, socket_mode: int, tcp_host: str = "", tcp_port: int = 0) -> None:
        self.app = app
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        self.sockets: list[socket.socket] = []
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.tcp_address = ""

    def start(self) -> None:
        """Bind the listeners here (a taken port fails the start), then serve on the admin thread."""
        self.sockets.append(_unix_listener(self.socket_path, self.socket_mode))
        if self.tcp_port:
            tcp = _tcp_listener(self.tcp_host, self.tcp_port)
            self.sockets.append(tcp)
            host, port = tcp.getsockname()[:2]
            self.tcp_address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, server_header=False)
        self.server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            assert self.server is not None
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                task = asyncio.create_task(self.server.serve(sockets=self.sockets))  # type: ignore[union-attr]
                while not self.server.started and not task.done():  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
                started.set()
                await task

            try:
                loop.run_until_complete(serve())
            except BaseException:  # noqa: BLE001 - a crash of the admin thread must not take the daemon down
                log.exception("admin API stopped unexpectedly")
            finally:
                started.set()
                loop.close()

        self.thread = threading.Thread(target=run, name="kvrack-admin", daemon=True)
        self.thread.start()
        started.wait(30)

    def addresses(self) -> str:
        return f"unix:{self.socket_path}" + (f" and {self.tcp_address}" if self.tcp_address else "")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
