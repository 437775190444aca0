"""Slot allocator shared by the memory tiers.

A tier's capacity is a fixed number of equal segments. A segment is handed to
one namespace and one size class the first time that pair needs room, then
carved into equal slots. Segments that become empty are kept (their pages
stay warm) until another pair needs capacity; then they are destroyed and a
fresh one is created, so memory is never handed from one tenant to another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kvrack.protocol import TierId
from kvrack.tiers.base import Segment

SMALL_ALIGN = 64  # cache line: blocks below one page
PAGE_ALIGN = 4096  # page: O_DIRECT, DMA and huge blocks


def size_class(nbytes: int, min_align: int = SMALL_ALIGN) -> int:
    """Slot size for a block: rounded to a cache line below 4 KiB, to a page above.

    ``min_align=PAGE_ALIGN`` rounds every block to pages (O_DIRECT media).
    """
    if nbytes <= 0:
        raise ValueError("block size must be > 0")
    align = max(min_align, SMALL_ALIGN if nbytes < PAGE_ALIGN else PAGE_ALIGN)
    return -(-nbytes // align) * align


class SegmentBacking(Protocol):
    """Creates and destroys the memory behind segments."""

    kind: str

    def create(self, seg_id: int, size: int) -> Any: ...

    def destroy(self, handle: Any) -> None: ...


class SlotAllocator:
    """Placement for one tier: segments × size classes × namespaces. O(1) per call."""

    def __init__(self, tier: TierId, capacity: int, segment_bytes: int, backing: SegmentBacking,
                 on_retire: Callable[[Segment], None] | None = None, min_align: int = SMALL_ALIGN) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be > 0")
        self.tier = tier
        self.min_align = min_align
        self.segment_bytes = segment_bytes
        self.max_segments = capacity // segment_bytes
        self.capacity = self.max_segments * segment_bytes
        self.backing = backing
        self.on_retire = on_retire
        self._next_id = (int(tier) << 40) + 1  # segment ids are unique across tiers and never reused
        self._segments: dict[int, Segment] = {}
        self._fresh: list[Segment] = []  # created, never handed out: safe for any namespace
        self._open: dict[tuple[str, int], dict[Segment, None]] = {}  # segments with a free slot
        self._empty: dict[Segment, None] = {}  # assigned, no live slot
        self.retired = 0
        self.used_bytes = 0  # bytes of slots handed out (size classes, so at least the blocks' bytes)

    # ---------------------------------------------------------------- setup
    def prefill(self) -> None:
        """Create every segment now, so no request waits for memory to be set up."""
        while len(self._segments) < self.max_segments:
            self._fresh.append(self._create())

    def _create(self) -> Segment:
        seg_id = self._next_id
        self._next_id += 1
        seg = Segment(seg_id, self.tier, self.segment_bytes, self.backing.create(seg_id, self.segment_bytes))
        self._segments[seg_id] = seg
        return seg

    # ----------------------------------------------------------- placement
    def allocate(self, owner: str, nbytes: int) -> tuple[Segment, int] | None:
        """A slot for ``owner``, or None when only eviction can make room."""
        cls = size_class(nbytes, self.min_align)
        if cls > self.segment_bytes:
            raise ValueError(f"block of {nbytes} bytes exceeds the segment size {self.segment_bytes}")
        pool = self._open.get((owner, cls))
        seg = next(iter(pool)) if pool else self._new_segment(owner, cls)
        if seg is None:
            return None
        slot = seg.take_slot()
        assert slot is not None
        self.used_bytes += seg.slot_size
        self._empty.pop(seg, None)
        if seg.full:
            self._open[(owner, cls)].pop(seg, None)
        return seg, slot

    def _new_segment(self, owner: str, cls: int) -> Segment | None:
        if self._fresh:
            seg = self._fresh.pop()
        elif len(self._segments) < self.max_segments:
            seg = self._create()
        elif self._empty:
            self._retire(next(iter(self._empty)))
            seg = self._create()
        else:
            return None
        seg.assign(owner, cls)
        self._open.setdefault((owner, cls), {})[seg] = None
        return seg

    def free(self, seg: Segment, slot: int) -> None:
        """Give a slot back; an emptied segment stays assigned until capacity is needed."""
        was_full = seg.full
        seg.give_slot(slot)
        self.used_bytes -= seg.slot_size
        if was_full:
            self._open.setdefault((seg.owner or "", seg.slot_size), {})[seg] = None
        if seg.live == 0:
            self._empty[seg] = None

    def _retire(self, seg: Segment) -> None:
        self._empty.pop(seg, None)
        pool = self._open.get((seg.owner, seg.slot_size))  # type: ignore[arg-type]
        if pool is not None:
            pool.pop(seg, None)
        del self._segments[seg.id]
        self.retired += 1
        if self.on_retire is not None:
            self.on_retire(seg)
        self.backing.destroy(seg.handle)

    def has_room_for(self, owner: str, nbytes: int) -> bool:
        """Whether ``allocate`` would succeed without eviction."""
        return bool(self._open.get((owner, size_class(nbytes, self.min_align)))) or bool(self._fresh) \
            or len(self._segments) < self.max_segments or bool(self._empty)

    def rebuild(self, placements: Iterable[tuple[str, int, Any, int]]) -> dict[Any, Segment]:
        """Recreate state after a restart from (owner, slot size, segment handle, slot) of live blocks.

        Returns the segment of each handle. One pass plus one per segment, so a large recovered
        index costs O(blocks), not O(blocks x slots).
        """
        by_handle: dict[Any, Segment] = {}
        used: dict[Segment, set[int]] = {}
        claim = self.backing.claim  # type: ignore[attr-defined]  # only backings that outlive the daemon
        for owner, slot_size, handle, slot in placements:
            seg = by_handle.get(handle)
            if seg is None:
                claim(handle)
                seg_id = self._next_id
                self._next_id += 1
                seg = Segment(seg_id, self.tier, self.segment_bytes, handle)
                seg.assign(owner, slot_size)
                self._segments[seg_id] = seg
                by_handle[handle] = seg
                used[seg] = set()
            elif seg.owner != owner or seg.slot_size != slot_size:
                raise ValueError(f"recovered blocks disagree about segment {handle}: "
                                 f"{seg.owner}/{seg.slot_size} vs {owner}/{slot_size}")
            if slot in used[seg] or slot >= seg.nslots:
                raise ValueError(f"recovered block claims slot {slot} of segment {handle} twice or out of range")
            used[seg].add(slot)
        for seg, slots in used.items():
            top = max(slots) + 1
            seg.next_unused = top
            seg.free = [i for i in range(top) if i not in slots]
            seg.live = len(slots)
            self.used_bytes += len(slots) * seg.slot_size
            if not seg.full:
                self._open.setdefault((seg.owner or "", seg.slot_size), {})[seg] = None
        return by_handle

    # -------------------------------------------------------------- queries
    def segment(self, seg_id: int) -> Segment | None:
        return self._segments.get(seg_id)

    def segments(self) -> list[Segment]:
        """Every live segment (a snapshot)."""
        return list(self._segments.values())

    def segments_of(self, owner: str) -> list[Segment]:
        return [s for s in self._segments.values() if s.owner == owner]

    def stats(self) -> dict[str, Any]:
        assigned = [s for s in self._segments.values() if s.owner is not None]
        holding = [s for s in assigned if s.live]  # an assigned segment with no live slot is free room, not waste
        slot_bytes = sum(s.live * s.slot_size for s in holding)
        return {
            "capacity_bytes": self.capacity,
            "segment_bytes": self.segment_bytes,
            "segments_total": self.max_segments,
            "segments_assigned": len(assigned),
            "segments_empty": len(self._empty),
            "segments_retired": self.retired,
            "slot_bytes_used": slot_bytes,
            # share of the bytes of segments holding blocks that no live slot uses
            "fragmentation": round(1 - slot_bytes / (len(holding) * self.segment_bytes), 4) if holding else 0.0,
        }

    def close(self) -> None:
        for seg in list(self._segments.values()):
            self.backing.destroy(seg.handle)
        self._segments.clear()
        self._fresh.clear()
        self._open.clear()
        self._empty.clear()
