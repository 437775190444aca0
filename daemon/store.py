"""The block store: two-phase writes, pins, leases and eviction over the index and the tiers.

Pure logic with no sockets: the control server calls it with a session and a
batch of keys, and gets back per-key codes and descriptors. Time comes from an
injected clock so lease expiry is testable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import blake3

from kvrack.daemon.counters import SlotCounters
from kvrack.daemon.index import COMMITTED, DELETED, RESERVED, Entry, LruList, Namespace, PolicyOrder
from kvrack.daemon.policies.admission import Admission, make_admission
from kvrack.daemon.policies.base import LeafFirst, leaf_first
from kvrack.daemon.session import Session
from kvrack.daemon.settings import NamespaceConfig
from kvrack.protocol import KEY_BYTES, Descriptor, ErrorCode, TierId
from kvrack.tiers.base import Segment, Tier

if TYPE_CHECKING:
    from kvrack.daemon.mover import Mover

log = logging.getLogger("kvrack.store")
OK = int(ErrorCode.OK)


def namespace_salt(cfg: NamespaceConfig) -> bytes:
    """The configured salt, or one derived from the name so that restarts keep keys stable."""
    return cfg.salt or blake3.blake3(b"kvrack-namespace-salt-v1:" + cfg.name.encode()).digest()


class KeysResult:
    """Per-key outcome of one batched op."""

    __slots__ = ("codes", "descriptors", "message", "promote")

    def __init__(self, n: int, with_descriptors: bool) -> None:
        self.codes = [OK] * n
        self.descriptors: list[Descriptor | None] = [None] * n if with_descriptors else []
        self.message = ""
        self.promote: list[tuple[int, Entry]] = []  # acquired keys whose only copy is on NVMe


class Counters(SlotCounters):
    """Operation counters; the single source that stats views read."""

    __slots__ = ("lookup_keys", "lookup_hits", "get_keys", "get_hits", "puts", "put_bytes", "evictions",
                 "evicted_bytes", "expired_reservations", "expired_pins", "aborted", "deleted", "no_space",
                 "prefetch_keys", "prefetched_blocks", "background_evictions")


class Store:
    """Index + tiers + leases. One instance per daemon, driven from the event loop thread.

    ``tier`` is the memory tier clients map (DRAM); a ``Mover`` attached with
    ``attach`` keeps NVMe copies. An entry is in ``lru`` exactly when it is
    committed, unpinned and has a DRAM copy.
    """

    def __init__(self, tier: Tier, namespaces: Sequence[NamespaceConfig], reserve_timeout_s: float = 30.0,
                 pin_timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 policy: str = "lru", typical_block_bytes: int = 2 << 20) -> None:
        self.tier = tier
        self.tiers: dict[int, Tier] = {int(tier.tier_id): tier}  # tiers whose segments clients map
        self.namespaces = {ns.name: Namespace(ns.name, namespace_salt(ns), ns.uids, ns.gids, ns.token)
                           for ns in namespaces}
        self.reserve_timeout_s = reserve_timeout_s
        self.pin_timeout_s = pin_timeout_s
        self.clock = clock
        # LRU stays the intrusive list (O(1), no per-entry dict); other policies size their
        # queues in blocks, estimated from the capacity and a typical block size
        self.lru: LruList | PolicyOrder = LruList() if policy == "lru" else \
            PolicyOrder(policy, tier.capacity // max(1, typical_block_bytes))
        self._leaf_first = LeafFirst(_deepest_evictable, _dram_parent, _in_order)
        self._typical_block = typical_block_bytes
        self.pinned_blocks = 0  # blocks with at least one pin, deleted-but-pinned included
        self.counters = Counters()
        self._sizes: dict[int, int] = {}  # interned block sizes: one int object per size, not per entry
        # sessions holding reservations or pins: the sweeper looks only at these, so lease
        # bookkeeping costs memory per outstanding lease, never per request served
        self._leaseholders: set[Session] = set()
        self.mover: Mover | None = None
        self.nvme_unavailable: str | None = None  # why a configured NVMe tier could not open
        self.dram_blocks = 0  # committed blocks with a DRAM copy
        self.dram_bytes = 0
        # background eviction: above ``high_water`` bytes in use, ``pressure`` is called (once per episode)
        # and ``evict_background`` frees down to ``low_water``
        self.high_water = tier.capacity
        self.low_water = tier.capacity
        self.pressure: Callable[[], None] | None = None
        # NVMe admission: "all" writes every commit through; the others write a block only when DRAM
        # evicts it and the rule accepts it (kvrack.daemon.policies.admission)
        self.admission: Admission = make_admission("all", 1)
        self.write_through = True
        # called with each entry as it is committed / deleted by a client (e.g. to copy it into CXL)
        self.commit_hooks: list[Callable[[Entry], None]] = []
        self.delete_hooks: list[Callable[[Entry], None]] = []
        # called with each entry whose DRAM copy is about to be freed (evicted, deleted, demoted)
        self.dram_free_hooks: list[Callable[[Entry], None]] = []

    def set_admission(self, name: str) -> None:
        self.admission = make_admission(name, max(1, self.tier.capacity // max(1, self._typical_block)))
        self.write_through = name == "all"

    def attach(self, mover: Mover) -> None:
        """Add the NVMe tier (through its mover): committed blocks get a durable copy there."""
        self.mover = mover

    def adopt_dram(self, blocks: Sequence[tuple[str, bytes, bytes | None, Segment, int, int]]) -> int:
        """Index blocks the DRAM tier kept over a clean restart, oldest first; returns how many.

        Runs after NVMe recovery: a block with an NVMe copy gains its DRAM copy back; one
        without is queued for its NVMe copy like a fresh commit.
        """
        adopted = 0
        for ns_name, key, parent, seg, slot, nbytes in blocks:
            ns = self.namespaces.get(ns_name)
            e = ns.entries.get(key) if ns is not None else None
            if ns is None or (e is not None and (e.seg is not None or e.nbytes != nbytes)):
                self.tier.free(seg, slot)  # namespace no longer configured, or a duplicate: drop the copy
                continue
            if parent is not None:
                pe = ns.entries.get(parent)
                parent = pe.key if pe is not None else parent
            if e is None:
                self.adopt_block(ns, key, seg, slot, nbytes, parent)
            else:
                e.parent = parent
                self.add_dram_copy(e, seg, slot)
                self.lru.push_mru(e)
            adopted += 1
        return adopted

    def adopt_block(self, ns: Namespace, key: bytes, seg: Segment, slot: int, nbytes: int,
                    parent: bytes | None = None) -> Entry:
        """Index a committed block whose bytes are already in a DRAM slot (kept over a restart, or copied
        up from CXL): NVMe gets it as the admission rule says; it is not copied back where it came from."""
        e = Entry(bytes(key), ns, None, 0, self.intern_size(nbytes), parent)
        e.state = COMMITTED
        ns.entries[e.key] = e
        ns.blocks += 1
        ns.bytes += nbytes
        self.add_dram_copy(e, seg, slot)
        self._settle(e)
        return e

    def _settle(self, e: Entry) -> None:
        """A block newly committed in DRAM: queued for its NVMe copy when written through, else evictable."""
        if not (self.write_through and self.mover is not None and self.mover.enqueue(e)):
            self.lru.push_mru(e)

    def dram_copies(self) -> Iterator[Entry]:
        """Committed blocks with a DRAM copy, nearest eviction first (for the clean-shutdown state)."""
        yield from self.lru
        for ns in self.namespaces.values():
            for e in ns.entries.values():
                if e.state == COMMITTED and e.seg is not None and e.prev is None:
                    yield e

    def intern_size(self, size: int) -> int:
        return self._sizes.setdefault(size, size)

    # --------------------------------------------------------------- lookup
    def lookup(self, ns: Namespace, keys: Sequence[bytes]) -> tuple[int, bytes] | str:
        """Length of the committed prefix and each key's tier (0 = miss), or an error message."""
        entries = ns.entries
        tiers = bytearray(len(keys))
        prefix = -1
        hits = 0
        for i, key in enumerate(keys):
            e = entries.get(key)
            if e is not None and e.state == COMMITTED:
                seg = e.seg
                tiers[i] = seg.tier if seg is not None else 4  # TierId.NVME
                hits += 1
            elif prefix < 0:
                prefix = i
        if prefix >= 0:  # a miss may be a malformed key: say so rather than answer "not cached"
            for i, key in enumerate(keys):
                if len(key) != KEY_BYTES:
                    return f"key {i} has {len(key)} bytes; keys are {KEY_BYTES} bytes"
        self.counters.lookup_keys += len(keys)
        self.counters.lookup_hits += hits
        return (len(keys) if prefix < 0 else prefix), bytes(tiers)

    # -------------------------------------------------------------- writing
    def reserve(self, session: Session, keys: Sequence[bytes], sizes: Sequence[int],
                parents: Sequence[bytes | None] | None) -> KeysResult:
        """Slots to write into. Existing keys: ALREADY_EXISTS; keys being written: IN_PROGRESS."""
        ns = session.namespace
        assert ns is not None
        res = KeysResult(len(keys), True)
        if len(sizes) != len(keys) or (parents is not None and len(parents) != len(keys)):
            res.codes = [int(ErrorCode.BAD_REQUEST)] * len(keys)
            res.message = "keys, sizes and parents must have the same length"
            return res
        deadline = self.clock() + self.reserve_timeout_s
        max_bytes = self.tier.max_block_bytes
        no_space = 0
        no_space_bytes = 0
        for i, key in enumerate(keys):
            size = sizes[i]
            parent = parents[i] if parents is not None else None
            if len(key) != KEY_BYTES:
                res.codes[i] = ErrorCode.INVALID_KEY
                continue
            if parent is not None and (len(parent) != KEY_BYTES or parent == key):
                res.codes[i] = ErrorCode.INVALID_PARENT
                continue
            if size <= 0:
                res.codes[i] = ErrorCode.INVALID_SIZE
                res.message = f"key {i}: a block must have at least 1 byte, this one has {size}"
                continue
            if size > max_bytes:
                res.codes[i] = ErrorCode.VALUE_TOO_LARGE
                res.message = (f"block of {size} bytes exceeds the {self.tier.name} tier's largest block "
                               f"({max_bytes} bytes, setting {self.tier.name}.segment_bytes)")
                continue
            e = ns.entries.get(key)
            if e is not None:
                mine = e.state != COMMITTED and session.holds_reservation(key, e)
                if e.nbytes != size and (e.state == COMMITTED or mine):
                    # one key cannot name blocks of two sizes: the caller's layout is wrong (another client's
                    # write in progress is IN_PROGRESS; once committed, a put of another size lands here)
                    res.codes[i] = ErrorCode.INVALID_SIZE
                    res.message = (f"key {i} is {'stored' if e.state == COMMITTED else 'reserved'} with "
                                   f"{e.nbytes} bytes; this put has {size} (a block of another layout under "
                                   "the same key?)")
                elif e.state == COMMITTED:
                    res.codes[i] = ErrorCode.ALREADY_EXISTS
                    if e.prev is not None:
                        self.lru.touch(e)  # a second put of a block is a sign of reuse
                elif mine:  # retried reserve (or the key twice in one batch): the same slot again
                    res.descriptors[i] = self.descriptor(e)
                else:
                    res.codes[i] = ErrorCode.IN_PROGRESS
                continue
            placement = self.make_room(ns.name, size)
            if placement is None:
                res.codes[i] = ErrorCode.NO_SPACE
                no_space += 1
                no_space_bytes += size
                continue
            seg, slot = placement
            size = self.intern_size(size)
            if parent is not None:
                pe = ns.entries.get(parent)
                parent = pe.key if pe is not None else bytes(parent)  # share the parent's key object
            e = Entry(key, ns, seg, slot, size, parent)
            ns.entries[key] = e
            session.reserved[key] = (e, deadline)
            res.descriptors[i] = self.descriptor(e)
        if session.reserved:
            self._leaseholders.add(session)
        if no_space:
            self.counters.no_space += no_space
            res.message = (f"{self.tier.name} tier full: {no_space} key(s) asking {no_space_bytes} bytes found no free "
                           f"or evictable slot (capacity {self.tier.capacity} bytes, {self._pinned_or_reserved()} "
                           f"blocks pinned or being written)")
        return res

    def make_room(self, owner: str, size: int) -> tuple[Segment, int] | None:
        """A slot, evicting the policy's victims until one frees up (O(1) each). Victims the NVMe admission
        wants are written there first (demotion): up to a few times ``size`` of them are queued, then None
        says to wait for those writes."""
        demoting = 0
        while True:
            placement = self.tier.allocate(owner, size)
            if placement is not None:
                return placement
            victim = self._victim()
            if victim is None or demoting > 4 * size:
                return None
            if not self._evict_or_demote(victim):
                demoting += victim.nbytes

    def _evict_or_demote(self, v: Entry) -> bool:
        """Drop the victim's DRAM copy now (True), or queue its write to NVMe first (False): it has no
        NVMe copy yet and the admission rule says it is worth one."""
        mover = self.mover
        if (v.nseg is None and not self.write_through and mover is not None
                and self.admission.admit_on_eviction(v.key) and mover.demote(v)):
            return False
        self._evict(v)
        return True

    def drop_dram_copy(self, e: Entry) -> None:
        """A demoted block is on NVMe now: free its DRAM copy unless someone pinned it meanwhile."""
        if e.state == COMMITTED and e.seg is not None and e.nseg is not None and e.pins == 0:
            self.lru.unlink(e)
            self.counters.evictions += 1
            self.counters.evicted_bytes += e.nbytes
            self._free_dram_copy(e)

    def set_watermarks(self, high: float, low: float) -> None:
        """Shares of the DRAM capacity between which the background evictor works (high 1.0: off)."""
        cap = self.tier.capacity
        self.high_water = int(cap * high) if high < 1.0 else cap
        self.low_water = min(int(cap * low), self.high_water)

    def evict_background(self, limit: int) -> int:
        """Evict up to ``limit`` unpinned blocks, least valuable first, while DRAM is above the low watermark."""
        allocator = self.tier.allocator
        n = 0
        window = self.high_water - self.low_water
        while n < limit and allocator.used_bytes > self.low_water:
            if self.mover is not None and self.mover.demoting_bytes > window:
                break  # enough on its way to NVMe; their DRAM copies go when the writes land
            victim = self._victim()
            if victim is None:
                break
            self._evict_or_demote(victim)
            n += 1
        self.counters.background_evictions += n
        return n

    def _victim(self) -> Entry | None:
        """The policy's victim, leaf first: a block whose descendants still have DRAM copies goes after
        them (deepest first), so chains shrink from their tails and shared heads stay. The descent resumes
        under the last victim, so a chain goes in O(depth) steps, not O(depth²)."""
        return self._leaf_first(self.lru.lru())

    def _evict(self, e: Entry) -> None:
        """Drop a block's DRAM copy; a block with no NVMe copy leaves the index."""
        self.lru.unlink(e)
        self.counters.evictions += 1
        self.counters.evicted_bytes += e.nbytes
        self._free_dram_copy(e)
        if e.nseg is None:
            self.forget(e)

    def add_dram_copy(self, e: Entry, seg: Segment, slot: int) -> None:
        """The block's bytes are now complete in this DRAM slot (a commit, or a read back from NVMe)."""
        e.seg = seg
        e.slot = slot
        self.dram_blocks += 1
        self.dram_bytes += e.nbytes
        if e.parent is not None:
            pe = e.ns.entries.get(e.parent)
            if pe is not None:
                pe.add_kid(e)

    def _free_dram_copy(self, e: Entry) -> None:
        for hook in self.dram_free_hooks:
            hook(e)
        self.tier.free(e.seg, e.slot)
        e.seg = None
        self.dram_blocks -= 1
        self.dram_bytes -= e.nbytes
        if e.parent is not None:
            pe = e.ns.entries.get(e.parent)
            if pe is not None:
                pe.drop_kid(e)

    def forget(self, e: Entry) -> None:
        """A committed block with no copy left: out of its namespace (pinned holders keep the entry)."""
        ns = e.ns
        if ns.entries.get(e.key) is e:
            del ns.entries[e.key]
        ns.blocks -= 1
        ns.bytes -= e.nbytes
        e.state = DELETED

    def pin(self, e: Entry) -> None:
        """Not evictable, not freed, until ``unpin``: a client's lease, or a copy between tiers in flight."""
        if e.pins == 0:
            if e.prev is not None:
                self.lru.unlink(e)
            self.pinned_blocks += 1
        e.pins += 1

    def commit(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Publish reserved blocks: from now on readers see them."""
        res = KeysResult(len(keys), False)
        counters = self.counters
        for i, key in enumerate(keys):
            held = session.reserved.pop(key, None)
            if held is None:
                res.codes[i] = self._not_reserved_code(session, key)
                continue
            e = held[0]
            e.state = COMMITTED
            ns = e.ns
            ns.blocks += 1
            ns.bytes += e.nbytes
            counters.puts += 1
            counters.put_bytes += e.nbytes
            self.add_dram_copy(e, e.seg, e.slot)
            if not self.write_through:
                self.admission.record(key)
            self._settle(e)
            for hook in self.commit_hooks:
                hook(e)
        if self.pressure is not None and self.tier.allocator.used_bytes > self.high_water:
            self.pressure()
        return res

    def abort(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Drop reservations; their slots are free again."""
        res = KeysResult(len(keys), False)
        for i, key in enumerate(keys):
            held = session.reserved.pop(key, None)
            if held is None:
                res.codes[i] = self._not_reserved_code(session, key)
                continue
            self._drop_reserved(held[0])
        return res

    def _drop_reserved(self, e: Entry) -> None:
        del e.ns.entries[e.key]
        e.state = DELETED
        self.counters.aborted += 1
        self.tier.free(e.seg, e.slot)

    def _not_reserved_code(self, session: Session, key: bytes) -> int:
        if len(key) != KEY_BYTES:
            return ErrorCode.INVALID_KEY
        e = session.namespace.entries.get(key)  # type: ignore[union-attr]
        if e is not None and e.state == COMMITTED:
            return ErrorCode.ALREADY_EXISTS
        return ErrorCode.NOT_RESERVED

    # -------------------------------------------------------------- reading
    def acquire(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Pin committed blocks and say where they are."""
        ns = session.namespace
        assert ns is not None
        res = KeysResult(len(keys), True)
        deadline = self.clock() + self.pin_timeout_s
        pins = session.pins
        hits = 0
        record = None if self.write_through else self.admission.record  # a request counts as a sighting
        for i, key in enumerate(keys):
            if record is not None:
                record(key)
            e = ns.entries.get(key)
            if e is None or e.state != COMMITTED:
                if len(key) != KEY_BYTES:
                    res.codes[i] = ErrorCode.INVALID_KEY
                else:
                    res.codes[i] = ErrorCode.IN_PROGRESS if e is not None else ErrorCode.NOT_FOUND
                continue
            if not self.write_through and e.seg is not None:
                self.admission.hit_in_dram(key)
            self.pin(e)
            pin = pins.get(key)
            if pin is None:
                pins[key] = [1, deadline, e]
            else:
                pin[0] += 1
                pin[1] = deadline
            if e.seg is not None:
                res.descriptors[i] = self.descriptor(e)
            else:
                res.promote.append((i, e))  # on NVMe only: the mover reads it into DRAM first
            if e.nseg is not None:
                self.mover.touch(e)  # type: ignore[union-attr]
            hits += 1
        if hits:
            self._leaseholders.add(session)
        self.counters.get_keys += len(keys)
        self.counters.get_hits += hits
        return res

    def release(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """End one pin per key."""
        res = KeysResult(len(keys), False)
        pins = session.pins
        for i, key in enumerate(keys):
            pin = pins.get(key)
            if pin is None:
                res.codes[i] = ErrorCode.NOT_PINNED if len(key) == KEY_BYTES else ErrorCode.INVALID_KEY
                continue
            pin[0] -= 1
            if pin[0] == 0:
                del pins[key]
            self.unpin(pin[2])
        return res

    def unpin(self, e: Entry, count: int = 1) -> None:
        e.pins -= count
        if e.pins == 0:
            self.pinned_blocks -= 1
            if e.state == COMMITTED:
                if e.seg is not None:
                    self.lru.push_mru(e)
            elif e.state == DELETED:
                self._discard(e)

    def _discard(self, e: Entry) -> None:
        """A deleted, unpinned block: free its copies."""
        if e.seg is not None:
            self._free_dram_copy(e)
        if e.nseg is not None:
            self.mover.unindex(e)  # type: ignore[union-attr]

    def delete(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Remove blocks from the index now; pinned bytes stay valid until their last release."""
        ns = session.namespace
        assert ns is not None
        res = KeysResult(len(keys), False)
        for i, key in enumerate(keys):
            e = ns.entries.get(key)
            if e is None:
                res.codes[i] = ErrorCode.INVALID_KEY if len(key) != KEY_BYTES else ErrorCode.NOT_FOUND
                continue
            if e.state == RESERVED:
                if session.holds_reservation(key, e):
                    del session.reserved[key]
                    self._drop_reserved(e)
                else:
                    res.codes[i] = ErrorCode.IN_PROGRESS
                continue
            self.forget(e)
            self.counters.deleted += 1
            for hook in self.delete_hooks:
                hook(e)
            if e.pins == 0:
                if e.prev is not None:
                    self.lru.unlink(e)
                self._discard(e)
        return res

    # --------------------------------------------------------------- leases
    def close_session(self, session: Session) -> tuple[int, int]:
        """A client went away: abort its reservations and end its pins. Returns (aborted, unpinned)."""
        session.closed = True
        self._leaseholders.discard(session)
        aborted = len(session.reserved)
        for e, _deadline in session.reserved.values():
            self._drop_reserved(e)
        session.reserved.clear()
        unpinned = 0
        for count, _deadline, e in session.pins.values():
            self.unpin(e, count)
            unpinned += count
        session.pins.clear()
        return aborted, unpinned

    def sweep(self) -> tuple[int, int]:
        """End reservations and pins whose lease ran out. Returns (reservations, pins) ended.

        Cost is proportional to the leases outstanding, which clients bound by what they hold.
        """
        now = self.clock()
        expired_res = 0
        expired_pins = 0
        for session in list(self._leaseholders):
            reserved = session.reserved
            # a session receiving a write's bytes into its slots keeps them until the payload is in
            # (or its connection ends): freeing one now would let the bytes land in someone else's block
            for key in [] if session.receiving else [k for k, (_e, deadline) in reserved.items() if deadline <= now]:
                self._drop_reserved(reserved.pop(key)[0])
                expired_res += 1
            pins = session.pins
            for key in [k for k, pin in pins.items() if pin[1] <= now]:
                count, _deadline, e = pins.pop(key)
                self.unpin(e, count)
                expired_pins += count
            if not reserved and not pins:
                self._leaseholders.discard(session)
        self.counters.expired_reservations += expired_res
        self.counters.expired_pins += expired_pins
        if expired_res or expired_pins:
            log.warning("lease expiry: %d reservation(s) and %d pin(s) ended", expired_res, expired_pins)
        return expired_res, expired_pins

    # -------------------------------------------------------------- helpers
    def descriptor(self, e: Entry) -> Descriptor:
        return Descriptor(int(e.seg.tier), e.seg.id, e.slot * e.seg.slot_size, e.nbytes)

    def _pinned_or_reserved(self) -> int:
        reserved = sum(len(ns.entries) - ns.blocks for ns in self.namespaces.values())
        return reserved + self.pinned_blocks

    def stats(self) -> dict[str, Any]:
        """Everything an operator needs, in sections (the REST API, metrics and CLI read this)."""
        c = self.counters
        tier_stats = self.tier.stats()
        tier_stats.update(
            tier_id=int(self.tier.tier_id),
            blocks=self.dram_blocks,
            used_bytes=self.dram_bytes,
            evictable_blocks=self.lru.size,
            pinned_blocks=self.pinned_blocks,
            hit_ratio=round(c.lookup_hits / c.lookup_keys, 4) if c.lookup_keys else None,
            get_hit_ratio=round(c.get_hits / c.get_keys, 4) if c.get_keys else None,
        )
        tiers = [tier_stats]
        if self.mover is not None:
            tiers.append(self.mover.stats())
        elif self.nvme_unavailable is not None:
            tiers.append({"tier": "nvme", "tier_id": 4, "available": False, "degraded": self.nvme_unavailable})
        return {
            "tiers": tiers,
            "ops": c.as_dict(),
            "namespaces": {ns.name: {"blocks": ns.blocks, "bytes": ns.bytes, "entries": len(ns.entries)}
                           for ns in self.namespaces.values()},
        }

    def tier_of(self, tier_id: int) -> Tier | None:
        return self.tiers.get(tier_id)


__all__ = ["Store", "KeysResult", "namespace_salt", "TierId"]


def _evictable_kid(e: Entry) -> Entry | None:
    """A child with a DRAM copy that may go now (committed, unpinned); None: the block itself goes."""
    return None if e.kids is None else next((k for k in e.each_kid() if k.prev is not None), None)


def _deepest_evictable(e: Entry) -> Entry | None:
    return leaf_first(e, _evictable_kid)


def _in_order(e: Entry) -> bool:
    """Committed, unpinned, with a DRAM copy: a member of the eviction order."""
    return e.prev is not None


def _dram_parent(e: Entry) -> Entry | None:
    return None if e.parent is None else e.ns.entries.get(e.parent)
