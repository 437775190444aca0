"""The HBM tier: per-namespace arenas of GPU memory, exported to same-host clients by CUDA IPC handles.

A namespace's arena is allocated once with ``cudaMalloc`` (through cupy's
runtime bindings, never its memory pool: an IPC handle names a whole
allocation) in segments of ``segment_bytes``, and carved into slots by the
same ``SlotAllocator`` as the DRAM tier. A client that opens a segment's
handle copies device to device, with no host round trip.

An imported IPC mapping stays valid in the client until the client closes
it, and freeing the allocation first is undefined behaviour. So HBM segments
are never freed or handed to another namespace while the daemon runs: each
namespace has its own allocator over its own share of the capacity, all
segments are allocated at start-up (``hello`` lists every handle, and ids
never change), and an empty segment wanted by another block size is
re-carved in place. Everything is freed at close.

The CUDA runtime, the copier and the client's side of the IPC handles are in ``kvrack.tiers.hbm_ipc``.
"""

from __future__ import annotations

from typing import Any

from kvrack.protocol import TierId
from kvrack.tiers.allocator import PAGE_ALIGN, SlotAllocator
from kvrack.tiers.base import Segment
from kvrack.tiers.hbm_ipc import Copier, cuda_runtime


class DeviceBacking:
    """Segments of device memory on one GPU: one ``cudaMalloc`` and one IPC handle each."""

    kind = "hbm"

    def __init__(self, device: int) -> None:
        self.device = device
        self.rt = cuda_runtime()

    def create(self, seg_id: int, size: int) -> tuple[int, bytes]:
        """(device pointer, IPC handle) of a segment's memory."""
        self.rt.setDevice(self.device)
        ptr = self.rt.malloc(size)
        return ptr, bytes(self.rt.ipcGetMemHandle(ptr))

    def destroy(self, handle: tuple[int, bytes]) -> None:
        self.rt.setDevice(self.device)
        self.rt.free(handle[0])


class ArenaAllocator(SlotAllocator):
    """A ``SlotAllocator`` that never frees a segment while it runs: an empty segment needed by another
    size class is re-carved in place (same id, same memory, same IPC handle), which is safe because an
    arena belongs to one namespace."""

    def _new_segment(self, owner: str, cls: int) -> Segment | None:
        if self._fresh or len(self._segments) < self.max_segments or not self._empty:
            return super()._new_segment(owner, cls)
        seg = next(iter(self._empty))
        del self._empty[seg]
        pool = self._open.get((seg.owner, seg.slot_size))  # type: ignore[arg-type]
        if pool is not None:
            pool.pop(seg, None)
        seg.assign(owner, cls)
        self._open.setdefault((owner, cls), {})[seg] = None
        return seg


class HbmArena:
    """One namespace's HBM: slots in segments of device memory, and copies between host and device.

    Copies run on the caller's thread, on that thread's stream; the daemon calls them from its HBM worker.
    """

    def __init__(self, namespace: str, device: int, capacity: int, segment_bytes: int) -> None:
        self.namespace = namespace
        self.device = device
        self.backing = DeviceBacking(device)
        self.allocator = ArenaAllocator(TierId.HBM, capacity, segment_bytes, self.backing, min_align=PAGE_ALIGN)
        self.allocator.prefill()  # every handle exists from start-up: hello lists them all

    def allocate(self, nbytes: int) -> tuple[Segment, int] | None:
        return self.allocator.allocate(self.namespace, nbytes)

    def free(self, seg: Segment, slot: int) -> None:
        self.allocator.free(seg, slot)

    def address(self, seg: Segment, slot: int) -> int:
        return int(seg.handle[0]) + slot * seg.slot_size

    def segments(self) -> list[tuple[int, int, bytes]]:
        """(segment id, size, IPC handle) of every segment, for ``hello``."""
        return [(s.id, s.size, s.handle[1]) for s in self.allocator.segments()]

    def upload(self, seg: Segment, slot: int, host_addr: int, nbytes: int) -> None:
        """Host memory (a DRAM slot) into an HBM slot; returns when the bytes are on the device."""
        copier = Copier(self.device)
        copier.host_to_device(self.address(seg, slot), host_addr, nbytes)
        copier.wait()

    def stats(self) -> dict[str, Any]:
        return {**self.allocator.stats(), "used_bytes": self.allocator.used_bytes}

    def close(self) -> None:
        self.allocator.close()
