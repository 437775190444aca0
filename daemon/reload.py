"""Settings changed while the daemon runs: what SIGHUP (and the admin API) may change, and how each is applied.

Every setting the table labels "changeable at runtime" has an applier here, and only those (a test keeps the
label and this table in step). A change to any other setting is refused with a message saying it needs a
restart; a value the table refuses changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvrack.daemon.settings import BY_NAME, Config, ConfigError, load_config

if TYPE_CHECKING:
    from kvrack.daemon.daemon import Daemon

log = logging.getLogger("kvrackd")


def _leases(d: Daemon, c: Config) -> None:
    assert d.store is not None
    d.store.reserve_timeout_s = c.leases.reserve_timeout_s  # new leases; running ones keep their deadline
    d.store.pin_timeout_s = c.leases.pin_timeout_s


def _watermarks(d: Daemon, c: Config) -> None:
    assert d.store is not None
    d.store.set_watermarks(c.dram.evict_high_watermark, c.dram.evict_low_watermark)
    if d.store.pressure is not None and d.store.tier.allocator.used_bytes > d.store.high_water:
        d.store.pressure()  # a lower high watermark may already be crossed


def _log_level(d: Daemon, c: Config) -> None:
    logging.getLogger().setLevel(c.log.level.upper())


# setting -> how the running daemon takes its new value (given the whole new config)
APPLIERS: dict[str, Callable[[Daemon, Config], None]] = {
    "leases.reserve_timeout_s": _leases,
    "leases.pin_timeout_s": _leases,
    "dram.evict_high_watermark": _watermarks,
    "dram.evict_low_watermark": _watermarks,
    "log.level": _log_level,
}


class Refused(ConfigError):
    """Some changes cannot be made while the daemon runs (or are invalid): nothing was changed."""

    def __init__(self, why: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in why.items()))
        self.why = why


class Reloader:
    """Applies changed settings to a running daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.reloads = 0

    def apply(self, raw: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Check every change (``raw``: setting name -> value as written), then apply them all, or none:
        ``Refused`` says why. Returns the values applied (unchanged ones left out)."""
        d = self.daemon
        why: dict[str, str] = {}
        changes: dict[str, Any] = {}
        for name, value in raw.items():
            setting = BY_NAME.get(name)
            if setting is None:
                why[name] = "no such setting"
                continue
            try:
                coerced = setting.coerce(value, source)
            except ConfigError as exc:
                why[name] = str(exc)
                continue
            if coerced == d.config[name]:
                continue
            if name not in APPLIERS:
                why[name] = "cannot change while the daemon runs; it needs a restart"
                continue
            changes[name] = coerced
        if why:
            raise Refused(why)
        if not changes:
            return {}
        try:
            config = d.config.with_values(changes, source)
        except ConfigError as exc:
            raise Refused({name: str(exc) for name in changes}) from None
        d.config = config
        for applier in dict.fromkeys(APPLIERS[name] for name in changes):
            applier(d, config)
        self.reloads += 1
        log.info("settings changed (%s): %s", source, ", ".join(f"{k} = {v!r}" for k, v in changes.items()))
        return changes

    def reload_from_sources(self) -> None:
        """SIGHUP: read the config file and the environment again (``--set`` overrides still win), apply what
        may change at runtime, and say what would need a restart."""
        d = self.daemon
        old = d.config
        overrides = {name: old.values[name] for name, src in old.sources.items() if src == "command line"}
        try:
            new = load_config(old.path, overrides=overrides)
        except ConfigError as exc:
            log.error("reload: the configuration is not valid, nothing changed: %s", exc)
            return
        changed = {name: new.values[name] for name in new.values if new.values[name] != old.values[name]}
        restart = {name for name in changed if name not in APPLIERS}
        for name in sorted(restart):
            log.warning("reload: %s changed to %r but needs a restart; the running value stays %r", name,
                        changed[name], old.values[name])
        try:
            applied = self.apply({k: v for k, v in changed.items() if k not in restart}, f"reload of {old.path or 'the environment'}")
        except Refused as exc:
            log.error("reload refused, nothing changed: %s", exc)
            return
        if not applied and not restart:
            log.info("reload: no setting changed")
