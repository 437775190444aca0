"""The block store: two-phase writes, pins, leases and eviction over the index and the tiers.

Pure logic with no sockets: the control server calls it with a session and a
batch of keys, and gets back per-key codes and descriptors (or, when a read
must wait for a copy from another tier, a coroutine that produces them). Time
comes from an injected clock so lease expiry is testable. The tiers that keep
copies of DRAM blocks (NVMe, CXL, HBM) plug in through ``Movement``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import blake3

from kvrack.daemon.adoption import Adoption
from kvrack.daemon.counters import StoreCounters
from kvrack.daemon.eviction import Eviction
from kvrack.daemon.index import COMMITTED, DELETED, RESERVED, SLOT_BITS, SLOT_MASK, Entry, Namespace
from kvrack.daemon.leases import Leases
from kvrack.daemon.movement import CopyingTier, Movement
from kvrack.daemon.order import NamespaceOrders
from kvrack.daemon.policies.admission import Admission, make_admission
from kvrack.daemon.policies.base import LeafFirst
from kvrack.daemon.policies.chains import EntryChains
from kvrack.daemon.reads import Reads
from kvrack.daemon.results import KeysResult
from kvrack.daemon.session import Session
from kvrack.daemon.settings import NamespaceConfig
from kvrack.daemon.store_views import StoreViews
from kvrack.protocol import KEY_BYTES, Descriptor, ErrorCode, TierId, with_extra_hits
from kvrack.tiers.base import Segment
from kvrack.tiers.dram import MemoryTier

if TYPE_CHECKING:
    from kvrack.daemon.events import EventPublisher
    from kvrack.daemon.mover import Mover

log = logging.getLogger("kvrack.store")
OK = int(ErrorCode.OK)


def namespace_salt(cfg: NamespaceConfig) -> bytes:
    """The configured salt, or one derived from the name so that restarts keep keys stable."""
    return cfg.salt or blake3.blake3(b"kvrack-namespace-salt-v1:" + cfg.name.encode()).digest()





class Store(Eviction, Reads, StoreViews, Adoption):
    """Index + tiers + leases. One instance per daemon, driven from the event loop thread.

    ``tier`` is the memory tier clients map (DRAM); the copying tiers added with ``add_copier`` keep
    other copies. An entry is in ``order`` (the DRAM tier's eviction order, any policy) exactly when it
    is committed, unpinned and has a DRAM copy. Eviction (``kvrack.daemon.eviction``) and the reads and
    writes that may wait for another tier (``kvrack.daemon.reads``) are in modules of their own.
    """

    def __init__(self, tier: MemoryTier, namespaces: Sequence[NamespaceConfig], reserve_timeout_s: float = 30.0,
                 pin_timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 policy: str = "lru", typical_block_bytes: int = 2 << 20) -> None:
        self.tier = tier
        self.tiers: dict[int, MemoryTier] = {int(tier.tier_id): tier}  # tiers whose segments clients map
        self.namespaces = {ns.name: Namespace(ns.name, namespace_salt(ns), ns.uids, ns.gids, ns.token,
                                              dict(ns.quota)) for ns in namespaces}
        self.reserve_timeout_s = reserve_timeout_s
        self.pin_timeout_s = pin_timeout_s
        self.max_leases_per_session = 1 << 20  # leases.max_per_session
        self.events: EventPublisher | None = None  # KV events for routers (events.enabled)
        self.clock = clock
        # non-LRU policies size their queues in blocks, estimated from the capacity and a typical block size
        self.order = NamespaceOrders(self.namespaces, policy, tier.capacity // max(1, typical_block_bytes))
        self.chains = EntryChains()  # children with a DRAM copy, for leaf-first eviction
        for ns in self.namespaces.values():
            ns.leaf = LeafFirst(self._deepest_evictable, self._dram_parent, self.order.holds)
        self._typical_block = typical_block_bytes
        self.pinned_blocks = 0  # blocks with at least one pin, deleted-but-pinned included
        self.counters = StoreCounters()
        self.hits_by_tier = {int(t): 0 for t in TierId if t}  # keys looked up that hit, by tier id
        self._sizes: dict[int, int] = {}  # interned block sizes: one int object per size, not per entry
        self.leases = Leases(self)
        self.movement = Movement()
        self.nvme: Mover | None = None  # the NVMe tier's copies, when it is open (also in ``movement``)
        self.absent: dict[str, dict[str, Any]] = {}  # configured tiers that are not there, and why (for stats)
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

    def set_admission(self, name: str) -> None:
        self.admission = make_admission(name, max(1, self.tier.capacity // max(1, self._typical_block)))
        self.write_through = name == "all"

    def add_copier(self, tier: CopyingTier) -> None:
        """A tier that keeps copies of DRAM blocks (the CXL and HBM pools; the NVMe mover through ``attach``)."""
        self.movement.add(tier)

    def attach(self, mover: Mover) -> None:
        """Add the NVMe tier (through its mover): committed blocks get a durable copy there."""
        self.nvme = mover
        self.add_copier(mover)

    def _settle(self, e: Entry) -> None:
        """A block newly committed in DRAM: queued for its NVMe copy when written through, else evictable."""
        if not (self.write_through and self.nvme is not None and self.nvme.enqueue(e)):
            self.order.add(e)

    def dram_copies(self) -> Iterator[Entry]:
        """Committed blocks with a DRAM copy, nearest eviction first (for the clean-shutdown state)."""
        yield from self.order
        for ns in self.namespaces.values():
            for e in ns.entries.values():
                if e.state == COMMITTED and e.seg is not None and not self.order.holds(e):
                    yield e

    def intern_size(self, size: int) -> int:
        return self._sizes.setdefault(size, size)

    # --------------------------------------------------------------- lookup
    def lookup(self, ns: Namespace, keys: Sequence[bytes]) -> tuple[int, bytes] | str:
        """Length of the cached prefix and each key's tier (0 = miss), blocks only a copying tier still holds
        (the CXL region) included; or an error message."""
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
        ns.lookup_keys += len(keys)
        ns.lookup_hits += hits
        if hits:
            by_tier = self.hits_by_tier
            for tier_id in by_tier:
                by_tier[tier_id] += tiers.count(tier_id)
        if prefix < 0:
            return len(keys), bytes(tiers)
        if self.movement:
            missing = [i for i, t in enumerate(tiers) if not t]
            found = self.movement.holds(ns, [keys[i] for i in missing])
            if found is not None:
                held = [False] * len(tiers)
                for i, h in zip(missing, found[0]):
                    held[i] = h
                return with_extra_hits(bytes(tiers), held, found[1])
        return prefix, bytes(tiers)

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
        room = self.max_leases_per_session - session.leases()  # reservations this session may still take
        ns_room = self.namespace_lease_room(ns)  # and the namespace's connections together (quota_leases)
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
                    if self.order.holds(e):
                        self.order.touch(e)  # a second put of a block is a sign of reuse
                elif mine:  # retried reserve (or the key twice in one batch): the same slot again
                    res.descriptors[i] = self.descriptor(e)
                else:
                    res.codes[i] = ErrorCode.IN_PROGRESS
                continue
            if room <= 0:
                res.codes[i] = ErrorCode.NO_SPACE
                res.message = (f"this connection holds {session.leases()} reservations and pins "
                               f"(leases.max_per_session = {self.max_leases_per_session}): commit, abort or release "
                               "some first")
                continue
            if ns_room is not None and ns_room <= 0:
                res.codes[i] = ErrorCode.QUOTA_EXCEEDED
                res.message = self._lease_quota_text(ns)
                continue
            if ns.quota and ns.over_quota("dram", size, 1) and not self.shed(ns, size, 1):
                res.codes[i] = ErrorCode.QUOTA_EXCEEDED
                res.message = (f"namespace {ns.name!r} is at its DRAM quota ({_quota_text(ns, 'dram')}) and none of "
                               "its own blocks can go (all pinned or being written)")
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
            room -= 1
            if ns_room is not None:
                ns_room -= 1
            ns.entries[key] = e
            ns.reserved_blocks += 1
            ns.reserved_bytes += size
            session.reserved[key] = (e, deadline)
            res.descriptors[i] = self.descriptor(e)
        if session.reserved:
            self.leases.hold(session)
        if no_space:
            self.counters.no_space += no_space
            res.message = (f"{self.tier.name} tier full: {no_space} key(s) asking {no_space_bytes} bytes found no free "
                           f"or evictable slot (capacity {self.tier.capacity} bytes, {self._pinned_or_reserved()} "
                           f"blocks pinned or being written)")
        return res

    def add_dram_copy(self, e: Entry, seg: Segment, slot: int) -> None:
        """The block's bytes are now complete in this DRAM slot (a commit, or a read back from NVMe)."""
        e.seg = seg
        loc = e.loc
        if loc & SLOT_MASK != slot:
            e.slot = slot
        if self.events is not None:
            self.events.stored(e, seg.tier)
        nbytes = loc >> SLOT_BITS
        self.dram_blocks += 1
        self.dram_bytes += nbytes
        e.ns.dram_blocks += 1
        e.ns.dram_bytes += nbytes
        if e.parent is not None:
            pe = e.ns.entries.get(e.parent)
            if pe is not None:
                self.chains.add(pe, e)

    def _free_dram_copy(self, e: Entry) -> None:
        for t in self.movement.on_dram_free:
            t.dram_copy_freed(e)
        if self.events is not None:
            self.events.removed(e, e.seg.tier)
        loc = e.loc
        self.tier.free(e.seg, loc & SLOT_MASK)
        e.seg = None
        nbytes = loc >> SLOT_BITS
        self.dram_blocks -= 1
        self.dram_bytes -= nbytes
        e.ns.dram_blocks -= 1
        e.ns.dram_bytes -= nbytes
        if e.parent is not None:
            pe = e.ns.entries.get(e.parent)
            if pe is not None:
                self.chains.drop(pe, e)

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
            if self.order.holds(e):
                self.order.remove(e)
            self.pinned_blocks += 1
        e.pins += 1

    def commit(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Publish reserved blocks: from now on readers see them."""
        res = KeysResult(len(keys), False)
        counters = self.counters
        copiers = self.movement.on_commit
        for i, key in enumerate(keys):
            held = session.reserved.pop(key, None)
            if held is None:
                res.codes[i] = self._not_reserved_code(session, key)
                continue
            e = held[0]
            e.state = COMMITTED
            ns = e.ns
            nbytes = e.loc >> SLOT_BITS
            ns.reserved_blocks -= 1
            ns.reserved_bytes -= nbytes
            ns.blocks += 1
            ns.bytes += nbytes
            counters.puts += 1
            counters.put_bytes += nbytes
            self.add_dram_copy(e, e.seg, e.loc & SLOT_MASK)
            if not self.write_through:
                self.admission.record(key)
            self._settle(e)
            for t in copiers:
                t.committed(e)
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
            self.drop_reserved(held[0])
        return res

    def drop_reserved(self, e: Entry, free_slot: bool = True) -> None:
        """A reservation ends uncommitted: out of the index, its slot free (or, ``free_slot`` False, kept out of
        reuse by its session until it ends: an expired lease whose writer may still be copying)."""
        del e.ns.entries[e.key]
        e.ns.reserved_blocks -= 1
        e.ns.reserved_bytes -= e.nbytes
        e.state = DELETED
        self.counters.aborted += 1
        if free_slot:
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
        room = self.max_leases_per_session - session.leases()  # keys this session may still pin
        ns_room = self.namespace_lease_room(ns)
        record = None if self.write_through else self.admission.record  # a request counts as a sighting
        nvme = self.nvme
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
            pin = pins.get(key)
            if pin is None and room <= 0:
                res.codes[i] = ErrorCode.NO_SPACE
                res.message = (f"this connection holds {session.leases()} reservations and pins "
                               f"(leases.max_per_session = {self.max_leases_per_session}): release some first")
                continue
            if pin is None and ns_room is not None and ns_room <= 0:
                res.codes[i] = ErrorCode.QUOTA_EXCEEDED
                res.message = self._lease_quota_text(ns)
                continue
            if not self.write_through and e.seg is not None:
                self.admission.hit_in_dram(key)
            self.pin(e)
            if pin is None:
                room -= 1
                if ns_room is not None:
                    ns_room -= 1
                pins[key] = [1, deadline, e]
            else:
                pin[0] += 1
                pin[1] = deadline
            e.count_hit()
            if e.seg is not None:
                res.descriptors[i] = self.descriptor(e)
            else:
                res.promote.append((i, e))  # on NVMe only: the mover reads it into DRAM first
            if e.nseg is not None:
                nvme.referenced(e)  # type: ignore[union-attr]
            hits += 1
        if hits:
            self.leases.hold(session)
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
                    self.order.add(e)
            elif e.state == DELETED:
                self._discard(e)

    def _discard(self, e: Entry) -> None:
        """A deleted, unpinned block: free its copies."""
        if e.seg is not None:
            self._free_dram_copy(e)
        if e.nseg is not None:
            self.nvme.discard(e)  # type: ignore[union-attr]

    def delete(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        """Remove blocks from the index now, and their copies in other tiers; pinned bytes stay valid until
        their last release."""
        assert session.namespace is not None
        return self.delete_keys(session.namespace, keys, session)

    def delete_keys(self, ns: Namespace, keys: Sequence[bytes], session: Session | None = None) -> KeysResult:
        """``delete`` for a client's ``session`` or, without one, for the admin API (a block being written is
        IN_PROGRESS to it)."""
        res = KeysResult(len(keys), False)
        copiers = self.movement.on_delete
        for i, key in enumerate(keys):
            e = ns.entries.get(key)
            if e is None:
                if len(key) != KEY_BYTES:
                    res.codes[i] = ErrorCode.INVALID_KEY
                elif not self.movement.forget(ns, key):  # blocks that left DRAM and NVMe may be in CXL
                    res.codes[i] = ErrorCode.NOT_FOUND
                continue
            if e.state == RESERVED:
                if session is not None and session.holds_reservation(key, e):
                    del session.reserved[key]
                    self.drop_reserved(e)
                else:
                    res.codes[i] = ErrorCode.IN_PROGRESS
                continue
            self.forget(e)
            self.counters.deleted += 1
            for t in copiers:
                t.deleted(e)
            if e.pins == 0:
                if self.order.holds(e):
                    self.order.remove(e)
                self._discard(e)
        return res

    def close_session(self, session: Session) -> tuple[int, int]:
        """A client went away: abort its reservations and end its pins. Returns (aborted, unpinned)."""
        return self.leases.close_session(session)

    def namespace_leases(self, ns: Namespace) -> int:
        """Reservations and pins the namespace's connections hold together (expired ones kept included)."""
        return sum(s.leases() for s in self.leases.holders if s.namespace is ns)

    def namespace_lease_room(self, ns: Namespace) -> int | None:
        """How many more leases the namespace's quota_leases allows; None without one."""
        limit = ns.quota.get("leases") if ns.quota else None
        return None if limit is None else limit - self.namespace_leases(ns)

    def _lease_quota_text(self, ns: Namespace) -> str:
        return (f"namespace {ns.name!r} holds {self.namespace_leases(ns)} reservations and pins across its "
                f"connections (quota_leases = {ns.quota['leases']}): commit, abort or release some first")

    def sweep(self) -> tuple[int, int]:
        """End reservations and pins whose lease ran out. Returns (reservations, pins) ended."""
        return self.leases.sweep()

    def touch(self, ns: Namespace, keys: Sequence[bytes]) -> None:
        """Reads a client served from a tier's mapping by itself (CXL): hits for that tier's order."""
        for t in self.movement.tiers:
            t.touch(ns, keys)

    # -------------------------------------------------------------- helpers
    def descriptor(self, e: Entry) -> Descriptor:
        loc = e.loc
        return Descriptor(int(e.seg.tier), e.seg.id, (loc & SLOT_MASK) * e.seg.slot_size, loc >> SLOT_BITS)

    def _pinned_or_reserved(self) -> int:
        reserved = sum(len(ns.entries) - ns.blocks for ns in self.namespaces.values())
        return reserved + self.pinned_blocks

    def tier_of(self, tier_id: int) -> MemoryTier | None:
        return self.tiers.get(tier_id)

def _quota_text(ns: Namespace, tier: str) -> str:
    return ", ".join(f"{k.split('_', 1)[1]} {v}" for k, v in ns.quota.items() if k.startswith(tier)) or "none"


__all__ = ["KeysResult", "Store", "TierId", "namespace_salt"]
