"""What the admin API does, run on the daemon's event loop (``LoopBridge.call``): read a stats view, page
through a namespace's keys, describe, delete and clear blocks, set quotas, evict, change settings, drain.

Long operations (a clear, an eviction of many GiB) go in slices with a yield to the loop between them, so
clients keep being served while they run.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kvrack.daemon.admin.errors import AdminError, bad_request, not_found, unknown_namespace
from kvrack.daemon.admin.views import stats_view
from kvrack.daemon.index import COMMITTED, DELETED, RESERVED, Entry, Namespace
from kvrack.daemon.reload import Refused
from kvrack.daemon.settings_table import BY_NAME, QUOTA_FIELDS
from kvrack.protocol import KEY_BYTES, ErrorCode, TierId

if TYPE_CHECKING:
    from kvrack.daemon.daemon import Daemon

SLICE_BLOCKS = 1024  # blocks deleted or evicted per turn of the event loop
STATE_NAMES = {RESERVED: "writing", COMMITTED: "committed", DELETED: "deleted"}


def parse_key(key_hex: str) -> bytes:
    """A block key from the hex a URL carries, or a 400 that says what is wrong."""
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise AdminError(400, ErrorCode.INVALID_KEY, f"{key_hex[:80]!r} is not hex") from None
    if len(key) != KEY_BYTES:
        raise AdminError(400, ErrorCode.INVALID_KEY, f"a key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits); "
                                                     f"this one is {len(key)}")
    return key


class AdminOps:
    """The daemon's side of every admin request. Call only on the data loop."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    @property
    def store(self) -> Any:
        assert self.d.store is not None
        return self.d.store

    # ----------------------------------------------------------------- views
    def view(self) -> dict[str, Any]:
        return stats_view(self.d.registry.snapshot(), self.d.drain_status())

    def namespace(self, name: str) -> Namespace:
        ns = self.store.namespaces.get(name)
        if ns is None:
            raise unknown_namespace(name)
        return ns

    def namespaces(self) -> list[dict[str, Any]]:
        stats = self.store.namespace_stats()
        sessions: dict[str, int] = {}
        for conn in self.d.server.connections if self.d.server else ():
            if conn.session.namespace is not None:
                name = conn.session.namespace.name
                sessions[name] = sessions.get(name, 0) + 1
        return [{"name": ns.name, "remote": ns.remote, "uids": list(ns.uids), "gids": list(ns.gids),
                 "sessions": sessions.get(ns.name, 0), **stats[ns.name]} for ns in self.store.namespaces.values()]

    def keys(self, namespace: str) -> list[bytes]:
        """Every key of the namespace now (a list copy: the admin thread filters and sorts it)."""
        return list(self.namespace(namespace).entries)

    def describe(self, e: Entry) -> dict[str, Any]:
        copies: list[dict[str, Any]] = []
        if e.seg is not None:
            copies.append({"tier": TierId(e.seg.tier).name.lower(), "segment": e.seg.id,
                           "offset": e.slot * e.seg.slot_size})
        if e.nseg is not None:
            copies.append({"tier": "nvme", "segment": getattr(e.nseg, "id", 0), "slot": e.nslot})
        for tier in self.store.movement.tiers:
            if tier.name != "nvme" and tier.has_copy(e.ns, e.key):
                copies.append({"tier": tier.name})
        kids = e.kids
        nvme = self.store.nvme
        written = nvme.created(e) if nvme is not None else None  # no per-block clock in the index: its record's
        return {"namespace": e.ns.name, "key": e.key.hex(), "size_bytes": e.nbytes, "state": STATE_NAMES[e.state],
                "copies": copies, "age_s": None if written is None else max(0, int(time.time() - written)),
                "hits": e.hits, "pins": e.pins, "parent": e.parent.hex() if e.parent is not None else None,
                "children_in_dram": 0 if kids is None else (len(kids) if isinstance(kids, (dict, set)) else 1)}

    def blocks(self, namespace: str, keys: list[bytes]) -> list[dict[str, Any]]:
        entries = self.namespace(namespace).entries
        return [self.describe(e) for e in (entries.get(k) for k in keys) if e is not None]

    def block(self, namespace: str, key: bytes) -> dict[str, Any]:
        ns = self.namespace(namespace)
        e = ns.entries.get(key)
        if e is None:
            for tier in self.store.movement.tiers:  # a block only a copying tier still holds (CXL)
                if tier.has_copy(ns, key):
                    return {"namespace": ns.name, "key": key.hex(), "size_bytes": None, "state": "committed",
                            "copies": [{"tier": tier.name}], "age_s": None, "hits": None, "pins": 0,
                            "parent": None, "children_in_dram": 0}
            raise not_found(f"namespace {namespace!r} holds no block {key.hex()}")
        return self.describe(e)

    # ------------------------------------------------------------- removal
    def delete(self, namespace: str, key: bytes) -> dict[str, Any]:
        ns = self.namespace(namespace)
        code = self.store.delete_keys(ns, [key]).codes[0]
        if code == ErrorCode.NOT_FOUND:
            raise not_found(f"namespace {namespace!r} holds no block {key.hex()}")
        if code == ErrorCode.IN_PROGRESS:
            raise AdminError(409, ErrorCode.IN_PROGRESS, f"block {key.hex()} is being written; delete it once "
                                                         "it is committed")
        return {"namespace": ns.name, "key": key.hex(), "deleted": True}

    async def clear(self, namespace: str, limit: int | None) -> dict[str, Any]:
        """Delete the namespace's committed blocks (up to ``limit``), a slice per loop turn; blocks being
        written are left to their writers."""
        ns = self.namespace(namespace)
        deleted = 0
        while limit is None or deleted < limit:
            want = SLICE_BLOCKS if limit is None else min(SLICE_BLOCKS, limit - deleted)
            batch = []
            for key, e in ns.entries.items():
                if e.state == COMMITTED:
                    batch.append(key)
                    if len(batch) >= want:
                        break
            if not batch:
                break
            res = self.store.delete_keys(ns, batch)
            deleted += sum(1 for c in res.codes if c == ErrorCode.OK)
            await asyncio.sleep(0)
        writing = sum(1 for e in ns.entries.values() if e.state == RESERVED)
        return {"namespace": ns.name, "deleted": deleted, "remaining": ns.blocks, "writing": writing}

    # --------------------------------------------------------------- quotas
    def set_quota(self, namespace: str, quota: dict[str, int]) -> dict[str, Any]:
        """Replace the namespace's quota and bring it within it now, evicting its own blocks only."""
        ns = self.namespace(namespace)
        unknown = sorted(set(quota) - set(QUOTA_FIELDS))
        if unknown:
            raise bad_request(f"unknown quota field(s) {', '.join(unknown)}; known: {', '.join(QUOTA_FIELDS)}")
        ns.quota = {k: int(v) for k, v in quota.items() if v}
        before = self.store.counters.admin_evictions
        self.store.shed(ns, admin=True)
        evicted = self.store.counters.admin_evictions - before
        mover = self.store.nvme
        if mover is not None:
            evicted += mover.shed(ns)
        return {"namespace": ns.name, "quota": dict(ns.quota), "evicted_blocks": evicted, **self.held(ns)}

    def quota(self, namespace: str) -> dict[str, Any]:
        ns = self.namespace(namespace)
        return {"namespace": ns.name, "quota": dict(ns.quota), **self.held(ns)}

    def held(self, ns: Namespace) -> dict[str, int]:
        """What the namespace holds of each thing a quota limits."""
        return {f: self.store.namespace_leases(ns) if f == "leases" else getattr(ns, f) for f in QUOTA_FIELDS}

    # -------------------------------------------------------------- eviction
    def tier_used(self, tier: str) -> int:
        if tier == "dram":
            return int(self.store.dram_bytes)
        if tier == "nvme" and self.store.nvme is not None:
            return int(self.store.nvme.bytes)
        raise AdminError(404, ErrorCode.TIER_UNAVAILABLE,
                         f"tier {tier!r} cannot be evicted on request" + ("" if tier in ("dram", "nvme") else
                                                                          "; dram and nvme can") +
                         (" (it is not open)" if tier == "nvme" else ""))

    async def evict(self, tier: str, nbytes: int | None, share: float | None) -> dict[str, Any]:
        """Evict ``nbytes`` (or ``share`` of what the tier holds) by the tier's policy, unpinned blocks only,
        a slice per loop turn."""
        used = self.tier_used(tier)
        target = nbytes if nbytes is not None else int(used * (share or 0.0))
        blocks = freed = 0
        while freed < target:
            if tier == "dram":
                b, n = self.store.evict_dram(target - freed, SLICE_BLOCKS)
            else:
                b, n = self.store.nvme.evict(target - freed, SLICE_BLOCKS)
            blocks += b
            freed += n
            if b < SLICE_BLOCKS:
                break
            await asyncio.sleep(0)
        return {"tier": tier, "requested_bytes": target, "evicted_blocks": blocks, "evicted_bytes": freed,
                "used_bytes": self.tier_used(tier)}

    # -------------------------------------------------------------- settings
    def config(self) -> dict[str, Any]:
        """Every setting's value, where it came from, its default and whether it changes at runtime; the
        namespaces without their secrets."""
        c = self.d.config
        settings = {name: {"value": c.values[name], "source": c.sources.get(name, "default"),
                           "default": s.default,
                           "runtime": s.runtime} for name, s in BY_NAME.items()}
        namespaces = [{"name": ns.name, "uids": list(ns.uids), "gids": list(ns.gids), "remote": bool(ns.token),
                       "quota": dict(self.store.namespaces[ns.name].quota)} for ns in c.namespaces]
        return {"path": c.path, "settings": settings, "namespaces": namespaces}

    def patch_config(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            changed = self.d.reloader.apply(values, "admin API")
        except Refused as exc:  # 422: a value the table refuses; 409: needs a restart, or conflicts with others
            raise AdminError(422 if exc.invalid else 409, ErrorCode.BAD_REQUEST, f"nothing was changed: {exc}",
                             detail=exc.why) from None
        return {"changed": changed}

    # ----------------------------------------------------------------- drain
    def drain(self, grace_s: float | None) -> dict[str, Any]:
        if grace_s is not None and not 0.0 <= grace_s <= 3600.0:
            raise bad_request("grace_s must be between 0 and 3600 seconds")
        self.d.request_stop("admin API", grace_s)
        return self.d.drain_status()
