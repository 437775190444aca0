"""Drain: SIGTERM, POST /v1/drain and `kvrack drain` take one path. Clients mid-request get their reply or a
clean error, never a hang; writers finish what they reserved; the NVMe tier keeps what was committed; the
daemon exits 0. And systemd: readiness, status, reload and stop notices, watchdog pings, the unit file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client, KvrackError
from kvrack.clients.admin import AdminApiError
from tests.conftest import SMALL, RawConn, eventually

ROOT = Path(__file__).resolve().parent.parent


def reserve(raw: RawConn, key: bytes, rid: int = 2) -> dict:
    raw.send({"op": "reserve", "id": rid, "keys": [key], "sizes": [4096]})
    return raw.recv()


@pytest.mark.parametrize("how", ["admin", "sigterm"])
def test_drain_lets_work_in_flight_finish_and_admits_nothing_new(tmp_path, how):
    d = DaemonProcess({"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB", "server.drain_timeout_s": "20",
                       "nvme.dir": str(tmp_path / "nvme"), "nvme.capacity_bytes": "64MiB"})
    writer, reader = RawConn(d.socket_path), Client.connect(d.socket_path)
    try:
        writer.hello()
        held_key, new_key = os.urandom(32), os.urandom(32)
        assert reserve(writer, held_key)["codes"] == [0]  # a put between reserve and commit
        (read_key,) = keys = [os.urandom(32)]
        reader.put(keys, [b"r" * 4096])
        lease = reader.get(keys)  # a reader holding a pin
        api = d.admin()
        if how == "admin":
            assert api.drain()["state"] == "draining"
        else:
            os.kill(d.pid, signal.SIGTERM)
        assert eventually(lambda: api.request("GET", "/v1/drain")["state"] == "draining")
        readyz = api.drain_status()
        assert readyz["reservations"] == 1 and readyz["pins"] == 1
        with pytest.raises(AdminApiError) as err:
            api.request("GET", "/readyz")
        assert err.value.status == 503
        with pytest.raises((KvrackError, OSError)):
            Client.connect(d.socket_path, timeout=2.0)  # no new clients
        # no new puts: a clean error, at once
        reply = reserve(writer, new_key, rid=3)
        assert reply["code"] == 501 and "shutting down" in reply["message"]
        # the writer finishes what it reserved; the reader reads and lets go
        writer.send({"op": "commit", "id": 4, "keys": [held_key]})
        assert writer.recv()["codes"] == [0]
        assert bytes(lease.views[0]) == b"r" * 4096
        time.sleep(0.3)
        assert d.proc.poll() is None, "the daemon left while a reader still held a pin"
        lease.release()
        assert d.proc.wait(20) == 0
    finally:
        writer.close()
        reader.close()
        d.stop()
    log = d.log()
    assert "drain: closed" in log and "grace over" not in log and "Traceback" not in log
    # what was committed during the drain is on NVMe: a restart finds it
    with DaemonProcess({"dram.capacity_bytes": "8MiB", "dram.segment_bytes": "1MiB",
                        "nvme.dir": str(tmp_path / "nvme"), "nvme.capacity_bytes": "64MiB"}) as again, \
            Client.connect(again.socket_path) as c:
        assert c.lookup([held_key, read_key]).prefix == 2


def test_the_grace_period_bounds_the_drain_and_clients_get_a_clean_error():
    d = DaemonProcess({**SMALL, "server.drain_timeout_s": "0.5"})
    stuck = Client.connect(d.socket_path)
    try:
        keys = [os.urandom(32)]
        stuck.put(keys, [b"x" * 100])
        lease = stuck.get(keys)  # never released
        errors: list[BaseException] = []
        done = threading.Event()

        def busy() -> None:  # a client putting and reading in a loop while the daemon drains
            try:
                with Client.connect(d.socket_path, timeout=5.0) as c:
                    for _ in range(100_000):
                        k = [os.urandom(32)]
                        c.put(k, [b"y" * 64])
                        c.lookup(k)
            except BaseException as exc:  # noqa: BLE001 - the point is which error, and that it comes
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=busy, daemon=True)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        status = d.admin().drain(grace_s=0.5, wait=True)
        assert status["state"] == "stopped" and status["report"]["quiet"] is False
        assert status["report"]["pins_released"] == 1
        assert d.proc.wait(10) == 0 and time.monotonic() - t0 < 5
        assert done.wait(10), "a client mid-request hung"
        assert errors and isinstance(errors[0], (KvrackError, ConnectionError)), errors
        del lease
    finally:
        stuck.close()
        d.stop()
    assert "grace over: 0 reservation(s) aborted, 1 pin(s) released" in d.log()


def test_kvrack_drain_command_reports_and_the_daemon_exits(daemon):
    out = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "drain", "--admin", daemon.admin_path, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    import json
    status = json.loads(out.stdout)
    assert status["state"] == "stopped" and status["reason"] == "admin API" and status["report"]["quiet"]
    assert daemon.proc.wait(10) == 0


# ------------------------------------------------------------------------------------------------ systemd

class NotifySocket:
    """What systemd's $NOTIFY_SOCKET receives, read by the test."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if key in m and (value is None or m[key] == value):
                    self.messages.remove(m)
                    return m
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.messages}")


def test_notify_readiness_status_watchdog_reload_and_stop(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    d = DaemonProcess(SMALL, env=env)
    try:
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"].startswith("serving: 0 session(s), dram 0 bytes of 8MiB")
        assert int(ready["MAINPID"]) == d.pid
        t0 = time.monotonic()
        notify.wait_for("WATCHDOG", "1")
        notify.wait_for("WATCHDOG", "1")
        assert time.monotonic() - t0 < 3.0, "pings at half the watchdog timeout"
        os.kill(d.pid, signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", "1")
        os.kill(d.pid, signal.SIGTERM)
        assert notify.wait_for("STOPPING", "1")["STATUS"].startswith("draining (SIGTERM)")
        assert d.proc.wait(10) == 0
    finally:
        d.stop()
        notify.sock.close()


def test_a_stopped_daemon_stops_pinging_the_watchdog(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    d = DaemonProcess(SMALL, env=env)
    try:
        notify.wait_for("WATCHDOG", "1")
        os.kill(d.pid, signal.SIGSTOP)  # the whole process stops: what systemd then sees is silence
        notify.messages.clear()
        with pytest.raises(AssertionError):
            notify.wait_for("WATCHDOG", "1", timeout=2.0)
        os.kill(d.pid, signal.SIGCONT)
        notify.wait_for("WATCHDOG", "1")
    finally:
        os.kill(d.pid, signal.SIGCONT)
        d.stop()
        notify.sock.close()


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "deploy" / "systemd" / "kvrackd.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ExecReload=" in unit
    kvrackd = Path(sys.executable).parent / "kvrackd"
    (tmp_path / "kvrackd.service").write_text(unit.replace("/usr/local/bin/kvrackd", str(kvrackd)))
    res = subprocess.run([analyze, "verify", str(tmp_path / "kvrackd.service")], capture_output=True, text=True,
                         timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if "kvrackd.service" in line and "Failed to" not in line]  # no systemd as PID 1 here: only the unit
    assert res.returncode == 0 or not problems, res.stdout + res.stderr
