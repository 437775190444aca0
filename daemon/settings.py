"""Loading the settings: embedded defaults, the TOML file, ``KVRACK_*`` environment variables, ``--set``.

The table itself is ``kvrack.daemon.settings_table.SETTINGS``; this module turns it into a ``Config``, whose
typed attributes (``config.dram.capacity_bytes``) are generated from the table into
``kvrack.daemon.settings_view`` (``make example`` rewrites it and ``deploy/kvrack.example.toml``; a test
fails when either is stale), and renders it back as TOML.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvrack.daemon.settings_table import (
    BY_ENV,
    BY_NAME,
    MIN_TOKEN_CHARS,
    NAMESPACE_FIELDS,
    POLICY_NAMES,
    QUOTA_FIELDS,
    SETTINGS,
    ConfigError,
    NamespaceConfig,
    NamespaceField,
    Setting,
    physical_memory,
)
from kvrack.daemon.settings_view import SettingsView
from kvrack.sizes import format_size, human_size, parse_size
from kvrack.tiers.nvme import default_nvme_capacity


class Config(SettingsView):
    """The effective settings, loaded once and handed to everything else.

    Code reads them as typed attributes (``config.dram.capacity_bytes``: a misspelt name is a type error);
    ``config["dram.capacity_bytes"]`` is for code driven by the table itself (rendering, runtime changes)."""

    def __init__(self, values: dict[str, Any], namespaces: tuple[NamespaceConfig, ...], sources: dict[str, str],
                 warnings: tuple[str, ...] = (), path: str | None = None) -> None:
        super().__init__(values)
        self.values = values
        self.namespaces = namespaces
        self.sources = sources
        self.warnings = warnings  # said at start-up: settings that load but look like mistakes
        self.path = path  # the config file, if any

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def with_values(self, changes: Mapping[str, Any], source: str) -> Config:
        """A copy with ``changes`` (checked values) applied, each recorded as coming from ``source``."""
        values = {**self.values, **changes}
        _check_together(values, {**self.sources, **dict.fromkeys(changes, source)})
        return Config(values, self.namespaces, {**self.sources, **dict.fromkeys(changes, source)}, self.warnings,
                      self.path)

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
    nvme = config.nvme
    if nvme.enabled and not nvme.capacity_bytes and not nvme.paths:
        n = default_nvme_capacity(nvme.dir)
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
        for name, value in ns.quota:
            lines.append(f"quota_{name} = {value}")
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
        out.append(NamespaceConfig(name, ids["uids"], ids["gids"], salt, _namespace_token(table, i),
                                   _namespace_quota(table, i)))
    return tuple(out)


def _namespace_quota(table: dict[str, Any], i: int) -> tuple[tuple[str, int], ...]:
    out = []
    for name in QUOTA_FIELDS:
        raw = table.get(f"quota_{name}", 0)
        try:
            value = parse_size(raw) if name.endswith("_bytes") else raw
        except ValueError as exc:
            raise ConfigError(f"namespaces[{i}].quota_{name}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"namespaces[{i}].quota_{name}: expected a whole number >= 0, got {raw!r}")
        if value:
            out.append((name, value))
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
# (KVRACK_ADMIN_TOKEN_FILE is also the setting admin.token_file: the kvrack command reads the same file)
CLIENT_ENV = ("KVRACK_ADDRESS", "KVRACK_TOKEN", "KVRACK_TRANSPORT", "KVRACK_ADMIN", "KVRACK_ADMIN_TOKEN")
OTHER_ENV_PREFIXES = ("KVRACK_TEST_", "KVRACK_STRESS_", "KVRACK_BENCH_")


def _unknown_env_warning(name: str) -> str:
    close = difflib.get_close_matches(name, list(BY_ENV) + list(CLIENT_ENV), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"environment variable {name} is not a kvrack setting and is ignored{hint}; see deploy/kvrack.example.toml"




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


_VIEW_TYPES = {"int": "int", "size": "int", "float": "float", "bool": "bool", "str": "str", "list": "list[str]"}


def render_view() -> str:
    """The source of ``kvrack.daemon.settings_view``: one frozen dataclass per section, typed from the table."""
    sections: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        sections.setdefault(s.name.split(".", 1)[0], []).append(s)
    out = ['"""Typed access to every setting: generated from kvrack.daemon.settings_table.SETTINGS by `make example`',
           '(kvrack.daemon.settings.render_view); do not edit. A test fails when it is stale."""', "",
           "from __future__ import annotations", "", "import dataclasses", "from collections.abc import Mapping",
           "from typing import Any, Literal"]
    for sec, items in sections.items():
        out += ["", "", "@dataclasses.dataclass(frozen=True, slots=True)", f"class {sec.capitalize()}Settings:",
                f'    """[{sec}]"""', ""]
        for s in items:
            kind = f"Literal[{', '.join(repr(c) for c in s.choices)}]" if s.kind == "choice" else _VIEW_TYPES[s.kind]
            out.append(f"    {s.name.split('.', 1)[1]}: {kind}")
    out += ["", "", "class SettingsView:", '    """Every section as a typed attribute: ``config.dram.capacity_bytes``."""', ""]
    for sec in sections:
        out.append(f"    {sec}: {sec.capitalize()}Settings")
    out += ["", "    def __init__(self, values: Mapping[str, Any]) -> None:"]
    for sec, items in sections.items():
        args = ", ".join(f'values["{s.name}"]' for s in items)
        out.append(f"        self.{sec} = {sec.capitalize()}Settings({args})")
    return "\n".join(out) + "\n"


# the table's names, for code that imports them from here
__all__ = ["BY_ENV", "BY_NAME", "NAMESPACE_FIELDS", "POLICY_NAMES", "SETTINGS", "Config", "ConfigError", "NamespaceConfig",
           "NamespaceField", "Setting", "example_toml", "load_config", "render_toml", "render_view"]
