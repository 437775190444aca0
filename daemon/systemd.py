"""systemd integration: ``Type=notify`` readiness, ``STATUS=`` lines, reload and stop notices, and the
watchdog (``WatchdogSec=``), pinged from the daemon's event loop so a wedged loop gets the daemon restarted.

Messages go to ``$NOTIFY_SOCKET`` as datagrams, the protocol of sd_notify(3); outside systemd every call is a
no-op. Written here rather than through a library so the watchdog interval and abstract sockets are handled
the way sd_watchdog_enabled(3) says.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("kvrackd")


class Notifier:
    """One datagram socket to systemd for the daemon's life."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.address:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("systemd notify socket unusable: %s", exc)
        self.watchdog_s = watchdog_interval(env)
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one message; advisory: a failure is logged at debug level only."""
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        self.last_status = status

    def status(self, status: str) -> None:
        """A one-line summary for ``systemctl status``, sent only when it changed."""
        if status != self.last_status:
            self.send(f"STATUS={status}")
            self.last_status = status

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
        self.last_status = status

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """The watchdog timeout in seconds when systemd asks this process for pings (WATCHDOG_USEC, and
    WATCHDOG_PID naming this process when it is set); None otherwise."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6
