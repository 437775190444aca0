"""Typed access to every setting: generated from kvrack.daemon.settings_table.SETTINGS by `make example`
(kvrack.daemon.settings.render_view); do not edit. A test fails when it is stale."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    """[server]"""

    socket_path: str
    socket_mode: int
    max_frame_bytes: int
    max_batch_keys: int
    drain_timeout_s: float
    hello_timeout_s: float
    max_connections: int
    max_connections_per_uid: int
    max_queued_reply_bytes: int
    max_total_queued_reply_bytes: int
    stalled_client_timeout_s: float
    max_total_partial_frame_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class LeasesSettings:
    """[leases]"""

    reserve_timeout_s: float
    pin_timeout_s: float
    sweep_interval_s: float
    max_per_session: int


@dataclasses.dataclass(frozen=True, slots=True)
class DramSettings:
    """[dram]"""

    capacity_bytes: int
    segment_bytes: int
    hugepages: bool
    prefault: bool
    shm_dir: str
    policy: Literal['lru', 'chain', 's3fifo', 'sieve', 'lfu']
    evict_high_watermark: float
    evict_low_watermark: float


@dataclasses.dataclass(frozen=True, slots=True)
class NvmeSettings:
    """[nvme]"""

    enabled: bool
    required: bool
    dir: str
    paths: list[str]
    capacity_bytes: int
    index_dir: str
    region_bytes: int
    policy: Literal['clock', 'lru', 'chain', 's3fifo', 'sieve', 'lfu']
    admission: Literal['all', 'reused', 'demote']
    keep_unpersisted: bool
    retry_interval_s: float
    io_threads: int
    write_batch_bytes: int
    fault_plan: str


@dataclasses.dataclass(frozen=True, slots=True)
class CxlSettings:
    """[cxl]"""

    enabled: bool
    dir: str
    paths: list[str]
    capacity_bytes: int
    chunk_bytes: int
    coherent: bool
    policy: Literal['lru', 'chain', 's3fifo', 'sieve', 'lfu']
    host_timeout_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class HbmSettings:
    """[hbm]"""

    enabled: bool
    device: int
    capacity_bytes: int
    segment_bytes: int
    promote_after_hits: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpSettings:
    """[tcp]"""

    enabled: bool
    host: str
    port: int
    hello_timeout_s: float
    tls_handshake_timeout_s: float
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    nixl: Literal['auto', 'on', 'off']
    nixl_progress_delay_us: int


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    """[admin]"""

    enabled: bool
    socket_path: str
    tcp_host: str
    tcp_port: int
    token_file: str
    read_auth: bool
    metrics_max_namespaces: int


@dataclasses.dataclass(frozen=True, slots=True)
class EventsSettings:
    """[events]"""

    enabled: bool
    endpoint: str
    replay_endpoint: str
    topic_prefix: str
    interval_s: float
    max_batch_events: int
    max_queued_batches: int
    replay_batches: int
    max_blocks_per_s: int


@dataclasses.dataclass(frozen=True, slots=True)
class LogSettings:
    """[log]"""

    level: Literal['debug', 'info', 'warning', 'error']


class SettingsView:
    """Every section as a typed attribute: ``config.dram.capacity_bytes``."""

    server: ServerSettings
    leases: LeasesSettings
    dram: DramSettings
    nvme: NvmeSettings
    cxl: CxlSettings
    hbm: HbmSettings
    tcp: TcpSettings
    admin: AdminSettings
    events: EventsSettings
    log: LogSettings

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.server = ServerSettings(values["server.socket_path"], values["server.socket_mode"], values["server.max_frame_bytes"], values["server.max_batch_keys"], values["server.drain_timeout_s"], values["server.hello_timeout_s"], values["server.max_connections"], values["server.max_connections_per_uid"], values["server.max_queued_reply_bytes"], values["server.max_total_queued_reply_bytes"], values["server.stalled_client_timeout_s"], values["server.max_total_partial_frame_bytes"])
        self.leases = LeasesSettings(values["leases.reserve_timeout_s"], values["leases.pin_timeout_s"], values["leases.sweep_interval_s"], values["leases.max_per_session"])
        self.dram = DramSettings(values["dram.capacity_bytes"], values["dram.segment_bytes"], values["dram.hugepages"], values["dram.prefault"], values["dram.shm_dir"], values["dram.policy"], values["dram.evict_high_watermark"], values["dram.evict_low_watermark"])
        self.nvme = NvmeSettings(values["nvme.enabled"], values["nvme.required"], values["nvme.dir"], values["nvme.paths"], values["nvme.capacity_bytes"], values["nvme.index_dir"], values["nvme.region_bytes"], values["nvme.policy"], values["nvme.admission"], values["nvme.keep_unpersisted"], values["nvme.retry_interval_s"], values["nvme.io_threads"], values["nvme.write_batch_bytes"], values["nvme.fault_plan"])
        self.cxl = CxlSettings(values["cxl.enabled"], values["cxl.dir"], values["cxl.paths"], values["cxl.capacity_bytes"], values["cxl.chunk_bytes"], values["cxl.coherent"], values["cxl.policy"], values["cxl.host_timeout_s"])
        self.hbm = HbmSettings(values["hbm.enabled"], values["hbm.device"], values["hbm.capacity_bytes"], values["hbm.segment_bytes"], values["hbm.promote_after_hits"])
        self.tcp = TcpSettings(values["tcp.enabled"], values["tcp.host"], values["tcp.port"], values["tcp.hello_timeout_s"], values["tcp.tls_handshake_timeout_s"], values["tcp.tls_cert"], values["tcp.tls_key"], values["tcp.tls_client_ca"], values["tcp.nixl"], values["tcp.nixl_progress_delay_us"])
        self.admin = AdminSettings(values["admin.enabled"], values["admin.socket_path"], values["admin.tcp_host"], values["admin.tcp_port"], values["admin.token_file"], values["admin.read_auth"], values["admin.metrics_max_namespaces"])
        self.events = EventsSettings(values["events.enabled"], values["events.endpoint"], values["events.replay_endpoint"], values["events.topic_prefix"], values["events.interval_s"], values["events.max_batch_events"], values["events.max_queued_batches"], values["events.replay_batches"], values["events.max_blocks_per_s"])
        self.log = LogSettings(values["log.level"])
