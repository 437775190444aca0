"""Start a private kvrackd in a subprocess: for benchmarks, tests and tools."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvrack.clients.admin import AdminClient
from kvrack.clients.transport import is_listening

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (a killed test run leaves no
    daemon behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _config_names_nvme_dir(config_path: str | None) -> bool:
    if not config_path:
        return False
    with open(config_path, "rb") as fh:
        nvme = tomllib.load(fh).get("nvme", {})
    return bool(nvme.get("dir") or nvme.get("paths"))


class DaemonProcess:
    """A kvrackd child process on its own socket; stops with ``stop()`` or the context manager.

    Everything it needs lives in a private temporary directory (socket, log, and unless the settings or a
    config file name ``nvme.dir``, its NVMe tier), removed when it stops. ``logs``, when a list, receives
    each stopped daemon's log first (tests print it when they fail).
    """

    # (socket, log, exit status, "stop" or "kill") of each daemon stopped while a list is set (the tests' fixture)
    logs: list[tuple[str, str, int | None, str]] | None = None

    def __init__(self, settings: Mapping[str, object] | None = None, socket_path: str | None = None,
                 config_path: str | None = None, log_path: str | None = None, ready_timeout: float = 30.0,
                 command_prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self._tmp = tempfile.mkdtemp(prefix="kvrack-")
        self.socket_path = socket_path or os.path.join(self._tmp, "kvrack.sock")
        self.log_path = log_path or os.path.join(self._tmp, "kvrackd.log")
        self.returncode: int | None = None
        self.how = "stop"  # how it was stopped: "stop" (SIGTERM, or it exited) or "kill" (SIGKILL)
        self._final_log: str | None = None
        # command_prefix runs the daemon under another command, e.g. ["ip", "netns", "exec", NAME]
        args = [*command_prefix, sys.executable, "-m", "kvrack.daemon.main", "--socket", self.socket_path]
        if config_path:
            args += ["--config", config_path]
        settings = dict(settings or {})
        if "nvme.dir" not in settings and not _config_names_nvme_dir(config_path):
            settings["nvme.dir"] = os.path.join(self._tmp, "nvme")
            settings.setdefault("nvme.capacity_bytes", "256MiB")
        for name, value in settings.items():
            args += ["--set", f"{name}={value}"]
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent, env=env)
            self._wait_ready(ready_timeout)
        except BaseException:
            self._log.close()
            self._cleanup()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_path(self) -> str:
        """The admin API's socket (its default place, beside the data socket)."""
        return os.path.join(os.path.dirname(self.socket_path), "kvrack-admin.sock")

    def admin(self, token: str | None = None) -> AdminClient:
        """A client of its admin API (with the token it wrote, unless ``token`` is given; "" for none)."""
        return AdminClient(self.admin_path, token)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrackd exited with {self.proc.returncode}:\n{self.log()}")
            if is_listening(self.socket_path):
                return
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise TimeoutError(f"kvrackd did not listen on {self.socket_path} within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """Its log so far (after it stopped: the whole log, kept in memory once its directory is gone)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop in time. Returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._finish()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no flush (what a crash looks like)."""
        self.how = "kill"
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        if self._log.closed:
            return
        self._log.close()
        self.returncode = self.proc.returncode
        self._final_log = self.log()
        if DaemonProcess.logs is not None:
            DaemonProcess.logs.append((self.socket_path, self._final_log, self.returncode, self.how))
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate(proc: subprocess.Popen[Any], timeout: float = 30.0, group: bool = False) -> None:
    """SIGTERM (to its whole process group with ``group``), wait up to ``timeout``, then SIGKILL."""
    if proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def wait_until_paged_in(client: Any, timeout: float = 120.0) -> None:
    """Wait until a fresh daemon has touched all its DRAM (it does so in the background after start-up),
    so a benchmark measures the steady state rather than first-touch page zeroing."""
    deadline = time.monotonic() + timeout
    while not client.stats()["tiers"][0].get("paged_in", True) and time.monotonic() < deadline:
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a server this process is about to start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (not its children)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_anon_bytes(pid: int) -> int:
    """Anonymous resident memory of a process (excludes shared-memory segments)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")
