"""Soak: mixed load with client churn against one daemon, reporting RSS, open descriptors and latency
percentiles at every interval; after warm-up they must stay flat.

    make soak                                       # 30 minutes, a line a minute, soak-report.json
    python -m tests.reliability.soak --minutes 2 --interval 20 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvrack.bench.spawn import DaemonProcess, rss_anon_bytes
from kvrack.clients import Client, KvrackError
from tests.reliability.suite import content


def _client_loop(path: str, stop: threading.Event, latencies: list[float], errors: list[str], seed: int) -> None:
    rng = random.Random(seed)
    keys: list[bytes] = []
    while not stop.is_set():
        try:
            with Client.connect(path, timeout=10.0) as c:  # a new connection every few hundred ops: churn
                for _ in range(rng.randint(50, 400)):
                    if stop.is_set():
                        break
                    t0 = time.perf_counter()
                    op = rng.random()
                    if op < 0.4 or not keys:
                        batch = [os.urandom(32) for _ in range(4)]
                        c.put(batch, [content(k, 8192) for k in batch], raise_on_error=False)
                        keys.extend(batch)
                        del keys[:-2000]
                    elif op < 0.8:
                        batch = rng.sample(keys, min(8, len(keys)))
                        out = [bytearray(8192) for _ in batch]
                        hits = c.get_into(batch, out, exact=False)
                        for k, hit, buf in zip(batch, hits, out):
                            if hit and bytes(buf) != content(k, 8192):
                                errors.append("wrong bytes")
                    else:
                        c.lookup(rng.sample(keys, min(32, len(keys))))
                    latencies.append(time.perf_counter() - t0)
        except (KvrackError, OSError) as exc:
            errors.append(repr(exc))


def soak(minutes: float, interval_s: float, clients: int = 6) -> dict[str, Any]:
    d = DaemonProcess({"dram.capacity_bytes": "128MiB", "dram.segment_bytes": "4MiB", "nvme.capacity_bytes": "512MiB"})
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    threads = [threading.Thread(target=_client_loop, args=(d.socket_path, stop, latencies, errors, i), daemon=True)
               for i in range(clients)]
    try:
        for t in threads:
            t.start()
        start = time.monotonic()
        while time.monotonic() - start < minutes * 60:
            time.sleep(interval_s)
            window, latencies[:] = list(latencies), []
            window.sort()
            rows.append({"t_s": round(time.monotonic() - start), "rss_bytes": rss_anon_bytes(d.pid),
                         "fds": len(os.listdir(f"/proc/{d.pid}/fd")), "ops": len(window),
                         "p50_us": round(window[len(window) // 2] * 1e6, 1) if window else None,
                         "p99_us": round(window[int(len(window) * 0.99)] * 1e6, 1) if window else None,
                         "errors": len(errors)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        rc = d.stop()
    warm = rows[len(rows) // 3:] or rows  # after the first third: caches full, pools at size
    rss = [r["rss_bytes"] for r in warm]
    fds = [r["fds"] for r in warm]
    p99 = [r["p99_us"] for r in warm if r["p99_us"] is not None]
    return {"minutes": minutes, "rows": rows, "errors": errors[:20], "exit_status": rc,
            "rss_growth_after_warmup_bytes": max(rss) - rss[0], "fd_growth_after_warmup": max(fds) - fds[0],
            "p99_us_median": statistics.median(p99) if p99 else None}


def flat(report: dict[str, Any]) -> list[str]:
    """What is not flat: RSS growth past 64 MiB after warm-up, descriptors past 32, errors, a bad exit."""
    problems = []
    if report["rss_growth_after_warmup_bytes"] > 64 << 20:
        problems.append(f"RSS grew {report['rss_growth_after_warmup_bytes'] >> 20} MiB after warm-up")
    if report["fd_growth_after_warmup"] > 32:
        problems.append(f"{report['fd_growth_after_warmup']} more descriptors after warm-up")
    if report["errors"]:
        problems.append(f"client errors: {report['errors'][:3]}")
    if report["exit_status"] != 0:
        problems.append(f"daemon exit status {report['exit_status']}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--json", default="soak-report.json")
    args = parser.parse_args()
    report = soak(min(args.minutes, 24 * 60), args.interval)
    report["problems"] = flat(report)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("flat" if not report["problems"] else "\n".join(report["problems"]))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
