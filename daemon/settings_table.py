"""Every daemon setting, declared once: name, type, default, bounds, whether it may change at runtime, help.

The TOML loader, the ``KVRACK_*`` environment overrides, ``kvrackd --print-config``,
``deploy/kvrack.example.toml``, the typed attributes code reads (``kvrack.daemon.settings_view``) and the
runtime changes (``kvrack.daemon.reload``) all come from ``SETTINGS``. Namespaces are a list of tables
(``[[namespaces]]``) described by ``NAMESPACE_FIELDS``. ``kvrack.daemon.settings`` loads them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from kvrack.address import user_socket_path
from kvrack.sizes import parse_size
from kvrack.tiers.nvme import default_nvme_dir


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of bounds."""


def default_dram_capacity() -> int:
    """min(2 GiB, a quarter of physical memory)."""
    return min(2 * 1024**3, physical_memory() // 4)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # dotted: section.key
    kind: str  # "int", "size", "float", "bool", "str", "choice", "list" (of strings)
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    runtime: bool = False  # may change without a restart
    dynamic_default: Callable[[], Any] | None = None
    default_doc: str = ""  # how a computed default is shown in the example file

    @property
    def env(self) -> str:
        return "KVRACK_" + self.name.replace(".", "_").upper()

    def resolve_default(self) -> Any:
        return self.dynamic_default() if self.dynamic_default else self.default

    def coerce(self, value: Any, source: str) -> Any:
        """Check and convert one raw value (from TOML or the environment)."""
        where = f"{self.name} (from {source})"
        try:
            if self.kind == "size":
                value = parse_size(value)
            elif self.kind == "int":
                if isinstance(value, str):
                    value = int(value, 0)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"expected an integer, got {value!r}")
            elif self.kind == "float":
                if isinstance(value, str):
                    value = float(value)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"expected a number, got {value!r}")
                value = float(value)
            elif self.kind == "bool":
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ConfigError(f"expected true/false, got {value!r}")
                    value = low in ("1", "true", "yes", "on")
                if not isinstance(value, bool):
                    raise ConfigError(f"expected true/false, got {value!r}")
            elif self.kind == "list":
                if isinstance(value, str):  # environment / command line: comma-separated
                    value = [v.strip() for v in value.split(",") if v.strip()]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"expected a list of strings, got {value!r}")
            elif self.kind in ("str", "choice"):
                if not isinstance(value, str):
                    raise ConfigError(f"expected a string, got {value!r}")
                if self.choices and value not in self.choices:
                    raise ConfigError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.min is not None and value < self.min:
            raise ConfigError(f"{where}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{where}: {value} is above the maximum {self.max}")
        return value


KiB, MiB, GiB = 1024, 1024**2, 1024**3

# the eviction policies a tier may name (kvrack.daemon.policies.POLICIES; a test keeps the two in step)
POLICY_NAMES = ("lru", "chain", "s3fifo", "sieve", "lfu")

SETTINGS: tuple[Setting, ...] = (
    Setting("server.socket_path", "str", None, "Unix socket the control server listens on.",
            dynamic_default=user_socket_path, default_doc="$XDG_RUNTIME_DIR/kvrack/kvrack.sock, else /tmp/kvrack/kvrack.sock"),
    Setting("server.socket_mode", "int", 0o666, "Permission bits of the socket file; namespaces restrict who may use them.",
            min=0, max=0o777),
    Setting("server.max_frame_bytes", "size", 16 * MiB, "Largest request frame accepted; larger frames close the connection.",
            min=4 * KiB, max=1 * GiB),
    Setting("server.max_batch_keys", "int", 262144, "Most keys one request may carry.", min=1, max=16_777_216),
    Setting("server.drain_timeout_s", "float", 5.0, "On SIGTERM, how long to wait for replies in flight before closing.",
            min=0.0, max=600.0),
    Setting("server.hello_timeout_s", "float", 10.0, "A Unix-socket connection that has not said hello within this "
            "time is closed (TCP has tcp.hello_timeout_s).", min=0.1, max=3600.0),
    Setting("server.max_connections", "int", 4096, "Most client connections at once (Unix socket and TCP); past it a "
            "new connection gets a BUSY error and is closed.", min=1, max=1_000_000),
    Setting("server.max_connections_per_uid", "int", 1024, "Most connections at once from one Unix user (the peer "
            "credentials), so one local user cannot take them all.", min=1, max=1_000_000),
    Setting("server.max_queued_reply_bytes", "size", 4 * MiB, "Reply bytes a connection may have queued; past it the "
            "daemon reads no further request from it until its client reads (block bytes of TCP reads aside: they are "
            "sent from the tier's memory).", min=64 * KiB, max=1 * GiB),
    Setting("server.max_total_queued_reply_bytes", "size", 256 * MiB, "Reply bytes queued on all connections together; "
            "past it, connections with replies queued are read no further until they drain.", min=1 * MiB,
            max=64 * GiB),
    Setting("server.stalled_client_timeout_s", "float", 60.0, "A connection kept over its reply limit this long (its "
            "client does not read), or whose incomplete request frame gets no byte for this long, is closed.",
            min=1.0, max=86400.0),
    Setting("server.max_total_partial_frame_bytes", "size", 256 * MiB, "Bytes of incomplete request frames buffered "
            "on all connections together; a connection that takes the total past it is closed (FRAME_TOO_LARGE).",
            min=1 * MiB, max=64 * GiB),
    Setting("leases.reserve_timeout_s", "float", 30.0, "A reservation not committed or aborted within this time is freed.",
            min=0.1, max=86400.0, runtime=True),
    Setting("leases.pin_timeout_s", "float", 300.0, "A pin not released within this time (since its last acquire) ends.",
            min=0.1, max=86400.0, runtime=True),
    Setting("leases.sweep_interval_s", "float", 0.5, "How often expired leases are looked for.", min=0.01, max=60.0),
    Setting("leases.max_per_session", "int", 1 << 20, "Most reservations and pins one connection may hold at once "
            "(expired ones it has not let go of included); past it its reserves and acquires fail per key with "
            "NO_SPACE.", min=1, max=1 << 30),
    Setting("dram.capacity_bytes", "size", None, "Bytes of shared memory for the DRAM tier.",
            min=0, dynamic_default=default_dram_capacity, default_doc="min(2GiB, a quarter of physical memory)"),
    Setting("dram.segment_bytes", "size", 64 * MiB, "Size of one shared-memory segment; also the largest block.",
            min=64 * KiB, max=64 * GiB),
    Setting("dram.hugepages", "bool", False, "Back segments with huge pages (memfd MFD_HUGETLB; needs reserved hugepages)."),
    Setting("dram.prefault", "bool", True, "Allocate every page of a segment when it is created, so puts do not fault."),
    Setting("dram.shm_dir", "str", "",
            "Directory on tmpfs (/dev/shm/kvrack) or a hugetlbfs mount for named segment files that outlive the "
            "daemon: after a clean stop the next start re-adopts every DRAM block. Empty: anonymous memfds, DRAM "
            "starts cold. Segment files stay (and hold memory) while the daemon is stopped."),
    Setting("dram.policy", "choice", "lru",
            "Eviction order of the DRAM tier (see docs/policies.md and `kvrack sim` to pick one for a workload).",
            choices=POLICY_NAMES),
    Setting("dram.evict_high_watermark", "float", 0.95,
            "When more than this share of DRAM is in use, a background evictor frees blocks down to "
            "dram.evict_low_watermark, so a put rarely has to evict on its own path (1.0 turns it off).",
            min=0.1, max=1.0, runtime=True),
    Setting("dram.evict_low_watermark", "float", 0.90, "Where the background evictor stops (share of DRAM in use).",
            min=0.05, max=1.0, runtime=True),
    Setting("nvme.enabled", "bool", True,
            "Keep every committed block on the NVMe tier too (written behind the commit), so blocks outlive DRAM "
            "eviction and daemon restarts."),
    Setting("nvme.required", "bool", True,
            "With nvme.enabled, a tier that cannot open (unwritable directory, index in use, wrong geometry) stops "
            "the daemon at start-up (true), or is left out with an error logged and blocks kept in DRAM only "
            "(false: available, but nothing survives a restart)."),
    Setting("nvme.dir", "str", None, "Directory of the default data file (when nvme.paths is empty) and of the index.",
            dynamic_default=default_nvme_dir,
            default_doc="$XDG_DATA_HOME/kvrack (~/.local/share/kvrack); /var/lib/kvrack for a systemd service run as root"),
    Setting("nvme.paths", "list", [],
            "Data files or block devices, each \"PATH\" or \"PATH=SIZE\" (e.g. \"/dev/nvme1n1\" for a local or NVMe-oF "
            "namespace, \"/mnt/nvme0/kvrack.data=800GiB\"). Empty: one file nvme.dir/kvrack-nvme.data."),
    Setting("nvme.capacity_bytes", "size", 0,
            "Size of the default data file; 0 = min(10GiB, 10% of the free space in nvme.dir). Files never shrink.",
            min=0),
    Setting("nvme.index_dir", "str", "", "LMDB index directory; empty = nvme.dir/index. Must be on durable local storage."),
    Setting("nvme.region_bytes", "size", 64 * MiB, "Allocation region of the data files; also the largest block kept "
            "on NVMe (keep it >= dram.segment_bytes).", min=64 * KiB, max=4 * GiB),
    Setting("nvme.policy", "choice", "clock",
            "Eviction order of the NVMe tier: clock (second chance; 8 bytes a block) or a named policy as for "
            "dram.policy (its per-block bookkeeping, ~100 bytes a block).",
            choices=("clock", *POLICY_NAMES)),
    Setting("nvme.admission", "choice", "all",
            "Which blocks reach NVMe: all = every commit is written through (each block survives DRAM eviction "
            "and restarts); reused = written only when DRAM evicts a block that was read or seen twice (far fewer "
            "flash writes; one-time blocks are simply dropped); demote = every block DRAM evicts.",
            choices=("all", "reused", "demote")),
    Setting("nvme.keep_unpersisted", "bool", True,
            "A written-through block whose NVMe write failed (or that came while the tier was degraded) stays pinned "
            "in DRAM until a retry writes it, so DRAM eviction never loses an acknowledged block; false lets DRAM "
            "evict such blocks (counted as evicted_unpersisted) so that a long NVMe outage cannot fill DRAM with them.",
            ),
    Setting("nvme.retry_interval_s", "float", 30.0, "After a failed write, how long before the tier is tried again (the "
            "blocks kept for it are written, or a probe write when there are none).", min=0.1, max=3600.0),
    Setting("nvme.io_threads", "int", 8, "Reads and writes in flight at once (the device's queue depth).", min=1, max=256),
    Setting("nvme.write_batch_bytes", "size", 64 * MiB, "Most bytes per durable write batch (one fdatasync and one "
            "index commit each).", min=64 * KiB, max=16 * GiB),
    Setting("nvme.fault_plan", "str", "", "Testing only, never in production: a JSON file of I/O faults to inject "
            "into the NVMe tier's files, re-read when it changes ({\"write_errno\": \"EIO\", \"read_errno\": ..., "
            "\"delay_s\": 0.2, \"torn_writes\": true}); empty = none."),
    Setting("cxl.enabled", "bool", False,
            "CXL shared-memory tier: one region per namespace that every host mapping it reads without asking the "
            "daemon. Committed blocks are copied into it behind the commit. See docs/cxl.md."),
    Setting("cxl.dir", "str", "/dev/shm",
            "Directory for region files kvrack-cxl-NAMESPACE (a DAX file system on CXL memory, hugetlbfs, or "
            "tmpfs to try it without CXL)."),
    Setting("cxl.paths", "list", [],
            "Regions on devices, \"NAMESPACE=PATH\" each (e.g. \"team-a=/dev/dax0.0\"); other namespaces use cxl.dir."),
    Setting("cxl.capacity_bytes", "size", 1 * GiB, "Size of each namespace's region file (devices use their whole size).",
            min=16 * MiB),
    Setting("cxl.chunk_bytes", "size", 2 * MiB, "Chunk size of a region: the largest block kept in CXL.",
            min=4 * KiB, max=1 * GiB),
    Setting("cxl.coherent", "bool", False,
            "The hosts' hardware keeps the region cache-coherent (one host, or CXL 3.x sharing): readers skip the "
            "invalidation step."),
    Setting("cxl.policy", "choice", "lru",
            "Eviction order of the CXL regions, leaf first as in DRAM; clients report the reads they serve "
            "from the mapping themselves, so recency counts them (see docs/cxl.md).",
            choices=POLICY_NAMES),
    Setting("cxl.host_timeout_s", "float", 30.0,
            "A writer host of another machine silent for this long is presumed dead: its half-written blocks and "
            "unused chunks are reclaimed.", min=1.0, max=86400.0),
    Setting("hbm.enabled", "bool", False,
            "HBM tier: blocks read often are copied from DRAM into a per-namespace GPU arena that same-host clients "
            "read device to device (CUDA IPC). Needs kvrack[gpu] and a CUDA device; without them the daemon says "
            "so at start-up and runs without the tier. See docs/hbm.md."),
    Setting("hbm.device", "int", 0, "CUDA device of the arenas.", min=0, max=63),
    Setting("hbm.capacity_bytes", "size", 4 * GiB,
            "GPU memory for the tier, split evenly between the namespaces and allocated at start-up.", min=16 * MiB),
    Setting("hbm.segment_bytes", "size", 256 * MiB,
            "Allocation unit of an arena (one cudaMalloc and one IPC handle each; the largest block kept in HBM).",
            min=1 * MiB, max=16 * GiB),
    Setting("hbm.promote_after_hits", "int", 2,
            "A DRAM block is copied into HBM at its Nth read by a same-host client (1: at the first).", min=1,
            max=1000),
    Setting("tcp.enabled", "bool", False,
            "Serve remote clients: the control protocol on TCP, every connection authenticated by its namespace's "
            "token (namespaces without a token cannot be used over TCP). See docs/remote.md."),
    Setting("tcp.host", "str", "0.0.0.0", "Address the TCP listener binds (an interface address to keep it off others)."),
    Setting("tcp.port", "int", 7433, "TCP port of the control listener.", min=1, max=65535),
    Setting("tcp.hello_timeout_s", "float", 10.0,
            "A TCP connection that has not authenticated (hello with a valid token) by then is closed.",
            min=0.1, max=600.0),
    Setting("tcp.tls_handshake_timeout_s", "float", 10.0, "A TLS handshake not finished by then is dropped.",
            min=0.1, max=600.0),
    Setting("tcp.tls_cert", "str", "", "PEM certificate chain: with tcp.tls_key set, TCP connections speak TLS only."),
    Setting("tcp.tls_key", "str", "", "PEM private key of tcp.tls_cert."),
    Setting("tcp.tls_client_ca", "str", "", "PEM CA bundle: when set, clients must also present a certificate it signed."),
    Setting("tcp.nixl", "choice", "auto",
            "NIXL one-sided reads and writes for TCP clients: auto = offer it when the nixl package (kvrack[nixl]) "
            "loads, on = refuse to start without it, off = TCP byte streams only.", choices=("auto", "on", "off")),
    Setting("tcp.nixl_progress_delay_us", "int", 1000,
            "Idle sleep of the daemon's NIXL progress thread (0 spins a core; transfers in flight are progressed "
            "without sleeping).", min=0, max=1_000_000),
    Setting("admin.enabled", "bool", True,
            "Serve the admin API (health, stats, blocks, quotas, config, drain) and Prometheus metrics (/metrics), "
            "on threads of their own, off the data path. See docs/operations.md."),
    Setting("admin.socket_path", "str", "",
            "Unix socket of the admin API; empty = kvrack-admin.sock beside server.socket_path. Its mode is "
            "server.socket_mode."),
    Setting("admin.tcp_host", "str", "127.0.0.1", "Address the admin API's TCP listener binds (with admin.tcp_port)."),
    Setting("admin.tcp_port", "int", 0, "TCP port of the admin API and /metrics; 0 = Unix socket only.", min=0,
            max=65535),
    Setting("admin.token_file", "str", "",
            "File holding the bearer token that mutations need (first line). Empty = a random token written at "
            "start to kvrack-admin.token beside the admin socket (mode 0600: readable by the daemon's user only), "
            "which the kvrack command reads."),
    Setting("admin.read_auth", "bool", False, "Reads (stats, config, blocks, metrics) need the token too; "
            "/healthz and /readyz never do.", runtime=True),
    Setting("admin.metrics_max_namespaces", "int", 32,
            "Namespaces given their own label in /metrics, by bytes held; the rest are summed as namespace=\"other\".",
            min=1, max=10_000, runtime=True),
    Setting("events.enabled", "bool", False, "Publish KV events (blocks stored and removed, per tier and namespace) in "
            "vLLM's KV-event format over ZMQ, for prefix-aware routers. See docs/router.md."),
    Setting("events.endpoint", "str", "tcp://127.0.0.1:5557", "ZMQ endpoint of the event PUB socket: bound "
            "when it is this host's (tcp://0.0.0.0:PORT for subscribers on other hosts, ipc:///path for local ones), "
            "connected to when the address is another host's (a collector that binds)."),
    Setting("events.replay_endpoint", "str", "", "ZMQ endpoint of the replay ROUTER socket, for subscribers that missed "
            "a range (vLLM's replay protocol); empty = no replay."),
    Setting("events.topic_prefix", "str", "kvrack.", "Topic of a namespace's batches: this prefix and the namespace."),
    Setting("events.interval_s", "float", 0.05, "How often pending events go out, in batches per namespace.",
            min=0.001, max=10.0),
    Setting("events.max_batch_events", "int", 4096, "Most blocks in one batch (more go out in further batches).", min=1,
            max=1_000_000),
    Setting("events.max_queued_batches", "int", 10000, "Batches waiting for the publisher thread; past it new ones are "
            "dropped and counted (events never slow the data path).", min=1, max=10_000_000),
    Setting("events.replay_batches", "int", 10000, "Batches kept for replay.", min=0, max=10_000_000),
    Setting("events.max_blocks_per_s", "int", 0, "Most block events published a second, with a burst of one "
            "second's worth (0: no limit but the queue); batches past it are dropped and counted, and their "
            "numbers are gaps subscribers see.", min=0, max=1_000_000_000),
    Setting("log.level", "choice", "info", "Log verbosity.", choices=("debug", "info", "warning", "error"), runtime=True),
)
BY_NAME = {s.name: s for s in SETTINGS}
BY_ENV = {s.env: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class NamespaceField:
    name: str
    kind: str
    default: Any
    help: str


NAMESPACE_FIELDS: tuple[NamespaceField, ...] = (
    NamespaceField("name", "str", "default", "Namespace name that clients give in hello."),
    NamespaceField("uids", "list[int]", [], "Unix user ids allowed to use it over the Unix socket; empty = anyone."),
    NamespaceField("gids", "list[int]", [], "Unix group ids allowed to use it (either list may match); empty = anyone."),
    NamespaceField("salt", "str", "", "Hex salt handed to clients for their first block keys; empty = derived from the name."),
    NamespaceField("token", "str", "", "Secret a TCP client must present in hello (at least 16 characters); empty = "
                   "no TCP access. Never logged or printed."),
    NamespaceField("token_file", "str", "", "File holding the token (first line), instead of token: keep secrets "
                   "out of the config file (mode 0600)."),
    NamespaceField("quota_dram_bytes", "size", 0, "Most DRAM bytes the namespace holds; past it, its puts evict its "
                   "own blocks (leaf first), never another tenant's. 0 = no quota. Changeable at runtime (admin API, SIGHUP)."),
    NamespaceField("quota_dram_blocks", "int", 0, "Most DRAM blocks the namespace holds (as quota_dram_bytes)."),
    NamespaceField("quota_nvme_bytes", "size", 0, "Most NVMe bytes the namespace holds; past it, its own NVMe copies "
                   "are evicted first."),
    NamespaceField("quota_nvme_blocks", "int", 0, "Most NVMe blocks the namespace holds (as quota_nvme_bytes)."),
    NamespaceField("quota_leases", "int", 0, "Most reservations and pins the namespace's connections hold together "
                   "(leases.max_per_session bounds each one); past it, reserves and gets answer QUOTA_EXCEEDED for "
                   "the keys beyond it. 0 = no limit. Changeable at runtime (admin API, SIGHUP)."),
)
QUOTA_FIELDS = ("dram_bytes", "dram_blocks", "nvme_bytes", "nvme_blocks", "leases")
MIN_TOKEN_CHARS = 16


@dataclasses.dataclass(frozen=True)
class NamespaceConfig:
    name: str
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    salt: bytes = b""
    token: str = dataclasses.field(default="", repr=False)  # repr=False: never in a log line or traceback
    quota: tuple[tuple[str, int], ...] = ()  # (QUOTA_FIELDS name, limit) for each quota set
