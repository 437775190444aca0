"""DRAM tier: shared-memory segments (memfd) that clients map through fds passed over SCM_RIGHTS."""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from kvrack.daemon.protocol import TierId
from kvrack.tiers.allocator import SlotAllocator
from kvrack.tiers.base import Segment

log = logging.getLogger("kvrack.tiers.dram")
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)


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
        try:
            os.ftruncate(fd, size)
            if self.prefault:
                # allocates every page now (shmem), so the first store into a slot takes no page fault
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"cannot back a {size}-byte segment with memory: {exc.strerror}") from None
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
        if prefill:
            self.allocator.prefill()

    def view(self, segment: Segment, slot: int, nbytes: int) -> memoryview:
        """The daemon's window on a slot, for moving blocks between tiers (clients map their own)."""
        m = self._maps.get(segment.id)
        if m is None:
            handle = segment.handle
            m = mmap.mmap(handle, segment.size, mmap.MAP_SHARED) if isinstance(handle, int) else handle
            self._maps[segment.id] = m
        off = slot * segment.slot_size
        return memoryview(m)[off: off + nbytes]

    def _unmap(self, segment: Segment) -> None:
        self._close_map(self._maps.pop(segment.id, None))

    @staticmethod
    def _close_map(m: Any) -> None:
        if isinstance(m, mmap.mmap):
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass

    def allocate(self, owner: str, nbytes: int) -> tuple[Segment, int] | None:
        return self.allocator.allocate(owner, nbytes)

    def free(self, segment: Segment, slot: int) -> None:
        self.allocator.free(segment, slot)

    def segment(self, seg_id: int) -> Segment | None:
        return self.allocator.segment(seg_id)

    def segments_of(self, owner: str) -> list[Segment]:
        return self.allocator.segments_of(owner)

    def stats(self) -> dict[str, Any]:
        return {"tier": self.name, "backing": self.backing.kind, **self.allocator.stats()}

    def close(self) -> None:
        for m in self._maps.values():
            self._close_map(m)
        self._maps.clear()
        self.allocator.close()


def open_dram_tier(capacity: int, segment_bytes: int, hugepages: bool = False, prefault: bool = True) -> MemoryTier:
    """The DRAM tier as the daemon runs it: memfd segments, all created at start."""
    tier = MemoryTier(TierId.DRAM, capacity, segment_bytes, MemfdBacking(hugepages, prefault))
    log.info("dram tier: %d segments of %d MiB (%s%s%s)", tier.allocator.max_segments, segment_bytes >> 20,
             "memfd", ", hugepages" if hugepages else "", ", prefaulted" if prefault else "")
    return tier
