"""The reliability suite's scenarios, each returning the figures of ``reliability-report.json``.

Short versions run in ``make test`` (tests/reliability/test_suite.py); ``make reliability-report`` runs the long
ones and writes the report at the repository's root:

    python -m tests.reliability.suite --long --json reliability-report.json

Every scenario runs real daemon processes and is bounded in count and time. Payloads carry their own check: a
block's bytes are derived from its key (blake3 of the key, stretched), so any wrong byte read back is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import msgspec

from kvrack import protocol as P
from kvrack.bench.spawn import DaemonProcess, rss_anon_bytes
from kvrack.clients import Client, KvrackError

BLOCK = 16 * 1024


def content(key: bytes, size: int = BLOCK) -> bytes:
    """The bytes a block of ``key`` must hold: anything else read back is corruption."""
    return blake3.blake3(key).digest(length=size)


def _wait(pred: Any, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


# ------------------------------------------------------------------------------------------- kill -9

def _writer(path: str, stop: threading.Event, go: threading.Event, acked: list[bytes], budget: int,
            size: int) -> None:
    """Put blocks until stopped (or the round's budget is written), noting each acknowledged key."""
    try:
        with Client.connect(path, timeout=5.0) as c:
            while not stop.is_set() and len(acked) < budget:
                go.wait(1.0)
                keys = [os.urandom(32) for _ in range(8)]
                c.put(keys, [content(k, size) for k in keys], raise_on_error=False)
                acked.extend(keys)
                time.sleep(0.005)  # a steady stream, so that kills land in the middle of it
    except (KvrackError, OSError):
        pass  # killed under it


def _nvme_pending(api: Any) -> int:
    return int(next(t for t in api.tiers() if t["tier"] == "nvme")["detail"]["pending_writes"])


def crash_recovery(kills: int, seconds_per_round: float = 1.5, seed: int = 1) -> dict[str, Any]:
    """Writers under load, kill -9 at a random moment, restart on the same NVMe files, read everything back.

    A block counts as acknowledged persistent once the daemon reported no NVMe write pending after its put
    returned (the documented write-behind window is the time before that). Every block read back at all must
    hold its exact bytes."""
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="kvrack-crash-"))
    # NVMe large enough never to evict what the rounds write (a lost block must be the crash's doing)
    settings = {"dram.capacity_bytes": "32MiB", "dram.segment_bytes": "1MiB", "nvme.dir": str(tmp / "nvme"),
                "nvme.capacity_bytes": "1GiB"}
    size = 4096
    budget = (1 << 30) // size // 2 // max(1, kills)  # blocks a round may write
    persistent: set[bytes] = set()
    written: set[bytes] = set()
    corrupt = lost = survived = in_window = 0
    recovery_s: list[float] = []
    try:
        for _round in range(kills):
            t0 = time.monotonic()
            d = DaemonProcess(settings)
            recovery_s.append(round(time.monotonic() - t0, 3))
            stop = threading.Event()
            go = threading.Event()  # writers pause now and then, so that a moment with nothing pending comes
            go.set()
            round_acked: list[bytes] = []

            threads = [threading.Thread(target=_writer, args=(d.socket_path, stop, go, round_acked, budget, size),
                                        daemon=True) for _ in range(2)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + rng.uniform(0.3, seconds_per_round)
            admin = d.admin(token="")
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.05, 0.2))
                go.clear()
                time.sleep(0.02)  # puts in flight return
                snapshot = list(round_acked)
                try:
                    if _wait(lambda api=admin: _nvme_pending(api) == 0, 1.0, 0.01):
                        persistent.update(snapshot)  # acknowledged before a moment with nothing pending: durable
                except Exception:
                    pass
                go.set()
            d.kill()
            stop.set()
            for t in threads:
                t.join(10)
            written.update(round_acked)
            survived += 1
        d = DaemonProcess(settings)
        try:
            with Client.connect(d.socket_path, timeout=10.0) as c:
                keys = sorted(written)
                for i in range(0, len(keys), 256):
                    batch = keys[i:i + 256]
                    out = [bytearray(size) for _ in batch]
                    hits = c.get_into(batch, out, exact=False)
                    for k, hit, buf in zip(batch, hits, out):
                        if hit and bytes(buf) != content(k, size):
                            corrupt += 1
                        if not hit and k in persistent:
                            lost += 1
                        elif not hit:
                            in_window += 1
        finally:
            d.stop()
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {"kills_survived": survived, "corrupt_reads": corrupt, "lost_acknowledged_blocks": lost,
            "acknowledged_persistent_blocks": len(persistent), "blocks_written": len(written),
            "lost_in_write_behind_window": in_window,
            "recovery_seconds_max": max(recovery_s) if recovery_s else None}


# ------------------------------------------------------------------------------------------- fuzzing

def _hostile_frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randint(0, 64))
    ops = list(P.OPS)
    body: dict[str, Any] = {"op": rng.choice(ops + ["nope", ""]), "id": rng.choice([0, 1, -1, 2**63 - 1, 7])}
    for field in rng.sample(["keys", "sizes", "parents", "segments", "version", "namespace", "wait"], rng.randint(0, 4)):
        body[field] = rng.choice([None, -1, 0, 2**40, "x", b"\0" * rng.randint(0, 40),
                                  [os.urandom(rng.choice([31, 32, 33])) for _ in range(rng.randint(0, 4))],
                                  [rng.randint(-5, 1 << 30) for _ in range(rng.randint(0, 4))]])
    return msgspec.msgpack.encode(body)


def fuzz(frames: int, seconds: float, seed: int = 2) -> dict[str, Any]:
    """Hostile frames on many connections while a verifying client checks its own blocks throughout."""
    rng = random.Random(seed)
    d = DaemonProcess({"dram.capacity_bytes": "32MiB", "dram.segment_bytes": "1MiB", "nvme.enabled": "false"})
    sent = internal = malformed = verify_errors = 0
    try:
        with Client.connect(d.socket_path) as good:
            keys = [os.urandom(32) for _ in range(32)]
            good.put(keys, [content(k) for k in keys])
            deadline = time.monotonic() + seconds
            while sent < frames and time.monotonic() < deadline:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(d.socket_path)
                hello = msgspec.msgpack.encode({"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
                s.sendall(struct.pack("<I", len(hello)) + hello)
                batch = [_hostile_frame(rng) for _ in range(500)]
                s.sendall(b"".join(struct.pack("<I", len(b)) + b for b in batch))
                s.shutdown(socket.SHUT_WR)
                data = b""
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
                s.close()
                sent += len(batch)
                pos = 0
                while pos + 4 <= len(data):
                    (n,) = struct.unpack_from("<I", data, pos)
                    try:
                        reply = msgspec.msgpack.decode(data[pos + 4:pos + 4 + n])
                    except msgspec.DecodeError:
                        malformed += 1
                        break
                    if not isinstance(reply, dict) or "code" not in reply:
                        malformed += 1
                    elif reply["code"] == P.ErrorCode.INTERNAL:
                        internal += 1
                    pos += 4 + n
                out = [bytearray(BLOCK) for _ in keys]
                if good.get_into(keys, out) != [True] * len(keys) or any(
                        bytes(o) != content(k) for o, k in zip(out, keys)):
                    verify_errors += 1
        crashed = d.proc.poll() is not None
    finally:
        rc = d.stop()
    return {"fuzz_frames": sent, "internal_errors": internal, "malformed_replies": malformed,
            "verify_errors": verify_errors, "daemon_crashes": int(crashed or rc != 0)}


# ------------------------------------------------------------------------------------- bad clients

def bad_clients(seconds: float) -> dict[str, Any]:
    """Clients killed mid-put and mid-get, holding pins, never reading replies, never saying hello, and more
    connections than descriptors: afterwards no lease is left held, memory growth stays bounded, and a good
    client saw no error."""
    d = DaemonProcess({"dram.capacity_bytes": "64MiB", "dram.segment_bytes": "1MiB", "nvme.enabled": "false",
                       "server.stalled_client_timeout_s": "2", "server.hello_timeout_s": "2"},
                      command_prefix=["prlimit", "--nofile=256:256", "--"])
    errors = 0
    try:
        base = rss_anon_bytes(d.pid)
        peak = base
        child = (
            "import os, sys, time\n"
            "from kvrack.clients import Client\n"
            "c = Client.connect(sys.argv[1])\n"
            "keys = [os.urandom(32) for _ in range(64)]\n"
            "c.put(keys, [b'x' * 65536] * 64)\n"
            "lease = c.get(keys)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n")
        deadline = time.monotonic() + seconds
        with Client.connect(d.socket_path) as good:
            mine = [os.urandom(32) for _ in range(16)]
            good.put(mine, [content(k) for k in mine])
            while time.monotonic() < deadline:
                procs = [subprocess.Popen([sys.executable, "-c", child, d.socket_path], stdout=subprocess.PIPE)
                         for _ in range(3)]
                for p in procs:
                    p.stdout.readline()  # type: ignore[union-attr]
                    p.send_signal(signal.SIGKILL)  # killed holding pins and a put's leases
                    p.wait()
                socks = []
                for _ in range(300):  # past the descriptor limit, no hello, partial frames
                    try:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.setblocking(False)
                        s.connect(d.socket_path)
                        s.send(struct.pack("<I", 60000) + b"\0" * 1000)
                        socks.append(s)
                    except OSError:
                        s.close()
                        break
                flood = []
                for _ in range(4):  # replies nobody reads
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(0.05)
                    try:
                        s.connect(d.socket_path)
                        hello = msgspec.msgpack.encode({"op": "hello", "id": 1, "version": P.PROTOCOL_VERSION})
                        s.sendall(struct.pack("<I", len(hello)) + hello)
                        s.sendall(P.encode_frame(P.Stats(id=2)) * 20000)
                    except OSError:
                        pass
                    flood.append(s)
                peak = max(peak, rss_anon_bytes(d.pid))
                try:
                    out = [bytearray(BLOCK) for _ in mine]
                    if good.get_into(mine, out) != [True] * len(mine) or any(
                            bytes(o) != content(k) for o, k in zip(out, mine)):
                        errors += 1
                except (KvrackError, OSError):
                    errors += 1
                for s in socks + flood:
                    s.close()
        time.sleep(0.5)
        leases = d.admin().stats()["leases"]
        leaked = _wait(lambda: sum(d.admin().stats()["leases"].values()) == 0, 10) and 0 or sum(leases.values())
        crashed = d.proc.poll() is not None
    finally:
        rc = d.stop()
    return {"leaked_leases": leaked, "max_rss_growth_bytes": peak - base, "good_client_errors": errors,
            "daemon_crashes": int(crashed or rc != 0)}


# -------------------------------------------------------------------------------------- tenants

def starvation(seconds: float) -> dict[str, Any]:
    """Tenant ``hog`` pins everything it can; tenant ``fair`` stays under its quota: it must never see NO_SPACE."""
    tmp = Path(tempfile.mkdtemp(prefix="kvrack-tenants-"))
    (tmp / "kvrack.toml").write_text('[[namespaces]]\nname = "hog"\nquota_dram_bytes = "24MiB"\n'
                                     '[[namespaces]]\nname = "fair"\nquota_dram_bytes = "24MiB"\n')
    d = DaemonProcess({"dram.capacity_bytes": "64MiB", "dram.segment_bytes": "1MiB", "nvme.enabled": "false"},
                      config_path=str(tmp / "kvrack.toml"))
    starved = 0
    try:
        with Client.connect(d.socket_path, namespace="hog") as hog, \
                Client.connect(d.socket_path, namespace="fair") as fair:
            leases = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                keys = [os.urandom(32) for _ in range(32)]
                hog.put(keys, [b"h" * 65536] * 32, raise_on_error=False)
                leases.append(hog.get(keys))  # and never lets go
                res = fair.put([os.urandom(32) for _ in range(8)], [b"f" * 65536] * 8, raise_on_error=False)
                starved += sum(1 for c in res.codes if c == P.ErrorCode.NO_SPACE)
            for lease in leases:
                lease.release()
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {"starved_tenant_errors": starved}


def run(long: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"mode": "long" if long else "short"}
    t0 = time.monotonic()
    report.update(crash_recovery(kills=20 if long else 3))
    fz = fuzz(frames=1_000_000 if long else 20_000, seconds=1800 if long else 60)
    bad = bad_clients(seconds=120 if long else 6)
    report.update(fz)
    report.update(bad)
    report["daemon_crashes"] = fz["daemon_crashes"] + bad["daemon_crashes"]
    report.update(starvation(seconds=20 if long else 3))
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="the long versions (≥ 20 kills, ≥ 1,000,000 frames)")
    parser.add_argument("--json", default="reliability-report.json", help="where to write the report")
    args = parser.parse_args()
    report = run(args.long)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    goals = {"corrupt_reads": 0, "lost_acknowledged_blocks": 0, "daemon_crashes": 0, "leaked_leases": 0,
             "starved_tenant_errors": 0}
    failed = [k for k, v in goals.items() if report[k] != v]
    if args.long and (report["kills_survived"] < 20 or report["fuzz_frames"] < 1_000_000):
        failed.append("counts")
    if report["max_rss_growth_bytes"] > 256 << 20:
        failed.append("max_rss_growth_bytes")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
