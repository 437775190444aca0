"""An operator's load on the admin API, in a process of its own: a Prometheus-style scrape of /metrics every
second and a dashboard polling /v1/stats ten times a second, until SIGTERM or ``--seconds``. ``kvrack bench local
--admin-load`` runs it beside the benchmark so the data-plane figures show what an admin client costs.

    python -m kvrack.bench.admin_load ADMIN [--seconds N]     # prints {"scrapes": ..., "stats": ..., "errors": ...}
"""

from __future__ import annotations

import json
import signal
import sys
import time

from kvrack.clients.admin import AdminApiError, AdminClient

SCRAPE_EVERY_S = 1.0
STATS_EVERY_S = 0.1


def run(admin: str, seconds: float) -> dict[str, int]:
    api = AdminClient(admin, timeout=5.0)
    stop = False

    def on_term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    counts = {"scrapes": 0, "stats": 0, "errors": 0}
    start = time.monotonic()
    next_scrape = next_stats = start
    while not stop and time.monotonic() - start < seconds:
        now = time.monotonic()
        try:
            if now >= next_scrape:
                api.metrics()
                counts["scrapes"] += 1
                next_scrape += SCRAPE_EVERY_S
            if now >= next_stats:
                api.stats()
                counts["stats"] += 1
                next_stats += STATS_EVERY_S
        except AdminApiError:
            counts["errors"] += 1
        time.sleep(max(0.0, min(next_scrape, next_stats) - time.monotonic()))
    return counts


def main() -> None:
    args = sys.argv[1:]
    seconds = 3600.0
    if "--seconds" in args:
        i = args.index("--seconds")
        seconds = float(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    sys.stdout.write(json.dumps(run(args[0], min(seconds, 3600.0))) + "\n")


if __name__ == "__main__":
    main()
