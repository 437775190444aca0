"""A router's subscriber in a process of its own, for ``kvrack bench local --events``: it keeps a prefix index
current from the daemon's KV events until SIGTERM, then prints how much it took in.

    python -m kvrack.bench.events_sub ENDPOINT

prints ``{"batches", "stored_blocks", "removed_blocks", "held_blocks", "gaps"}``: block copies announced stored
and removed, the blocks the index still holds at the end, and sequence gaps it could not fill.
"""

from __future__ import annotations

import json
import signal
import sys

from kvrack.clients.router import PrefixIndex


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    stop = False

    def on_term(*_a: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with PrefixIndex({"daemon": sys.argv[1]}) as index:
        while not stop:
            index.pump(quiet_s=0.1, max_s=1.0)
        index.pump(quiet_s=0.3, max_s=10.0)  # what the daemon published as it stopped
        s = index.stats()["daemon"]
    sys.stdout.write(json.dumps({"batches": s["batches"], "stored_blocks": s["stored_blocks"],
                                 "removed_blocks": s["removed_blocks"], "held_blocks": sum(s["blocks"].values()),
                                 "gaps": s["gaps"]}) + "\n")


if __name__ == "__main__":
    main()
