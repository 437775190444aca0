"""DRAM tier: shared-memory segments (memfd) that clients map through fds passed over SCM_RIGHTS."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvrack.protocol import TierId
from kvrack.tiers.allocator import SlotAllocator
from kvrack.tiers.base import Segment, size_segment_fd
from kvrack.tiers.dram_state import ShmDirBacking, saved_blocks, take_state

log = logging.getLogger("kvrack.tiers.dram")
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class MemfdBacking:
    """Each segment is an anonymous memfd: no name in a file system, reachable only by fd."""

    kind = "memfd"

    def __init__(self, hugepages: bool = False, prefault: bool = True, label: str = "kvrack-dram") -> None:
        self.hugepages = hugepages
        self.prefault = prefault
        self.label = label

    def create(self, seg_id: int, size: int) -> int:
        flags = os.MFD_CLOEXEC | (MFD_HUGETLB if self.hugepages else 0)
        try:
            fd = os.memfd_create(f"{self.label}-{seg_id:x}", flags)
        except OSError as exc:
            hint = " (is vm.nr_hugepages large enough?)" if self.hugepages else ""
            raise OSError(exc.errno, f"memfd_create failed for a {size}-byte segment: {exc.strerror}{hint}") from None
        size_segment_fd(fd, size, self.prefault, "memory")
        return fd

    def destroy(self, handle: Any) -> None:
        os.close(handle)


class HeapBacking:
    """Segments in the daemon's own heap: for unit tests and in-process use (no fds to hand out)."""

    kind = "heap"

    def create(self, seg_id: int, size: int) -> bytearray:
        return bytearray(size)

    def destroy(self, handle: Any) -> None:
        pass


class MemoryTier:
    """A memory tier: a slot allocator over segments from one backing."""

    def __init__(self, tier_id: TierId, capacity: int, segment_bytes: int, backing: Any, prefill: bool = True) -> None:
        self.tier_id = tier_id
        self.name = tier_id.name.lower()
        self.backing = backing
        self.allocator = SlotAllocator(tier_id, capacity, segment_bytes, backing, on_retire=self._unmap)
        self.capacity = self.allocator.capacity
        self.max_block_bytes = segment_bytes
        self._maps: dict[int, Any] = {}  # segment id -> the daemon's own mapping, made on first use
        # called with a segment about to be destroyed (e.g. to drop a NIXL registration of it)
        self.retire_hooks: list[Callable[[Segment], None]] = []
        self.paged_in = True  # False while warm_in_background runs
        if prefill:
            self.allocator.prefill()

    def view(self, segment: Segment, slot: int, nbytes: int) -> memoryview:
        """The daemon's window on a slot, for moving blocks between tiers (clients map their own)."""
        return self.window(segment, slot * segment.slot_size, nbytes)

    def window(self, segment: Segment, offset: int, nbytes: int) -> memoryview:
        """The daemon's window on bytes of a segment, at an offset a descriptor gives."""
        m = self._maps.get(segment.id)
        if m is None:
            handle = segment.handle
            # MAP_POPULATE: page-table entries now, not one fault per 4 KiB page on the data path
            m = mmap.mmap(handle, segment.size, mmap.MAP_SHARED | _MAP_POPULATE) if isinstance(handle, int) else handle
            self._maps[segment.id] = m
        return memoryview(m)[offset: offset + nbytes]

    def _unmap(self, segment: Segment) -> None:
        for hook in self.retire_hooks:
            hook(segment)
        self._close_map(self._maps.pop(segment.id, None))

    @staticmethod
    def _close_map(m: Any) -> None:
        if isinstance(m, mmap.mmap):
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass

    def warm_in_background(self) -> threading.Thread | None:
        """Touch every page of the memfd segments on a thread, while the daemon already serves.

        fallocate reserves shmem pages but leaves each to be zeroed at its first touch (several µs a
        page here, ~4 s for 2 GiB); done here, that cost stays off the first put into each slot.
        Touching a page a client is writing at the same moment is harmless: zeroing happens once,
        under the page's lock, before either access proceeds."""
        if not (isinstance(self.backing, MemfdBacking) and self.backing.prefault and not self.backing.hugepages):
            return None
        self.paged_in = False
        targets = [(seg.handle, seg.size) for seg in self.allocator.segments()]

        def warm() -> None:
            t0 = time.perf_counter()
            for fd, size in targets:
                try:
                    mmap.mmap(fd, size, mmap.MAP_SHARED | _MAP_POPULATE).close()
                except (OSError, ValueError):  # retired (closed) meanwhile
                    pass
            log.info("dram: %d segment(s) paged in, in the background, in %.2fs", len(targets),
                     time.perf_counter() - t0)
            self.paged_in = True

        thread = threading.Thread(target=warm, name="kvrack-dram-warm", daemon=True)
        thread.start()
        return thread

    def allocate(self, owner: str, nbytes: int) -> tuple[Segment, int] | None:
        return self.allocator.allocate(owner, nbytes)

    def free(self, segment: Segment, slot: int) -> None:
        self.allocator.free(segment, slot)

    def segment(self, seg_id: int) -> Segment | None:
        return self.allocator.segment(seg_id)

    def segments_of(self, owner: str) -> list[Segment]:
        return self.allocator.segments_of(owner)

    def stats(self) -> dict[str, Any]:
        return {"tier": self.name, "backing": self.backing.kind, "paged_in": self.paged_in, **self.allocator.stats()}

    def close(self) -> None:
        for m in self._maps.values():
            self._close_map(m)
        self._maps.clear()
        self.allocator.close()
        close_lock = getattr(self.backing, "close_lock", None)
        if close_lock is not None:
            close_lock()


@dataclass
class DramAdoption:
    """What a start found of the DRAM tier's last life: blocks to index again, or why it starts cold."""

    blocks: list[tuple[str, bytes, bytes | None, Segment, int, int]] = field(default_factory=list)
    cold_reason: str = ""
    removed_files: int = 0
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(b[5] for b in self.blocks)


def open_dram_tier(capacity: int, segment_bytes: int, hugepages: bool = False, prefault: bool = True,
                   shm_dir: str = "") -> tuple[MemoryTier, DramAdoption]:
    """The DRAM tier as the daemon runs it, every segment created at start.

    Anonymous memfds by default (always cold); with ``shm_dir``, named segment files
    whose blocks are re-adopted after a clean shutdown.
    """
    if shm_dir:
        tier, adoption = _open_shm_dir_tier(capacity, segment_bytes, prefault, shm_dir)
    else:
        tier = MemoryTier(TierId.DRAM, capacity, segment_bytes, MemfdBacking(hugepages, prefault))
        adoption = DramAdoption(cold_reason="anonymous memfd segments (dram.shm_dir is empty)")
    log.info("dram tier: %d segments of %d MiB (%s%s%s)", tier.allocator.max_segments, segment_bytes >> 20,
             f"files in {shm_dir}" if shm_dir else "memfd", ", hugepages" if hugepages and not shm_dir else "",
             ", prefaulted" if prefault else "")
    return tier, adoption


def _open_shm_dir_tier(capacity: int, segment_bytes: int, prefault: bool, shm_dir: str) -> tuple[MemoryTier, DramAdoption]:
    t0 = time.perf_counter()
    backing = ShmDirBacking(shm_dir, prefault)
    adoption = DramAdoption()
    tier = MemoryTier(TierId.DRAM, capacity, segment_bytes, backing, prefill=False)
    state, adoption.cold_reason = take_state(backing, segment_bytes, tier.capacity)
    if state is not None:
        fds: dict[str, int] = {}
        try:
            for rec in state.segments:
                fds[rec.file] = backing.open_existing(rec.file, segment_bytes)
            saved = list(saved_blocks(state))
            by_handle = tier.allocator.rebuild((b.owner, b.slot_size, fds[b.file], b.slot) for b in saved)
            adoption.blocks = [(b.namespace, b.key, b.parent, by_handle[fds[b.file]], b.slot, b.nbytes) for b in saved]
        except (OSError, ValueError) as exc:
            for fd in fds.values():
                backing.forget(fd)
            tier = MemoryTier(TierId.DRAM, capacity, segment_bytes, backing, prefill=False)
            adoption.blocks = []
            adoption.cold_reason = f"segments not re-adoptable: {exc}"
    adoption.removed_files = backing.remove_stale()
    tier.allocator.prefill()
    adoption.seconds = time.perf_counter() - t0
    return tier, adoption
