"""A CXL shared-memory region: the layout of ``cxl_layout`` and the protocol that keeps it consistent.

Readers need no lock and no registration: they map the region (read-only is
enough), probe the index and copy blocks with ``_native.cxl_lookup`` and
``_native.cxl_read``, which drop stale cache lines first and retry when the
entry's seqlock version moved during the copy. Writers register a host id,
take chunks from their own heap (refilled from the global chunk table under
the region lock), reserve an index entry under the lock (state WRITING), copy
the block with non-temporal stores (in memory when the copy returns), and
publish it READY. Eviction, deletion and the reaping of dead hosts run under
the lock and bump the entry's version before its chunk can be reused, so a
reader that was copying the old block sees the change and retries.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import xxhash

from kvrack import _native
from kvrack.tiers.base import size_segment_fd
from kvrack.tiers.cxl_layout import (
    EMPTY,
    ENTRY,
    ENTRY_BYTES,
    FORMATTED,
    HOST,
    KEY_BYTES,
    LINE,
    NAMESPACE_BYTES,
    OFF_ALLOC_HINT,
    OFF_EVICT_HAND,
    OFF_FORMATTED,
    OFF_HOSTS,
    OFF_NAMESPACE,
    READY,
    TOMBSTONE,
    WRITING,
    Geometry,
    loc_chunk,
    loc_nbytes,
    loc_word,
    meta_host,
    meta_state,
    meta_word,
)
from kvrack.tiers.cxl_lock import RegionLock, pid_alive

log = logging.getLogger("kvrack.tiers.cxl")
ENTRY_DTYPE = np.dtype([("version", "<u8"), ("meta", "<u8"), ("key", "V32"), ("loc", "<u8"), ("check", "<u8")])
HEAP_REFILL = 8  # chunks a writer claims from the global table at a time
READ_RETRIES = 64
# page tables filled at map time: the first access to a block costs no page fault
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class CxlFull(RuntimeError):
    """No free chunk and nothing evictable (every block is being written)."""


@functools.cache
def machine_id() -> int:
    """A 64-bit id of this machine and boot: hosts on the same one can check each other's pids."""
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path, "rb") as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    digest = hashlib.blake2b(b"|".join(parts) or os.uname().nodename.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never 0: 0 marks an unclaimed host line


def device_bytes(path: str) -> int:
    """Size of a regular file, or of a devdax character device (from sysfs)."""
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode):
        sys_path = f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size"
        try:
            with open(sys_path) as f:
                return int(f.read())
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read the size of {path} from {sys_path}: {exc.strerror}") from None
    return st.st_size


class CxlRegion:
    """One mapped region. ``create`` formats (or re-adopts) it; ``open`` attaches to an existing one."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, geometry: Geometry, namespace: str, writable: bool,
                 coherent: bool, lease_ms: int = 5000) -> None:
        self.path = path
        self.fd = fd
        self._mmap = mm
        self.mm = memoryview(mm)
        self.g = geometry
        self.namespace = namespace
        self.writable = writable
        self.invalidate = not coherent  # hosts whose hardware keeps the region coherent may skip invalidation
        self.lease_ms = lease_ms
        self.host: int | None = None
        self.machine = machine_id()
        self._heap: list[int] = []  # chunks this host claimed and holds no block in
        self._heap_lock = threading.Lock()
        self._lock: RegionLock | None = None
        self._index_view = np.frombuffer(mm, dtype=ENTRY_DTYPE, count=geometry.nslots, offset=geometry.index_offset)
        # per slot, the entry version this process last read the block at (then two counters): a block read
        # again unchanged needs no invalidation of its lines (see cxl_read); zero pages until touched
        self._validated = np.zeros(geometry.nslots + 2, dtype=np.uint64)
        self.counters = {"puts": 0, "put_bytes": 0, "exists": 0, "evictions": 0, "deletes": 0, "reaped_hosts": 0}

    # ---- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, chunk_bytes: int, namespace: str, max_hosts: int = 64,
               coherent: bool = False, lease_ms: int = 5000) -> CxlRegion:
        """Map ``path`` read-write, creating a file of ``size`` bytes unless it is a device (on hugetlbfs, rounded
        up to whole huge pages); keep an existing region whose header, geometry and namespace match (its blocks
        survive), format it otherwise."""
        existed = os.path.exists(path)
        is_device = existed and stat.S_ISCHR(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDWR | (0 if is_device else os.O_CREAT) | os.O_CLOEXEC, 0o600)
        if not is_device:  # pages allocated now, not at the first store; on hugetlbfs whole huge pages
            try:
                size = size_segment_fd(fd, size, True, f"a cxl region file ({path})", round_up=True)
            except OSError:  # the fd is closed; a file this call made holds nothing worth keeping
                if not existed:
                    os.unlink(path)
                raise
        try:
            if is_device:
                size = device_bytes(path)
            want = Geometry.plan(size, chunk_bytes, max_hosts)
            mm = mmap.mmap(fd, size, MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            if not existed:
                os.unlink(path)
            raise
        try:
            have = Geometry.unpack(mm, size) if _native.load64(mm, OFF_FORMATTED) == FORMATTED else None
        except ValueError:
            have = None
        if have != want or _read_namespace(mm) != namespace:
            _format(mm, want, namespace)
            log.info("cxl: formatted %s for namespace %r: %d chunks of %d bytes, %d index slots",
                     path, namespace, want.nchunks, want.chunk_bytes, want.nslots)
        else:
            log.info("cxl: adopted %s for namespace %r with its blocks", path, namespace)
        return cls(path, fd, mm, want, namespace, True, coherent, lease_ms)

    @classmethod
    def open(cls, path: str, namespace: str | None = None, writable: bool = False, coherent: bool = False,
             fd: int | None = None, lease_ms: int = 5000) -> CxlRegion:
        """Attach to a formatted region (by path, or by an fd the daemon passed); read-only unless ``writable``."""
        own_fd = fd is None
        if fd is None:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            size = device_bytes(path) if stat.S_ISCHR(st.st_mode) else st.st_size
            if size < OFF_HOSTS:
                raise ValueError(f"cxl region {path}: {size} bytes, too small to hold a region header (not formatted; "
                                 "is the daemon running?)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, MAP_FLAGS, prot)
        except BaseException:
            if own_fd:
                os.close(fd)
            raise
        _native.invalidate(mm, 0, 8 * LINE)
        if _native.load64(mm, OFF_FORMATTED) != FORMATTED:
            mm.close()
            raise ValueError(f"cxl region {path}: not formatted (is the daemon running?)")
        g = Geometry.unpack(mm, size)
        name = _read_namespace(mm)
        if namespace is not None and name != namespace:
            mm.close()
            raise PermissionError(f"cxl region {path} belongs to namespace {name!r}, not {namespace!r}")
        return cls(path, fd if own_fd else -1, mm, g, name, writable, coherent, lease_ms)

    def close(self) -> None:
        if self.host is not None and self.writable:
            try:
                self.detach_host()
            except Exception:  # noqa: BLE001 - closing must not fail; reclaim frees what is left
                log.exception("cxl: could not detach host %s cleanly", self.host)
        self._index_view = None  # type: ignore[assignment]
        self.mm.release()
        self._mmap.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- reading (no lock, any host) ------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes] | bytes, out: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        """(leading hits, entry slot per key or -1) for a batch of keys."""
        packed = keys if isinstance(keys, bytes | bytearray | memoryview) else b"".join(keys)
        n = len(packed) // KEY_BYTES
        if out is None:
            out = np.empty(n, dtype=np.int64)
        leading = _native.cxl_lookup(self.mm, self.g.index_offset, self.g.nslots, packed, out, self.invalidate)
        return leading, out

    def read(self, key: bytes, dst: Any, offset: int = 0) -> int | None:
        """Copy the block into ``dst`` at ``offset``: its length, or None when it is not (or no longer) here."""
        return _read_result(key, _native.cxl_read(self.mm, self.g.index_offset, self.g.nslots, self.g.data_offset,
                                                  self.g.chunk_bytes, key, dst, offset, self.invalidate,
                                                  READ_RETRIES, self._validated))

    def read_many(self, keys: Sequence[bytes], dsts: Sequence[Any]) -> list[int | None]:
        """``read`` for each key into the writable buffer at the same position, in one native call: a prefix of
        small blocks pays the call, the argument checks and the GIL hand-off once, not once per block."""
        packed = b"".join(keys)
        got = _native.cxl_read_many(self.mm, self.g.index_offset, self.g.nslots, self.g.data_offset,
                                    self.g.chunk_bytes, packed, dsts, self.invalidate, READ_RETRIES, self._validated)
        return [_read_result(key, n) for key, n in zip(keys, got)]

    def forget_reads(self) -> None:
        """Treat every block as never read by this process: the next read of each drops its lines again."""
        self._validated[: self.g.nslots] = 0

    def read_counts(self) -> dict[str, int]:
        """This process's reads that dropped the block's lines, and those of blocks unchanged since it read them."""
        return {"reads_invalidated": int(self._validated[self.g.nslots + 1]),
                "reads_unchanged_since_last_read": int(self._validated[self.g.nslots])}

    def size_of(self, key: bytes) -> int | None:
        """The block's length, or None when it is not here (a snapshot: it may go right after)."""
        found, slots = self.lookup(key)
        if not found:
            return None
        _v, meta, stored, loc, _c = self._entry(int(slots[0]))
        return loc_nbytes(loc) if meta_state(meta) == READY and stored == key else None

    def get(self, key: bytes) -> bytes | None:
        """The block's bytes (a copy), or None."""
        buf = bytearray(self.g.chunk_bytes)
        n = self.read(key, buf)
        return None if n is None else bytes(buf[:n])

    # ---- hosts -----------------------------------------------------------------------------------

    def register_host(self) -> int:
        """Claim a line of the host table; writers need one (readers do not)."""
        if not self.writable:
            raise PermissionError("cxl: a read-only mapping cannot write")
        if self.host is not None:
            return self.host
        for attempt in range(2):  # a full table: free the lines of dead hosts, then look once more
            for h in range(self.g.max_hosts):
                off = self.g.host(h)
                _native.invalidate(self.mm, off, LINE)
                if _native.cas64(self.mm, off, 0, h + 1) == 0:
                    struct.pack_into("<QQQ", self.mm, off + 8, self.machine, os.getpid(), int(time.time() * 1000))
                    _native.flush(self.mm, off, LINE)
                    self.host = h
                    self._lock = RegionLock(self.mm, h, self._same_machine, self.lease_ms)
                    return h
            # not a host yet: reclaim under a lock word naming no host line (another machine's view: its lease
            # decides if this process dies holding it)
            nobody = min(self.g.max_hosts, 1022)
            if attempt == 0 and not self.reclaim(lock=RegionLock(self.mm, nobody, self._same_machine, self.lease_ms)):
                break
        raise RuntimeError(f"cxl: all {self.g.max_hosts} host slots of {self.path} are taken by live hosts")

    def heartbeat(self) -> None:
        if self.host is not None:
            _native.store64(self.mm, self.g.host(self.host) + 24, int(time.time() * 1000))
            _native.flush(self.mm, self.g.host(self.host), LINE)

    def _host_record(self, h: int) -> tuple[int, int, int, int]:
        off = self.g.host(h)
        _native.invalidate(self.mm, off, LINE)
        return HOST.unpack_from(self.mm, off)

    def _same_machine(self, h: int) -> bool:
        if not 0 <= h < self.g.max_hosts:
            return False
        claimed, machine, _pid, _beat = self._host_record(h)
        return claimed == h + 1 and machine == self.machine

    def host_is_dead(self, h: int, timeout_ms: int) -> bool:
        claimed, machine, pid, beat = self._host_record(h)
        if claimed != h + 1:
            return False
        if machine == self.machine:
            return not pid_alive(pid)
        return int(time.time() * 1000) - beat > timeout_ms

    def detach_host(self) -> None:
        """Give this host's unused chunks back and free its host line."""
        assert self.host is not None and self._lock is not None
        with self._lock, self._heap_lock:
            for c in self._heap:
                self._set_chunk(c, 0)
            self._heap.clear()
        off = self.g.host(self.host)
        struct.pack_into("<QQQQ", self.mm, off, 0, 0, 0, 0)
        _native.flush(self.mm, off, LINE)
        self.host = None
        self._lock = None

    # ---- writing (registered hosts) ---------------------------------------------------------------

    @property
    def lock(self) -> RegionLock:
        if self._lock is None:
            raise RuntimeError("cxl: register_host() before writing")
        return self._lock

    def put(self, key: bytes, data: Any, checksum: bool = False) -> bool:
        """Store a block; False when the key is already here (or being written). Evicts when the region is full."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"cxl: a key is {KEY_BYTES} bytes, got {len(key)}")
        view = memoryview(data).cast("B")
        if view.nbytes > self.g.chunk_bytes:
            raise ValueError(f"cxl: a {view.nbytes}-byte block exceeds the {self.g.chunk_bytes}-byte chunk")
        slot, chunk = self.reserve(key, view.nbytes)
        if slot is None:
            return False
        _native.nt_store(self.mm, self.g.chunk(chunk), view, 0, view.nbytes)
        self.publish(slot, key, chunk, view.nbytes, xxhash.xxh3_64_intdigest(view) if checksum else 0)
        return True

    def reserve(self, key: bytes, nbytes: int) -> tuple[int | None, int]:
        """An index entry in state WRITING and a chunk for ``key``, or (None, -1) when the key exists.

        The caller fills the chunk (``chunk_view``) and calls ``publish``; until then readers miss."""
        lock = self.lock
        chunk = self._take_chunk()
        with lock:
            slot, existing = self._find_slot(key)
            if existing or slot is None:
                self._give_chunk(chunk)
                if existing:
                    self.counters["exists"] += 1
                    return None, -1
                raise CxlFull(f"cxl: the index of {self.path} has no free entry")
            _native.cxl_publish(self.mm, self.g.entry(slot), meta_word(WRITING, self.host or 0), key,
                                loc_word(chunk, nbytes), 0)
        return slot, chunk

    def chunk_view(self, chunk: int, nbytes: int) -> memoryview:
        off = self.g.chunk(chunk)
        return self.mm[off: off + nbytes]

    def publish(self, slot: int, key: bytes, chunk: int, nbytes: int, check: int = 0) -> None:
        """Make a reserved block readable. Its bytes must already be in memory (nt_store, or flush)."""
        _native.store_fence()
        _native.cxl_publish(self.mm, self.g.entry(slot), meta_word(READY, self.host or 0), key,
                            loc_word(chunk, nbytes), check)
        self.counters["puts"] += 1
        self.counters["put_bytes"] += nbytes

    def abort(self, slot: int, key: bytes) -> None:
        """Drop a reservation that will not be published."""
        with self.lock:
            e = self._entry(slot)
            if meta_state(e[1]) == WRITING and e[2] == key:
                self._remove(slot, loc_chunk(e[3]))

    def delete(self, key: bytes) -> bool:
        with self.lock:
            slot, existing = self._find_slot(key)
            if not existing or slot is None:
                return False
            e = self._entry(slot)
            if meta_state(e[1]) != READY:
                return False
            self._remove(slot, loc_chunk(e[3]))
            self.counters["deletes"] += 1
            return True

    def evict(self, n: int = 1) -> int:
        """Evict up to ``n`` published blocks (clock order over the index); returns how many."""
        with self.lock:
            return len(self._evict_locked(n))

    # ---- internals (callers hold the lock where noted) ----------------------------------------------

    def _entry(self, slot: int) -> tuple[int, int, bytes, int, int]:
        off = self.g.entry(slot)
        while True:
            _native.invalidate(self.mm, off, ENTRY_BYTES)
            e = ENTRY.unpack_from(self.mm, off)
            if not e[0] & 1 and _native.load64(self.mm, off) == e[0]:
                return e
            time.sleep(0)

    def _home(self, key: bytes) -> int:
        """The key's first index slot (keys are uniform hashes; the same rule as the native probe)."""
        return int.from_bytes(key[:8], "little") % self.g.nslots

    def _find_slot(self, key: bytes) -> tuple[int | None, bool]:
        """(slot, True) for the key's live entry, else (first reusable slot on its probe path, False). Locked."""
        nslots = self.g.nslots
        home = self._home(key)
        reusable = None
        for i in range(nslots):
            slot = (home + i) % nslots
            _v, meta, k, _loc, _c = self._entry(slot)
            state = meta_state(meta)
            if state == EMPTY:
                return (reusable if reusable is not None else slot), False
            if state == TOMBSTONE:
                if reusable is None:
                    reusable = slot
            elif k == key:
                return slot, True
        return reusable, False

    def _remove(self, slot: int, chunk: int) -> None:
        """Retire an entry, then free its chunk. Locked.

        Backward-shift deletion (Knuth's algorithm R) keeps the index free of tombstones: later entries of
        the probe cluster that may sit earlier move into the hole. A moved entry is written at its new place
        before the old one is overwritten, so a concurrent reader finds it at one or the other (or misses
        once, which is a miss, never a wrong block). Overwriting an entry bumps its version first, so a reader
        still copying the retired block retries. An unpublished (WRITING) entry is never moved: its writer
        publishes at the slot it reserved, so a hole in front of one stays a tombstone.
        """
        nslots = self.g.nslots
        hole, j, state = slot, slot, EMPTY
        while True:
            j = (j + 1) % nslots
            if j == slot:
                break
            _v, meta, key, loc, check = self._entry(j)
            st = meta_state(meta)
            if st == EMPTY:
                break
            if st == TOMBSTONE:
                continue
            home = self._home(key)
            if (home - hole - 1) % nslots < (j - hole) % nslots:
                continue  # its home lies after the hole: its probe path does not cross the hole
            if st != READY:
                state = TOMBSTONE
                break
            _native.cxl_publish(self.mm, self.g.entry(hole), meta, key, loc, check)
            hole = j
        _native.cxl_publish(self.mm, self.g.entry(hole), meta_word(state, 0), bytes(KEY_BYTES), 0, 0)
        self._set_chunk(chunk, 0)

    def _set_chunk(self, chunk: int, value: int) -> None:
        """Write one chunk-table word. Locked: the line is shared with other chunks' words."""
        off = self.g.chunk_word(chunk)
        _native.invalidate(self.mm, off, 8)
        _native.store64(self.mm, off, value)
        _native.flush(self.mm, off, 8)

    def _take_chunk(self) -> int:
        with self._heap_lock:
            if self._heap:
                return self._heap.pop()
        with self.lock:
            got = self._claim_free(HEAP_REFILL)
            if not got:
                got = self._evict_locked(1)
                for c in got:
                    self._set_chunk(c, (self.host or 0) + 1)
            if not got:
                raise CxlFull(f"cxl: {self.path} is full and every block in it is being written")
        with self._heap_lock:
            self._heap.extend(got[1:])
        return got[0]

    def _give_chunk(self, chunk: int) -> None:
        with self._heap_lock:
            self._heap.append(chunk)

    def _claim_free(self, want: int) -> list[int]:
        """Up to ``want`` free chunks into this host's heap, scanning from the shared hint. Locked."""
        g = self.g
        _native.invalidate(self.mm, OFF_ALLOC_HINT, 8)
        start = _native.load64(self.mm, OFF_ALLOC_HINT) % max(1, g.nchunks)
        got: list[int] = []
        table = np.frombuffer(self._mmap, dtype="<u8", count=g.nchunks, offset=g.chunks_offset)
        for lo, hi in ((start, g.nchunks), (0, start)):
            pos = lo
            while pos < hi and len(got) < want:
                end = min(hi, pos + 512)
                _native.invalidate(self.mm, g.chunk_word(pos), (end - pos) * 8)
                free = np.flatnonzero(table[pos:end] == 0)[: want - len(got)]
                for i in free.tolist():
                    got.append(pos + i)
                    self._set_chunk(pos + i, (self.host or 0) + 1)
                pos = end
            if len(got) >= want:
                break
        del table
        if got:
            _native.store64(self.mm, OFF_ALLOC_HINT, (got[-1] + 1) % g.nchunks)
            _native.flush(self.mm, OFF_ALLOC_HINT, 8)
        return got

    def _evict_locked(self, n: int) -> list[int]:
        """Retire up to ``n`` READY entries from the clock hand on; the chunks they freed. Locked."""
        g = self.g
        _native.invalidate(self.mm, OFF_EVICT_HAND, 8)
        hand = _native.load64(self.mm, OFF_EVICT_HAND) % g.nslots
        freed: list[int] = []
        for i in range(g.nslots):
            slot = (hand + i) % g.nslots
            _v, meta, _k, loc, _c = self._entry(slot)
            if meta_state(meta) == READY:
                chunk = loc_chunk(loc)
                self._remove(slot, chunk)
                freed.append(chunk)
                self.counters["evictions"] += 1
                if len(freed) >= n:
                    hand = slot + 1
                    break
            if i and i % 4096 == 0:
                self.lock.renew()
        _native.store64(self.mm, OFF_EVICT_HAND, hand % g.nslots)
        _native.flush(self.mm, OFF_EVICT_HAND, 8)
        return freed

    # ---- recovery ---------------------------------------------------------------------------------

    def reclaim(self, host_timeout_ms: int = 30000, lock: RegionLock | None = None) -> int:
        """Free what dead hosts held: their unpublished entries and the chunks in their heaps. Returns hosts reaped.
        ``lock``: the region lock to hold (this host's by default)."""
        g = self.g
        lock = lock or self.lock
        with lock:
            dead = [h for h in range(g.max_hosts) if h != self.host and self.host_is_dead(h, host_timeout_ms)]
            if not dead:
                return 0
            dead_ids = set(dead)
            _native.invalidate(self.mm, g.index_offset, g.nslots * ENTRY_BYTES)
            entries = self._index_view.copy()
            states = entries["meta"] & 0xFF
            for slot in np.flatnonzero(states == WRITING).tolist():
                e = self._entry(slot)
                if meta_state(e[1]) == WRITING and meta_host(e[1]) in dead_ids:
                    self._remove(slot, loc_chunk(e[3]))
            lock.renew()
            live = (entries["meta"] & 0xFF == READY) | (entries["meta"] & 0xFF == WRITING)
            used = set((entries["loc"][live] & 0xFFFFFFFF).tolist())
            _native.invalidate(self.mm, g.chunks_offset, g.nchunks * 8)
            table = np.frombuffer(self._mmap, dtype="<u8", count=g.nchunks, offset=g.chunks_offset)
            for h in dead:
                for c in np.flatnonzero(table == h + 1).tolist():
                    if c not in used:
                        self._set_chunk(c, 0)
                off = g.host(h)
                struct.pack_into("<QQQQ", self.mm, off, 0, 0, 0, 0)
                _native.flush(self.mm, off, LINE)
                log.warning("cxl: reclaimed host %d of %s (process gone or heartbeat stale)", h, self.path)
            del table
            self.counters["reaped_hosts"] += len(dead)
            return len(dead)

    # ---- reports ----------------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[int, str, bytes, int, int]]:
        """(slot, state, key, chunk, nbytes) of every used entry: a consistent snapshot per entry."""
        for slot in range(self.g.nslots):
            _v, meta, key, loc, _c = self._entry(slot)
            state = meta_state(meta)
            if state in (READY, WRITING):
                yield slot, "ready" if state == READY else "writing", key, loc_chunk(loc), loc_nbytes(loc)

    def ready_keys(self) -> list[bytes]:
        """The keys of every READY entry, from one snapshot of the index (a writer rebuilding its eviction
        order at start-up; entries may change right after)."""
        g = self.g
        _native.invalidate(self.mm, g.index_offset, g.nslots * ENTRY_BYTES)
        entries = self._index_view.copy()
        return [k.tobytes() for k in entries["key"][(entries["meta"] & 0xFF) == READY]]

    def stats(self) -> dict[str, Any]:
        g = self.g
        _native.invalidate(self.mm, g.index_offset, g.nslots * ENTRY_BYTES)
        states = self._index_view["meta"] & 0xFF
        ready = int((states == READY).sum())
        nbytes = int((self._index_view["loc"][states == READY] >> 32).sum())
        return {
            "path": self.path, "namespace": self.namespace, "chunk_bytes": g.chunk_bytes, "chunks": g.nchunks,
            "index_slots": g.nslots, "blocks": ready, "bytes": nbytes, "capacity": g.nchunks * g.chunk_bytes,
            "writing": int((states == WRITING).sum()), "tombstones": int((states == TOMBSTONE).sum()),
            "host": self.host, "invalidate_on_read": self.invalidate,
            **self.read_counts(),
            "lock_takeovers": self._lock.takeovers if self._lock else 0, **self.counters,
        }


def _read_result(key: bytes, n: int) -> int | None:
    """A native read's answer: the block's length, None when absent, TimeoutError when it kept changing (-2)."""
    if n == -2:
        raise TimeoutError(f"cxl: block {key.hex()[:16]} kept changing during {READ_RETRIES} reads")
    return None if n < 0 else n


def _read_namespace(mm: Any) -> str:
    raw = bytes(memoryview(mm)[OFF_NAMESPACE: OFF_NAMESPACE + NAMESPACE_BYTES])
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _format(mm: mmap.mmap, g: Geometry, namespace: str) -> None:
    """Write a fresh layout: everything zeroed and flushed, then the header, then the formatted word last."""
    name = namespace.encode()
    if len(name) > NAMESPACE_BYTES:
        raise ValueError(f"cxl: namespace name longer than {NAMESPACE_BYTES} bytes")
    view = memoryview(mm)
    _native.store64(view, OFF_FORMATTED, 0)
    _native.flush(view, 0, 8 * LINE)
    meta_end = g.data_offset
    zeros = bytes(min(meta_end, 1 << 20))
    for off in range(0, meta_end, len(zeros)):
        n = min(len(zeros), meta_end - off)
        _native.nt_store(view, off, zeros, 0, n)
    # Slot versions only grow while a region lives; starting them at a random even base makes a (slot,
    # version) pair name one entry across formats too, so a process still mapping the file from before
    # (and remembering the versions it read blocks at) cannot take a new block for one it has read.
    versions = np.frombuffer(mm, dtype=ENTRY_DTYPE, count=g.nslots, offset=g.index_offset)["version"]
    versions[:] = secrets.randbits(60) << 1 | 1 << 61  # even, under 2**62: room for 2**62 more publishes
    del versions
    _native.flush(view, g.index_offset, g.nslots * ENTRY_BYTES)
    header = g.pack()
    view[: len(header)] = header
    view[OFF_NAMESPACE: OFF_NAMESPACE + len(name)] = name
    _native.flush(view, 0, 8 * LINE)
    _native.store64(view, OFF_FORMATTED, FORMATTED)
    _native.flush(view, OFF_FORMATTED, 8)
    view.release()
