"""Start a private kvrackd in a subprocess: for benchmarks, tests and tools."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrack.clients.transport import is_listening


def _config_names_nvme_dir(config_path: str | None) -> bool:
    if not config_path:
        return False
    with open(config_path, "rb") as fh:
        nvme = tomllib.load(fh).get("nvme", {})
    return bool(nvme.get("dir") or nvme.get("paths"))


class DaemonProcess:
    """A kvrackd child process on its own socket; stops with ``stop()`` or the context manager.

    Unless the settings or a config file name ``nvme.dir``, its NVMe tier lives in a
    private directory that is removed when the daemon stops.
    """

    def __init__(self, settings: dict[str, object] | None = None, socket_path: str | None = None,
                 config_path: str | None = None, log_path: str | None = None, ready_timeout: float = 30.0,
                 command_prefix: Sequence[str] = ()) -> None:
        self._tmp = tempfile.mkdtemp(prefix="kvrack-")
        self.socket_path = socket_path or os.path.join(self._tmp, "kvrack.sock")
        self.log_path = log_path or os.path.join(self._tmp, "kvrackd.log")
        # command_prefix runs the daemon under another command, e.g. ["ip", "netns", "exec", NAME]
        args = [*command_prefix, sys.executable, "-m", "kvrack.daemon.main", "--socket", self.socket_path]
        if config_path:
            args += ["--config", config_path]
        settings = dict(settings or {})
        self._private_nvme = None
        if "nvme.dir" not in settings and not _config_names_nvme_dir(config_path):
            self._private_nvme = os.path.join(self._tmp, "nvme")
            settings["nvme.dir"] = self._private_nvme
            settings.setdefault("nvme.capacity_bytes", "256MiB")
        for name, value in settings.items():
            args += ["--set", f"{name}={value}"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready(ready_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrackd exited with {self.proc.returncode}:\n{self.log()}")
            if is_listening(self.socket_path):
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"kvrackd did not listen on {self.socket_path} within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._remove_private_data()
        return self.proc.returncode

    def _remove_private_data(self) -> None:
        if self._private_nvme is not None:
            shutil.rmtree(self._private_nvme, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: no drain, no flush (what a crash looks like)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._remove_private_data()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_paged_in(client: Any, timeout: float = 120.0) -> None:
    """Wait until a fresh daemon has touched all its DRAM (it does so in the background after start-up),
    so a benchmark measures the steady state rather than first-touch page zeroing."""
    deadline = time.monotonic() + timeout
    while not client.stats()["tiers"][0].get("paged_in", True) and time.monotonic() < deadline:
        time.sleep(0.05)


def rss_anon_bytes(pid: int) -> int:
    """Anonymous resident memory of a process (excludes shared-memory segments)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")
