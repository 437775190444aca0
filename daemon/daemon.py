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
from kvrack.daemon.hbm_pool import HbmPool, absent_stats
from kvrack.daemon.mover import Mover
from kvrack.daemon.nixl_export import NixlExport
from kvrack.daemon.reload import Reloader
from kvrack.daemon.server import ControlServer, socket_answers
from kvrack.daemon.settings import Config
from kvrack.daemon.stats import StatsRegistry
from kvrack.daemon.store import Store
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


def notify(state: str) -> None:
    """Tell systemd (Type=notify) where we are; a no-op outside systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        import sdnotify

        sdnotify.SystemdNotifier().notify(state)
    except Exception as exc:  # notification is advisory
        log.debug("sd_notify failed: %s", exc)


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


class Daemon:
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
        if isinstance(nvme, tuple):
            self._attach_nvme(*nvme)
        elif not c.nvme.enabled:
            log.info("nvme tier disabled (nvme.enabled = false): blocks live in DRAM only%s",
                     "" if c.dram.shm_dir else " and do not survive a restart")
        else:
            store.absent["nvme"] = {"tier": "nvme", "tier_id": 4, "available": False, "degraded": nvme}
        self._adopt_dram(adoption)
        self.server = ControlServer(store, c.server.socket_path, c.server.max_frame_bytes, c.server.max_batch_keys,
                                    c.server.socket_mode, self.registry)
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
        reg.register("daemon", lambda ns: {"version": __version__, "pid": os.getpid(),
                                           "uptime_s": round(time.time() - self.started, 1)})
        if server.tcp is not None:
            tcp = server.tcp
            reg.register("tcp", lambda ns: {"address": tcp.address,
                                            "nixl": server.nixl.stats() if server.nixl else None})

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
        self.server.tcp = TcpListener(self.server, c.tcp.host, c.tcp.port, tls, c.tcp.hello_timeout_s)
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
                                  c.nvme.region_bytes, c.nvme.io_threads)
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
        mover = Mover(store, nvme, c.nvme.write_batch_bytes, policy=c.nvme.policy)
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

    def _save_dram(self) -> None:
        """Clean shutdown with dram.shm_dir: write the slot table so the next start re-adopts the segments."""
        assert self.store is not None
        backing = self.store.tier.backing
        if not isinstance(backing, ShmDirBacking):
            return
        t0 = time.perf_counter()
        try:
            n = save_state(backing, self.store.tier.allocator.segment_bytes, self.store.tier.capacity,
                           ((e.ns.name, e.key, e.parent, e.seg.handle, e.seg.slot_size, e.slot, e.nbytes)
                            for e in self.store.dram_copies()))
        except OSError as exc:
            log.error("dram: cannot write the clean-shutdown state in %s: %s; the next start is cold", backing.dir, exc)
            return
        backing.keep_files = True
        log.info("dram: kept %d block(s) in %s for the next start (state written in %.2fs)", n, backing.dir,
                 time.perf_counter() - t0)

    # ------------------------------------------------------------------ serving
    async def serve(self) -> None:
        assert self.server is not None and self.store is not None
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.reload_from_sources)
        self.server.start(loop)
        self.store.movement.start(loop)
        gc.freeze()  # start-up objects (config, tiers, modules) never need collecting
        names = ", ".join(self.store.namespaces)
        log.info("kvrackd %s listening on unix:%s%s (namespaces: %s)", __version__, self.config.server.socket_path,
                 f" and {self.server.tcp.address}" if self.server.tcp else "", names)
        notify("READY=1\nSTATUS=serving")
        sweeper = asyncio.create_task(self._sweep_leases())
        evictor = asyncio.create_task(self._evict_in_background())
        await self.stop_event.wait()
        sweeper.cancel()
        evictor.cancel()
        await self.drain()

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

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: shutting down", signal.Signals(sig).name)
        notify("STOPPING=1")
        assert self.stop_event is not None
        self.stop_event.set()

    async def _sweep_leases(self) -> None:
        assert self.store is not None
        trim = _malloc_trim()
        next_trim = 0.0
        while True:
            await asyncio.sleep(self.config.leases.sweep_interval_s)
            self.store.sweep()
            self.store.movement.tick()
            # Index entries are long-lived and always unlinked explicitly, so the cyclic GC has
            # nothing to find among them; without this, each full collection walks every entry
            # (~255 ms at 1 M blocks). Freezing moves what exists now out of the GC's sight.
            gc.freeze()
            now = time.monotonic()
            if now >= next_trim and self.store.nvme is not None:
                trim()
                next_trim = now + 10.0

    async def drain(self) -> None:
        """Stop accepting, let queued replies go out (bounded), then close every session."""
        assert self.server is not None
        server = self.server
        server.stop_accepting()
        server.begin_drain()
        deadline = time.monotonic() + self.config.server.drain_timeout_s
        while (server.pending_output() or server.deferred) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        n = len(server.connections)
        server.close_all()
        log.info("closed %d session(s)", n)
        mover = self.store.nvme if self.store is not None else None
        if mover is not None:
            pending = mover.pending()
            if await mover.flush(max(deadline - time.monotonic(), 0.0) + 5.0):
                if pending:
                    log.info("nvme: wrote the %d block(s) still queued", pending)
            else:
                log.warning("nvme: %d block(s) not yet on nvme at shutdown%s", mover.pending(),
                            "" if self.config.dram.shm_dir else "; they are lost")
        self._save_dram()

    def close(self) -> None:
        if self.store is not None:
            self.store.movement.close()  # HBM, CXL, then NVMe (its index is flushed last)
        if self.server is not None and self.server.nixl is not None:
            self.server.nixl.close()
        if self.store is not None:
            self.store.tier.close()
        if self.socket_lock is not None:
            os.close(self.socket_lock)
            self.socket_lock = None
        log.info("kvrackd stopped")
