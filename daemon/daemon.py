"""The daemon's whole life as one object: claim its socket, open the tiers, serve, drain, close, each step logged."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

from kvrack import __version__, nixl_agent
from kvrack.daemon.cxl_pool import CxlPool, region_paths
from kvrack.daemon.drain import Draining, DrainState
from kvrack.daemon.hbm_pool import HbmPool, absent_stats
from kvrack.daemon.mover import Mover
from kvrack.daemon.nixl_export import NixlExport
from kvrack.daemon.reload import Reloader
from kvrack.daemon.server import ControlServer, ServerLimits, socket_answers
from kvrack.daemon.settings import Config
from kvrack.daemon.stats import StatsRegistry
from kvrack.daemon.store import Store
from kvrack.daemon.systemd import Notifier
from kvrack.daemon.tcp_listener import TcpListener, tls_context
from kvrack.sizes import format_size
from kvrack.tiers.dram import DramAdoption, open_dram_tier
from kvrack.tiers.dram_state import ShmDirBacking, save_state
from kvrack.tiers.hbm_ipc import probe as hbm_probe
from kvrack.tiers.nvme import NvmeTier, Recovery, open_nvme_tier
from kvrack.tiers.nvme_index import GeometryMismatch

log = logging.getLogger("kvrackd")


class TierError(RuntimeError):
    """A configured tier cannot be used and the configuration says that is fatal (or the socket is taken)."""


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim, or a no-op: the I/O threads' malloc arenas keep the high-water mark of a
    large write batch (futures, LMDB dirty pages) resident unless they are trimmed now and then."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0) and None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def claim_socket(path: str) -> int:
    """Lock ``PATH.lock`` for this daemon's life, and refuse a socket another daemon answers on: checked before
    any memory is allocated, so a second daemon costs nothing. Returns the lock's fd."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TierError(f"another kvrackd (pid {holder}) is already listening on (or starting up on) {path}") from None
    if socket_answers(path):
        os.close(fd)
        raise TierError(f"another kvrackd is already listening on {path}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon(Draining):
    """Config in; tiers, store, server and listeners out, in that order; closed in the reverse one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.stop_event: asyncio.Event | None = None
        self.store: Store | None = None
        self.server: ControlServer | None = None
        self.registry = StatsRegistry()
        self.socket_lock: int | None = None
        self.nvme_opened_in = 0.0
        self.reloader = Reloader(self)
        self.pid = os.getpid()
        self.notifier = Notifier()
        self.heartbeat = time.monotonic()  # the event loop's last tick (/healthz, the watchdog)
        self.serving = False
        self.drain_state = DrainState()
        self.admin: Any = None  # kvrack.daemon.admin.server.AdminServer, while it serves
        self.admin_token = b""
        self.admin_token_created = ""  # the token file this daemon wrote (removed when it stops)

    def claim(self) -> None:
        """Make sure this daemon is the only one on its socket before anything is allocated: a second
        kvrackd stops here, not after prefaulting its DRAM."""
        self.socket_lock = claim_socket(self.config.server.socket_path)

    def open(self) -> None:
        """Open the tiers: NVMe first (its index lock and recovery need no memory), then DRAM, then the rest."""
        c = self.config
        nvme = self._open_nvme() if c.nvme.enabled else None
        t0 = time.perf_counter()
        try:
            tier, adoption = open_dram_tier(c.dram.capacity_bytes, c.dram.segment_bytes, c.dram.hugepages,
                                            c.dram.prefault, c.dram.shm_dir)
        except BaseException:
            if isinstance(nvme, tuple):
                nvme[0].close()
            raise
        log.info("dram tier ready: %s in %.2fs", format_size(tier.capacity), time.perf_counter() - t0)
        tier.warm_in_background()
        store = self.store = Store(tier, c.namespaces, c.leases.reserve_timeout_s, c.leases.pin_timeout_s,
                                   policy=c.dram.policy)
        if c.events.enabled:  # before recovery: subscribers hear "cleared", then every block recovered
            self._open_events()
        if isinstance(nvme, tuple):
            self._attach_nvme(*nvme)
        elif not c.nvme.enabled:
            log.info("nvme tier disabled (nvme.enabled = false): blocks live in DRAM only%s",
                     "" if c.dram.shm_dir else " and do not survive a restart")
        else:
            store.absent["nvme"] = {"tier": "nvme", "tier_id": 4, "available": False, "degraded": nvme}
        self._adopt_dram(adoption)
        store.max_leases_per_session = c.leases.max_per_session
        limits = ServerLimits(c.server.hello_timeout_s, c.server.max_connections, c.server.max_connections_per_uid,
                              c.server.max_queued_reply_bytes, c.server.max_total_queued_reply_bytes,
                              c.server.stalled_client_timeout_s, c.server.max_total_partial_frame_bytes)
        self.server = ControlServer(store, c.server.socket_path, c.server.max_frame_bytes, c.server.max_batch_keys,
                                    c.server.socket_mode, self.registry, limits=limits)
        if c.cxl.enabled:
            self._open_cxl()
        self._open_hbm()
        if c.tcp.enabled:
            self._open_tcp()
        self._register_stats()

    def _register_stats(self) -> None:
        """Every section of the stats, each read from its owner."""
        store, server, reg = self.store, self.server, self.registry
        assert store is not None and server is not None
        reg.register("tiers", store.tier_stats)
        reg.register("ops", lambda ns: {**store.counters.as_dict(), **store.leases.counters.as_dict()})
        reg.register("namespaces", store.namespace_stats)
        reg.register("moves", lambda ns: store.movement.moves())
        reg.register("server", server.stats)
        reg.register("requests", server.opstats.stats)
        reg.register("errors", server.opstats.errors)
        reg.register("transfers", server.transfer_stats)
        reg.register("leases", store.lease_stats)
        reg.register("hits_by_tier", store.hit_stats)
        if store.events is not None:
            reg.register("events", store.events.stats)
        reg.register("daemon", lambda ns: {"version": __version__, "pid": os.getpid(),
                                           "uptime_s": round(time.time() - self.started, 1),
                                           "socket": self.config.server.socket_path,
                                           "admin": self.admin.addresses() if self.admin else None,
                                           "config_reloads": self.reloader.reloads})
        if server.tcp is not None:
            tcp = server.tcp
            reg.register("tcp", lambda ns: {"address": tcp.address,
                                            "nixl": server.nixl.stats() if server.nixl else None})

    def _open_events(self) -> None:
        """The KV-event publisher (kvrack.daemon.events); a namespace starts with AllBlocksCleared."""
        from kvrack.daemon.events import EventPublisher

        c = self.config
        assert self.store is not None
        try:
            pub = EventPublisher(c.events.endpoint, c.events.replay_endpoint, c.events.topic_prefix,
                                 c.events.interval_s, c.events.max_batch_events, c.events.max_queued_batches,
                                 c.events.replay_batches, c.events.max_blocks_per_s)
        except Exception as exc:  # zmq.ZMQError: a taken port, a bad endpoint
            raise TierError(f"cannot publish KV events on {c.events.endpoint} (events.endpoint, "
                            f"events.replay_endpoint): {exc}") from None
        for name in self.store.namespaces:
            pub.cleared(name)
        # every namespace's clear goes out before any recovered block: a consumer that ignores namespaces (vLLM's
        # own format has none) clears on each, and must not wipe one namespace's blocks with another's clear
        pub.batch_pending()
        self.store.events = pub
        log.info("kv events on %s%s, topics %s<namespace>", pub.endpoint,
                 f", replay on {pub.replay_endpoint}" if pub.replay_endpoint else "", c.events.topic_prefix)

    def _open_cxl(self) -> None:
        """One CXL region per namespace, the daemon its allocating host."""
        c = self.config
        assert self.store is not None
        paths = region_paths([ns.name for ns in c.namespaces], c.cxl.dir, c.cxl.paths)
        t0 = time.perf_counter()
        self.store.add_copier(CxlPool(self.store, paths, c.cxl.capacity_bytes, c.cxl.chunk_bytes, c.cxl.coherent,
                                      c.cxl.host_timeout_s, c.cxl.policy))
        log.info("cxl tier ready: %d region(s) (%s) in %.2fs; blocks up to %s are copied in behind each commit",
                 len(paths), ", ".join(paths.values()), time.perf_counter() - t0, format_size(c.cxl.chunk_bytes))

    def _open_hbm(self) -> None:
        """The HBM tier when it is enabled and a GPU is there; the log says which, and why not."""
        c = self.config
        assert self.store is not None
        if not c.hbm.enabled:
            self.store.absent["hbm"] = absent_stats("hbm.enabled is false")
            log.info("hbm tier off (hbm.enabled = false)")
            return
        present, why = hbm_probe(c.hbm.device)
        if not present:
            self.store.absent["hbm"] = absent_stats(why)
            log.warning("hbm tier absent: %s; serving from the other tiers", why)
            return
        t0 = time.perf_counter()
        self.store.add_copier(HbmPool(self.store, [ns.name for ns in c.namespaces], c.hbm.device, c.hbm.capacity_bytes,
                                      c.hbm.segment_bytes, c.hbm.promote_after_hits))
        log.info("hbm tier ready: %s on CUDA device %d in %.2fs; blocks read %d time(s) are copied up",
                 format_size(c.hbm.capacity_bytes), c.hbm.device, time.perf_counter() - t0, c.hbm.promote_after_hits)

    def _open_tcp(self) -> None:
        """The TCP listener for remote clients, with TLS and NIXL as configured."""
        c = self.config
        assert self.server is not None and self.store is not None
        remote = [ns.name for ns in c.namespaces if ns.token]
        if not remote:
            log.warning("tcp.enabled but no namespace has a token: every TCP hello will be refused")
        tls = None
        if c.tcp.tls_cert or c.tcp.tls_key:
            if not (c.tcp.tls_cert and c.tcp.tls_key):
                raise ValueError("TLS needs both tcp.tls_cert and tcp.tls_key")
            try:
                tls = tls_context(c.tcp.tls_cert, c.tcp.tls_key, c.tcp.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the TLS certificate or key: {exc}") from None
        self.server.tcp = TcpListener(self.server, c.tcp.host, c.tcp.port, tls, c.tcp.hello_timeout_s,
                                      c.tcp.tls_handshake_timeout_s)
        if c.tcp.nixl != "off":
            try:
                self.server.nixl = NixlExport(self.store.tier, c.tcp.nixl_progress_delay_us)
            except nixl_agent.NixlUnavailable as exc:
                if c.tcp.nixl == "on":
                    raise ValueError(f"tcp.nixl = on, but NIXL cannot be used: {exc}") from None
                log.warning("nixl unavailable, remote clients use the TCP byte stream: %s", exc)
        log.info("tcp: remote namespaces: %s; data transports: %s%s", ", ".join(remote) or "none",
                 f"nixl (agent {self.server.nixl.name}), tcp" if self.server.nixl else "tcp",
                 "; TLS on" + (" with client certificates" if c.tcp.tls_client_ca else "") if tls else "")

    def _open_nvme(self) -> tuple[NvmeTier, Recovery, list[Any]] | str:
        """Open and recover the NVMe tier. If it cannot open: stop (nvme.required), or go on without it
        (returns why)."""
        c = self.config
        t0 = time.perf_counter()
        nvme = None
        try:
            nvme = open_nvme_tier(c.nvme.dir, c.nvme.paths, c.nvme.capacity_bytes, c.nvme.index_dir,
                                  c.nvme.region_bytes, c.nvme.io_threads, c.nvme.fault_plan)
            if c.nvme.fault_plan:
                log.warning("nvme.fault_plan = %s: injecting the I/O faults that file names (a test setting)",
                            c.nvme.fault_plan)
            report, blocks = nvme.recover()
        except (OSError, ValueError, GeometryMismatch) as exc:
            if nvme is not None:
                nvme.close()
            if c.nvme.required:
                raise TierError(f"the nvme tier cannot open: {exc} (nvme.required = true; set it to false to serve "
                                "from DRAM only when this happens, or nvme.enabled = false)") from None
            log.error("nvme tier unavailable, serving from DRAM only (nvme.required = false): %s", exc)
            return str(exc)
        self.nvme_opened_in = time.perf_counter() - t0
        return nvme, report, blocks

    def _attach_nvme(self, nvme: NvmeTier, report: Recovery, blocks: list[Any]) -> None:
        c = self.config
        store = self.store
        assert store is not None
        if c.nvme.region_bytes < c.dram.segment_bytes:
            log.warning("nvme.region_bytes (%s) < dram.segment_bytes (%s): blocks larger than a region stay in DRAM only",
                        format_size(c.nvme.region_bytes), format_size(c.dram.segment_bytes))
        store.set_admission(c.nvme.admission)
        mover = Mover(store, nvme, c.nvme.write_batch_bytes, retry_s=c.nvme.retry_interval_s, policy=c.nvme.policy,
                      keep_unpersisted=c.nvme.keep_unpersisted)
        mover.adopt(report, blocks)
        store.attach(mover)
        log.info("nvme tier ready: %s on %s, index %s; recovered %d block(s), %s, in %.2fs (%d dropped); opened in %.2fs",
                 format_size(nvme.capacity), ", ".join(p.path for p in nvme.paths), nvme.index.env.path(),
                 report.blocks, format_size(report.bytes) if report.bytes else "0 bytes", report.seconds, report.dropped,
                 self.nvme_opened_in)

    def _adopt_dram(self, adoption: DramAdoption) -> None:
        """Index the DRAM blocks a clean shutdown left in dram.shm_dir (after NVMe recovery)."""
        assert self.store is not None
        if not self.config.dram.shm_dir:
            return
        if adoption.cold_reason:
            log.info("dram: starting cold: %s; removed %d stale segment file(s)", adoption.cold_reason,
                     adoption.removed_files)
            return
        n = self.store.adopt_dram(adoption.blocks)
        log.info("dram: re-adopted %d block(s), %s, from %s in %.2fs (%d dropped)", n,
                 format_size(adoption.bytes) if adoption.bytes else "0 bytes", self.config.dram.shm_dir,
                 adoption.seconds, len(adoption.blocks) - n)

    def _save_dram(self) -> int:
        """Clean shutdown with dram.shm_dir: write the slot table so the next start re-adopts the segments.
        Returns how many blocks it kept."""
        assert self.store is not None
        backing = self.store.tier.backing
        if not isinstance(backing, ShmDirBacking):
            return 0
        t0 = time.perf_counter()
        try:
            n = save_state(backing, self.store.tier.allocator.segment_bytes, self.store.tier.capacity,
                           ((e.ns.name, e.key, e.parent, e.seg.handle, e.seg.slot_size, e.slot, e.nbytes)
                            for e in self.store.dram_copies()))
        except OSError as exc:
            log.error("dram: cannot write the clean-shutdown state in %s: %s; the next start is cold", backing.dir, exc)
            return 0
        backing.keep_files = True
        log.info("dram: kept %d block(s) in %s for the next start (state written in %.2fs)", n, backing.dir,
                 time.perf_counter() - t0)
        return n

    # ------------------------------------------------------------------ serving
    async def serve(self) -> None:
        assert self.server is not None and self.store is not None
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        if self.config.admin.enabled:  # first: when clients can connect, the admin API answers too
            self._start_admin(loop)
        self.server.start(loop)
        self.store.movement.start(loop)
        if self.store.events is not None:
            self.store.events.start(loop)
        gc.freeze()  # start-up objects (config, tiers, modules) never need collecting
        names = ", ".join(self.store.namespaces)
        log.info("kvrackd %s listening on unix:%s%s (namespaces: %s)%s", __version__, self.config.server.socket_path,
                 f" and {self.server.tcp.address}" if self.server.tcp else "", names,
                 f"; admin API on {self.admin.addresses()}" if self.admin else "")
        self.serving = True
        self.notifier.ready(self.summary())
        tasks = [asyncio.create_task(t) for t in (self._sweep_leases(), self._evict_in_background(), self._tick())]
        try:
            await self.stop_event.wait()
            await self.drain()
        finally:
            for task in tasks:
                task.cancel()
            if self.store.events is not None:
                self.store.events.close()  # what the drain evicted or wrote goes out first
            if self.admin is not None:
                # on a worker thread: the admin API's last replies (a drain's report) may still need this loop
                await asyncio.sleep(0.05)
                await loop.run_in_executor(None, self.admin.stop)
                self.admin = None
                if self.admin_token_created:
                    _unlink(self.admin_token_created)

    def _start_admin(self, loop: asyncio.AbstractEventLoop) -> None:
        """The admin API and /metrics on their own thread (kvrack.daemon.admin)."""
        from kvrack.daemon.admin.app import build_app
        from kvrack.daemon.admin.bridge import LoopBridge
        from kvrack.daemon.admin.server import AdminServer, admin_token

        c = self.config
        path = c.admin.socket_path or os.path.join(os.path.dirname(c.server.socket_path) or ".", "kvrack-admin.sock")
        self.admin_token, where = admin_token(c.admin.token_file, os.path.splitext(path)[0] + ".token")
        self.admin_token_created = "" if c.admin.token_file else where
        admin = AdminServer(build_app(self, LoopBridge(loop)), path, c.server.socket_mode, c.admin.tcp_host,
                            c.admin.tcp_port)
        admin.start()
        self.admin = admin
        log.info("admin API on %s; mutations need the token in %s", admin.addresses(), where)

    def summary(self) -> str:
        """One line for systemd's STATUS=: state, sessions, DRAM use, blocks, hit ratio, NVMe."""
        store, server = self.store, self.server
        assert store is not None and server is not None
        c = store.counters
        state = self.drain_state.state if self.drain_state.state != "serving" else "serving"
        parts = [f"{state}: {len(server.connections)} session(s)",
                 f"dram {format_size(store.dram_bytes) if store.dram_bytes else '0 bytes'} of "
                 f"{format_size(store.tier.capacity)}, {store.dram_blocks} blocks"]
        if store.nvme is not None:
            parts.append(f"nvme {format_size(store.nvme.bytes)}" + (" DEGRADED" if store.nvme.nvme.degraded else ""))
        if c.lookup_keys:
            parts.append(f"hit ratio {c.lookup_hits / c.lookup_keys:.2f}")
        return ", ".join(parts)

    async def _tick(self) -> None:
        """The event loop's heartbeat: pings systemd's watchdog (at half its timeout, at most every second)
        and refreshes the STATUS= line; a wedged loop stops both, and systemd restarts the daemon."""
        every = min(1.0, self.notifier.watchdog_s / 2) if self.notifier.watchdog_s else 1.0
        n = 0
        while True:
            self.heartbeat = time.monotonic()
            if self.notifier.watchdog_s:
                self.notifier.watchdog()
            if n % max(1, int(10 / every)) == 0:
                self.notifier.status(self.summary())
            n += 1
            await asyncio.sleep(every)

    async def _evict_in_background(self) -> None:
        """Above the high watermark, evict in small batches down to the low one, yielding to requests
        between batches: a put then finds a free slot instead of evicting on its own path."""
        assert self.store is not None
        store = self.store
        store.set_watermarks(self.config.dram.evict_high_watermark, self.config.dram.evict_low_watermark)
        pressure = asyncio.Event()
        store.pressure = pressure.set
        while True:
            await pressure.wait()
            pressure.clear()
            while store.evict_background(4):
                await asyncio.sleep(0)

    def _on_reload(self) -> None:
        self.notifier.reloading()
        try:
            self.reloader.reload_from_sources()
        finally:
            self.notifier.ready(self.summary())

    async def _sweep_leases(self) -> None:
        assert self.store is not None and self.server is not None
        trim = _malloc_trim()
        next_trim = 0.0
        queued_high = 0  # most reply bytes queued since the last trim
        while True:
            await asyncio.sleep(self.config.leases.sweep_interval_s)
            self.store.sweep()
            self.store.movement.tick()
            self.server.close_stalled(time.monotonic())
            queued = self.server.queued_frame_bytes
            queued_high = max(queued_high, queued)
            if queued_high > 16 << 20 and queued < queued_high // 4:
                trim()  # replies queued for clients that did not read them are gone: give the memory back
                queued_high = queued
            # Index entries are long-lived and always unlinked explicitly, so the cyclic GC has
            # nothing to find among them; without this, each full collection walks every entry
            # (~255 ms at 1 M blocks). Freezing moves what exists now out of the GC's sight.
            gc.freeze()
            now = time.monotonic()
            if now >= next_trim and self.store.nvme is not None:
                trim()
                next_trim = now + 10.0

    def close(self) -> None:
        if self.store is not None and self.store.events is not None:
            self.store.events.close(flush=False)  # (already closed after a drain; a failed start lands here)
        if self.store is not None:
            self.store.movement.close()  # HBM, CXL, then NVMe (its index is flushed last)
        if self.server is not None and self.server.nixl is not None:
            self.server.nixl.close()
        if self.store is not None:
            self.store.tier.close()
        if self.socket_lock is not None:
            os.close(self.socket_lock)
            self.socket_lock = None
        self.notifier.close()
        log.info("kvrackd stopped")
