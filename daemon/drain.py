"""One drain for the daemon's life: SIGTERM, ``POST /v1/drain`` and ``kvrack drain`` all start it.

States: serving -> draining (no new clients, no new puts; reads, commits and writes in flight go on until
nothing is held or the grace period ends) -> flushing (sessions closed, queued NVMe copies written, the DRAM
tier's state kept for a warm restart) -> stopped (the daemon exits 0). ``DrainState`` is where a drain is;
``Draining`` (part of ``Daemon``) runs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from kvrack.sizes import format_size

if TYPE_CHECKING:
    from kvrack.daemon.server import ControlServer
    from kvrack.daemon.settings import Config
    from kvrack.daemon.store import Store
    from kvrack.daemon.systemd import Notifier

log = logging.getLogger("kvrackd")


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


class Draining:
    """Part of ``Daemon`` (kvrack.daemon.daemon): the attributes and methods below are the daemon's."""

    config: Config
    server: ControlServer | None
    store: Store | None
    notifier: Notifier
    drain_state: DrainState
    stop_event: asyncio.Event | None

    def _save_dram(self) -> int:
        raise NotImplementedError  # the daemon's

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.drain_state.state != "serving":
            log.warning("%s received while %s: not waiting for work in flight any longer", name,
                        self.drain_state.state)
            self.request_stop(name, 0.0)
            return
        self.request_stop(name)

    def request_stop(self, reason: str, grace_s: float | None = None) -> None:
        """Drain and exit (SIGTERM, the admin API): one path. ``grace_s``: how long work in flight may take
        (server.drain_timeout_s by default); asking again with a shorter grace shortens it."""
        grace = self.config.server.drain_timeout_s if grace_s is None else grace_s
        if self.drain_state.begin(reason, grace):
            log.info("draining (%s): no new clients or puts; waiting up to %.1f s for work in flight", reason, grace)
            self.notifier.stopping(f"draining ({reason})")
            if self.server is not None:
                self.server.begin_drain()
        if self.stop_event is not None:
            self.stop_event.set()

    def drain_status(self) -> dict[str, Any]:
        """Where the drain is (``GET /v1/drain``): what is still held and in flight."""
        d = self.drain_state
        out: dict[str, Any] = {"state": d.state, "reason": d.reason, "elapsed_s": d.elapsed(), "grace_s": d.grace_s,
                               "report": d.report}
        server, store = self.server, self.store
        if server is not None and store is not None and d.state in ("serving", "draining"):
            leases = store.lease_stats()
            out.update(sessions=len(server.connections), reservations=leases["reservations"], pins=leases["pins"],
                       in_flight=server.in_flight(), pending_output_bytes=server.pending_output(),
                       nvme_pending=store.nvme.pending() if store.nvme is not None else 0)
        return out

    async def drain(self) -> None:
        """Stop admitting (no new clients, no new puts), let work in flight finish until nothing is held or the
        grace period ends, close every session, write queued NVMe copies and keep the DRAM state."""
        assert self.server is not None and self.store is not None
        server, store, d = self.server, self.store, self.drain_state
        if d.state == "serving":  # stop_event set some other way
            d.begin("stop", self.config.server.drain_timeout_s)
            server.begin_drain()
        server.stop_accepting()
        while not server.quiet() and time.monotonic() < d.deadline:
            await asyncio.sleep(0.01)
        d.state = "flushing"
        self.notifier.status("flushing")
        leases = store.lease_stats()
        report: dict[str, Any] = {"waited_s": round(time.monotonic() - d.started, 3), "quiet": server.quiet(),
                                  "sessions_closed": len(server.connections),
                                  "reservations_aborted": leases["reservations"], "pins_released": leases["pins"],
                                  "requests_abandoned": server.in_flight()}
        server.close_all()
        log.info("drain: closed %d session(s) after %.2f s%s", report["sessions_closed"], report["waited_s"],
                 "" if report["quiet"] else f" (grace over: {report['reservations_aborted']} reservation(s) aborted, "
                 f"{report['pins_released']} pin(s) released, {report['requests_abandoned']} request(s) abandoned)")
        mover = store.nvme
        if mover is not None:
            mover.retry_now()  # blocks kept for a retry get one more try, within the same bound
            pending = mover.pending()
            await mover.flush(max(d.deadline - time.monotonic(), 0.0) + 5.0)
            left, left_bytes = mover.not_on_nvme()
            if pending and not left:
                log.info("nvme: wrote the %d block(s) still queued", pending)
            elif left:
                kept = self.config.dram.shm_dir
                log.error("nvme: %d acknowledged block(s), %s, are not on nvme at shutdown (%s)%s", left,
                          format_size(left_bytes), mover.nvme.degraded or "their writes did not finish in time",
                          "; kept in dram.shm_dir, written at the next start" if kept else
                          "; they are lost (set dram.shm_dir to keep them over a restart)")
            report["nvme_not_persisted"] = left
        report["dram_kept_blocks"] = self._save_dram()
        d.report = report
        d.finished = time.monotonic()
        d.state = "stopped"
