"""Every daemon setting, declared once.

The TOML loader, the ``KVRACK_*`` environment overrides, ``kvrackd
--print-config`` and ``deploy/kvrack.example.toml`` all come from ``SETTINGS``.
Namespaces are a list of tables (``[[namespaces]]``) described by
``NAMESPACE_FIELDS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kvrack.address import user_socket_path
from kvrack.sizes import format_size, human_size, parse_size
from kvrack.tiers.nvme import default_nvme_capacity, default_nvme_dir


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
    Setting("leases.reserve_timeout_s", "float", 30.0, "A reservation not committed or aborted within this time is freed.",
            min=0.1, max=86400.0, runtime=True),
    Setting("leases.pin_timeout_s", "float", 300.0, "A pin not released within this time (since its last acquire) ends.",
            min=0.1, max=86400.0, runtime=True),
    Setting("leases.sweep_interval_s", "float", 0.5, "How often expired leases are looked for.", min=0.01, max=60.0),
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
    Setting("nvme.io_threads", "int", 8, "Reads and writes in flight at once (the device's queue depth).", min=1, max=256),
    Setting("nvme.write_batch_bytes", "size", 64 * MiB, "Most bytes per durable write batch (one fdatasync and one "
            "index commit each).", min=64 * KiB, max=16 * GiB),
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
    Setting("tcp.tls_cert", "str", "", "PEM certificate chain: with tcp.tls_key set, TCP connections speak TLS only."),
    Setting("tcp.tls_key", "str", "", "PEM private key of tcp.tls_cert."),
    Setting("tcp.tls_client_ca", "str", "", "PEM CA bundle: when set, clients must also present a certificate it signed."),
    Setting("tcp.nixl", "choice", "auto",
            "NIXL one-sided reads and writes for TCP clients: auto = offer it when the nixl package (kvrack[nixl]) "
            "loads, on = refuse to start without it, off = TCP byte streams only.", choices=("auto", "on", "off")),
    Setting("tcp.nixl_progress_delay_us", "int", 1000,
            "Idle sleep of the daemon's NIXL progress thread (0 spins a core; transfers in flight are progressed "
            "without sleeping).", min=0, max=1_000_000),
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
)
MIN_TOKEN_CHARS = 16


@dataclasses.dataclass(frozen=True)
class NamespaceConfig:
    name: str
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    salt: bytes = b""
    token: str = dataclasses.field(default="", repr=False)  # repr=False: never in a log line or traceback


@dataclasses.dataclass(frozen=True)
class Config:
    """The effective settings, loaded once and handed to everything else."""

    values: dict[str, Any]
    namespaces: tuple[NamespaceConfig, ...]
    sources: dict[str, str]
    warnings: tuple[str, ...] = ()  # said at start-up: settings that load but look like mistakes
    path: str | None = None  # the config file, if any

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def to_toml(self) -> str:
        """The effective settings as TOML, with where each came from and what a computed one resolves to."""
        return render_toml(self.values, self.namespaces, self.sources, resolved_values(self))

    def origin(self) -> str:
        """Where the settings came from, for the start-up line: the file (or embedded defaults) and overrides."""
        envs = sorted({src for src in self.sources.values() if src.startswith("KVRACK_")})
        parts = [self.path or "embedded defaults"]
        if envs:
            parts.append(f"environment {', '.join(envs)}")
        overridden = sum(1 for src in self.sources.values() if src == "command line")
        if overridden:
            parts.append(f"{overridden} setting(s) from the command line")
        return " + ".join(parts)


def resolved_values(config: Config) -> dict[str, str]:
    """Settings whose configured value stands for one computed at start-up, as that value will be."""
    out = {}
    if config["nvme.enabled"] and not config["nvme.capacity_bytes"] and not config["nvme.paths"]:
        n = default_nvme_capacity(config["nvme.dir"])
        out["nvme.capacity_bytes"] = f"{human_size(n)} ({n} bytes)"
    return out


def _toml_value(setting: Setting | None, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if setting is not None and setting.kind == "size" and isinstance(value, int):
        return f'"{format_size(value)}"'
    if setting is not None and setting.name == "server.socket_mode":
        return f"0o{value:o}"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(None, v) for v in value) + "]"
    if isinstance(value, bytes):
        return f'"{value.hex()}"'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(values: dict[str, Any] | None, namespaces: tuple[NamespaceConfig, ...] | None,
                sources: dict[str, str] | None = None, resolved: dict[str, str] | None = None) -> str:
    """TOML for the given values; with ``values=None`` the documented example file."""
    lines = ["# kvrack daemon configuration (kvrackd --config PATH).",
             "# Every setting can also be set by an environment variable, shown with it.",
             "# Generated from kvrack.daemon.settings; `kvrackd --write-example PATH` rewrites it."]
    section = None
    for s in SETTINGS:
        sec, key = s.name.split(".", 1)
        if sec != section:
            lines += ["", f"[{sec}]"]
            section = sec
        lines.append(f"# {s.help}")
        meta = [f"env {s.env}"]
        if s.choices:
            meta.append("one of " + ", ".join(s.choices))
        if s.min is not None or s.max is not None:
            lo = format_size(int(s.min)) if s.kind == "size" and s.min is not None else s.min
            hi = format_size(int(s.max)) if s.kind == "size" and s.max is not None else s.max
            meta.append(f"bounds [{lo if lo is not None else ''}, {hi if hi is not None else ''}]")
        meta.append("changeable at runtime" if s.runtime else "needs a restart")
        lines.append("# " + "; ".join(meta))
        if values is None:
            if s.dynamic_default is not None:
                lines.append(f"# default: {s.default_doc}")
                lines.append(f"# {key} = ...")
            else:
                lines.append(f"{key} = {_toml_value(s, s.default)}")
        else:
            src = f"  # from {sources[s.name]}" if sources and s.name in sources else ""
            if resolved and s.name in resolved:
                src += f"; in use: {resolved[s.name]}"
            lines.append(f"{key} = {_toml_value(s, values[s.name])}{src}")
    lines += ["", "# Namespaces: isolated key spaces. With none configured, one open namespace", "# named \"default\" exists."]
    for f in NAMESPACE_FIELDS:
        lines.append(f"#   {f.name} ({f.kind}): {f.help}")
    for ns in namespaces or (NamespaceConfig("default"),):
        lines += ["[[namespaces]]", f"name = {_toml_value(None, ns.name)}", f"uids = {_toml_value(None, list(ns.uids))}",
                  f"gids = {_toml_value(None, list(ns.gids))}"]
        if ns.salt:
            lines.append(f"salt = {_toml_value(None, ns.salt)}")
        if ns.token:
            lines.append("# token: set (not shown)")
    return "\n".join(lines) + "\n"


def example_toml() -> str:
    """The contents of deploy/kvrack.example.toml."""
    return render_toml(None, None)


def _parse_namespaces(raw: Any) -> tuple[NamespaceConfig, ...]:
    if raw is None:
        return (NamespaceConfig("default"),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("namespaces: expected a non-empty list of [[namespaces]] tables")
    out: list[NamespaceConfig] = []
    known = {f.name for f in NAMESPACE_FIELDS}
    for i, table in enumerate(raw):
        if not isinstance(table, dict):
            raise ConfigError(f"namespaces[{i}]: expected a table")
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"namespaces[{i}]: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        name = table.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"namespaces[{i}].name: expected 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
        ids: dict[str, tuple[int, ...]] = {}
        for field in ("uids", "gids"):
            vals = table.get(field, [])
            if not isinstance(vals, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                raise ConfigError(f"namespaces[{i}].{field}: expected a list of integers")
            ids[field] = tuple(vals)
        salt_hex = table.get("salt", "")
        try:
            salt = bytes.fromhex(salt_hex) if salt_hex else b""
        except (ValueError, TypeError):
            raise ConfigError(f"namespaces[{i}].salt: expected hex digits") from None
        if any(ns.name == name for ns in out):
            raise ConfigError(f"namespaces: {name!r} is declared twice")
        out.append(NamespaceConfig(name, ids["uids"], ids["gids"], salt, _namespace_token(table, i)))
    return tuple(out)


def _namespace_token(table: dict[str, Any], i: int) -> str:
    """The namespace's TCP token from ``token`` or ``token_file``; errors never show the secret."""
    token, path = table.get("token", ""), table.get("token_file", "")
    if not isinstance(token, str) or not isinstance(path, str):
        raise ConfigError(f"namespaces[{i}]: token and token_file must be strings")
    if token and path:
        raise ConfigError(f"namespaces[{i}]: set token or token_file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.readline().strip()
        except OSError as exc:
            raise ConfigError(f"namespaces[{i}].token_file: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"namespaces[{i}].token_file: {path} is not UTF-8 text") from None
    if token and (len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token)):
        raise ConfigError(f"namespaces[{i}]: the token must be at least {MIN_TOKEN_CHARS} characters without "
                          "spaces (e.g. `openssl rand -hex 32`)")
    return token


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Embedded defaults, then the TOML file, then ``KVRACK_*`` env, then explicit overrides."""
    environ: Mapping[str, str] = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    namespaces = _parse_namespaces(raw.pop("namespaces", None))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} is not a [section]")
        for key, value in table.items():
            name = f"{section}.{key}"
            if name not in BY_NAME:
                raise ConfigError(f"{path}: unknown setting {name!r}; see deploy/kvrack.example.toml")
            values[name] = BY_NAME[name].coerce(value, str(path))
            sources[name] = str(path)
    for s in SETTINGS:
        if s.env in environ:
            values[s.name] = s.coerce(environ[s.env], s.env)
            sources[s.name] = s.env
    warnings = [_unknown_env_warning(name) for name in sorted(environ)
                if name.startswith("KVRACK_") and name not in BY_ENV and name not in CLIENT_ENV
                and not name.startswith(OTHER_ENV_PREFIXES)]
    for name, value in (overrides or {}).items():
        if name not in BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = BY_NAME[name].coerce(value, "command line")
        sources[name] = "command line"
    for s in SETTINGS:
        if s.name not in values:
            values[s.name] = s.resolve_default()
            sources[s.name] = "default"
    _check_together(values, sources)
    return Config(values, namespaces, sources, tuple(warnings), str(path) if path is not None else None)


# KVRACK_* variables that are not settings: read by clients and by the test and benchmark tools
CLIENT_ENV = ("KVRACK_ADDRESS", "KVRACK_TOKEN", "KVRACK_TRANSPORT")
OTHER_ENV_PREFIXES = ("KVRACK_TEST_", "KVRACK_STRESS_", "KVRACK_BENCH_")


def _unknown_env_warning(name: str) -> str:
    close = difflib.get_close_matches(name, list(BY_ENV) + list(CLIENT_ENV), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"environment variable {name} is not a kvrack setting and is ignored{hint}; see deploy/kvrack.example.toml"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_together(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Settings valid alone that make no sense together."""
    high, low = values["dram.evict_high_watermark"], values["dram.evict_low_watermark"]
    if low > high:
        raise ConfigError(f"dram.evict_low_watermark ({low}, from {sources['dram.evict_low_watermark']}) is above "
                          f"dram.evict_high_watermark ({high}, from {sources['dram.evict_high_watermark']}): the "
                          "evictor stops at the low one, so it must not exceed the high one")
    cap, seg = values["dram.capacity_bytes"], values["dram.segment_bytes"]
    memory = physical_memory()
    if cap > memory:
        raise ConfigError(f"dram.capacity_bytes ({format_size(cap)}, from {sources['dram.capacity_bytes']}) is more "
                          f"than this machine's memory ({format_size(memory)}): the DRAM tier would be killed for "
                          "memory before it filled; give it at most what the machine can spare")
    if cap < seg:  # the tier is whole segments: it would hold nothing and refuse every put
        raise ConfigError(f"dram.capacity_bytes ({format_size(cap)}, from {sources['dram.capacity_bytes']}) is less "
                          f"than one dram.segment_bytes ({format_size(seg)}, from {sources['dram.segment_bytes']}): "
                          "the DRAM tier would hold nothing; raise the capacity or lower the segment size")
