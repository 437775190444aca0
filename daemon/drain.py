"""One drain for the daemon's life: SIGTERM, ``POST /v1/drain`` and ``kvrack drain`` all start it.

States: serving -> draining (no new clients, no new puts; reads, commits and writes in flight go on until
nothing is held or the grace period ends) -> flushing (sessions closed, queued NVMe copies written, the DRAM
tier's state kept for a warm restart) -> stopped (the daemon exits 0).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass
class DrainState:
    state: str = "serving"
    reason: str | None = None
    started: float = 0.0  # monotonic
    grace_s: float | None = None
    deadline: float = 0.0
    finished: float = 0.0
    report: dict[str, Any] | None = None

    def begin(self, reason: str, grace_s: float) -> bool:
        """Start draining; False when already draining (a second request only shortens the grace)."""
        now = time.monotonic()
        if self.state != "serving":
            if self.state == "draining" and grace_s < self.deadline - now:
                self.deadline = now + grace_s
                self.grace_s = round(self.deadline - self.started, 3)
            return False
        self.state, self.reason, self.started, self.grace_s = "draining", reason, now, grace_s
        self.deadline = now + grace_s
        return True

    def elapsed(self) -> float | None:
        if self.state == "serving":
            return None
        return round((self.finished or time.monotonic()) - self.started, 3)
