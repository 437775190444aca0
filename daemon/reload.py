"""Settings changed while the daemon runs: what SIGHUP (and the admin API) may change, and how each is applied.

Every setting the table labels "changeable at runtime" has an applier here, and only those (a test keeps the
label and this table in step). A change to any other setting is refused with a message saying it needs a
restart; a value the table refuses changes nothing.
"""

from __future__ import annotations

import dataclasses
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


def _read_per_request(d: Daemon, c: Config) -> None:
    """The admin API reads these from the config at every request or scrape: the new config is enough."""


# setting -> how the running daemon takes its new value (given the whole new config)
APPLIERS: dict[str, Callable[[Daemon, Config], None]] = {
    "leases.reserve_timeout_s": _leases,
    "leases.pin_timeout_s": _leases,
    "dram.evict_high_watermark": _watermarks,
    "dram.evict_low_watermark": _watermarks,
    "log.level": _log_level,
    "admin.read_auth": _read_per_request,
    "admin.metrics_max_namespaces": _read_per_request,
}


class Refused(ConfigError):
    """Some changes cannot be made while the daemon runs (or are invalid): nothing was changed. ``invalid``: a
    value the settings table refuses (else: a restart is needed, or the values conflict with others)."""

    def __init__(self, why: dict[str, str], invalid: bool = False) -> None:
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in why.items()))
        self.why = why
        self.invalid = invalid


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
        invalid = False
        changes: dict[str, Any] = {}
        for name, value in raw.items():
            setting = BY_NAME.get(name)
            if setting is None:
                why[name] = "no such setting"
                invalid = True
                continue
            try:
                coerced = setting.coerce(value, source)
            except ConfigError as exc:
                if name in APPLIERS:
                    why[name] = str(exc)
                    invalid = True
                else:
                    why[name] = f"cannot change while the daemon runs (it needs a restart); and {exc}"
                continue
            if coerced == d.config[name]:
                continue
            if name not in APPLIERS:
                why[name] = "cannot change while the daemon runs; it needs a restart"
                continue
            changes[name] = coerced
        if why:
            raise Refused(why, invalid)
        if not changes:
            return {}
        try:
            config = d.config.with_values(changes, source)
        except ConfigError as exc:  # the new values do not go together with the others
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
        quotas = self.reload_quotas(new)
        if not applied and not restart and not quotas:
            log.info("reload: no setting changed")

    def reload_quotas(self, new: Config) -> int:
        """Namespace quotas changed in the file take effect now (over a lowered one, the namespace's own blocks
        are evicted); any other namespace change needs a restart. Returns how many namespaces changed quota."""
        d = self.daemon
        assert d.store is not None
        old = {ns.name: ns for ns in d.config.namespaces}
        fresh = {ns.name: ns for ns in new.namespaces}
        changed = 0
        kept = []
        for name, ns in old.items():
            other = fresh.get(name)
            if other is None or dataclasses.replace(other, quota=ns.quota) != ns:
                log.warning("reload: namespace %r changed (other than its quota) or was removed; that needs a "
                            "restart", name)
            if other is not None and other.quota != ns.quota:
                live = d.store.namespaces[name]
                live.quota = dict(other.quota)
                d.store.shed(live, admin=True)
                if d.store.nvme is not None:
                    d.store.nvme.shed(live)
                log.info("reload: namespace %r quota now %s", name, dict(other.quota) or "none")
                ns = dataclasses.replace(ns, quota=other.quota)
                changed += 1
            kept.append(ns)
        for name in fresh.keys() - old.keys():
            log.warning("reload: namespace %r was added; that needs a restart", name)
        if changed:
            d.config.namespaces = tuple(kept)
        return changed
