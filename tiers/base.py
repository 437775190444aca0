"""The ``Tier`` protocol every storage medium implements, its segment record, and sizing a segment file."""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any, Protocol, runtime_checkable

from kvrack.protocol import TierId


class Segment:
    """One mappable region of a tier, owned by one namespace once handed out.

    Slots are carved in equal sizes (one size class per segment) with a bump
    pointer plus a free list, so an empty segment costs no per-slot memory.
    """

    __slots__ = ("id", "tier", "size", "handle", "owner", "slot_size", "nslots", "next_unused", "free", "live")

    def __init__(self, seg_id: int, tier: TierId, size: int, handle: Any) -> None:
        self.id = seg_id
        self.tier = tier
        self.size = size
        self.handle = handle  # medium-specific: an fd for memfd segments, a buffer for heap ones
        self.owner: str | None = None
        self.slot_size = 0
        self.nslots = 0
        self.next_unused = 0
        self.free: list[int] = []
        self.live = 0

    def assign(self, owner: str, slot_size: int) -> None:
        self.owner = owner
        self.slot_size = slot_size
        self.nslots = self.size // slot_size
        self.next_unused = 0
        self.free = []
        self.live = 0

    def take_slot(self) -> int | None:
        if self.free:
            slot = self.free.pop()
        elif self.next_unused < self.nslots:
            slot = self.next_unused
            self.next_unused += 1
        else:
            return None
        self.live += 1
        return slot

    def give_slot(self, slot: int) -> None:
        self.free.append(slot)
        self.live -= 1

    @property
    def full(self) -> bool:
        return not self.free and self.next_unused >= self.nslots

    def __repr__(self) -> str:
        return f"Segment(id={self.id}, tier={self.tier.name}, owner={self.owner!r}, slot={self.slot_size}, live={self.live})"


@runtime_checkable
class Tier(Protocol):
    """What the daemon needs of a storage medium. Tiers know nothing of sessions or sockets."""

    tier_id: TierId
    name: str
    capacity: int
    max_block_bytes: int

    def allocate(self, owner: str, nbytes: int) -> tuple[Segment, int] | None:
        """A free slot of at least ``nbytes`` for ``owner``, or None when the tier must evict first."""

    def free(self, segment: Segment, slot: int) -> None:
        """Return a slot; its bytes are garbage from now on."""

    def segment(self, seg_id: int) -> Segment | None:
        """The live segment with this id."""

    def segments_of(self, owner: str) -> list[Segment]:
        """Segments currently owned by a namespace."""

    def stats(self) -> dict[str, Any]:
        """Capacity, allocation and fragmentation figures."""

    def close(self) -> None:
        """Release every segment."""


def huge_page_bytes(fd: int) -> int:
    """The page size of the file's medium where it is larger than the CPU's (hugetlbfs, a memfd of huge pages:
    such files are whole pages long and take no write()), else 0."""
    page = os.fstatvfs(fd).f_bsize
    return page if page > mmap.PAGESIZE else 0


def size_segment_fd(fd: int, size: int, prefault: bool, medium: str, round_up: bool = False) -> int:
    """Give a new segment fd its size, with every page allocated now when ``prefault`` (shmem), so the first
    store into a slot takes no page fault; on failure the fd is closed and the error names ``medium``.

    A file on hugetlbfs (or a memfd of huge pages) can only be a whole number of huge pages long. With
    ``round_up`` such a file gets the next whole number; without it, a size that is not one is refused with
    the page size named, rather than the kernel's bare EINVAL. Returns the size the file got."""
    page = 0
    try:
        page = huge_page_bytes(fd)
        if page and size % page:
            if not round_up:
                raise OSError(errno.EINVAL, f"not a whole number of its {page >> 10} KiB huge pages")
            size += page - size % page
        os.ftruncate(fd, size)
        if prefault:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        hint = " (huge pages: is vm.nr_hugepages large enough?)" if exc.errno == errno.ENOSPC and page else ""
        raise OSError(exc.errno, f"cannot back a {size}-byte segment with {medium}: {exc.strerror}{hint}") from None
    return size
