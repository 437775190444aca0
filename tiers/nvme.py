"""NVMe / NVMe-oF tier: blocks in preallocated files or block devices, indexed in LMDB, restarting warm.

Placement reuses the slot allocator of the memory tiers: each backing file or
device is cut into regions (``region_bytes``), a region is a segment, and its
slots are page-aligned so that every read and write is O_DIRECT. Writes are
durable before they are indexed; reads verify an xxh3-64 checksum and treat a
mismatch as a miss (and count it), never as data.

xxh3-64 rather than blake3: the checksum guards against torn writes, bit rot
and files changed behind the daemon's back, not against an adversary (clients
never write the media directly), and xxh3 runs at memory bandwidth where
blake3 from Python costs a large share of a core per GB/s of reads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xxhash

from kvrack.protocol import TierId
from kvrack.sizes import parse_size
from kvrack.tiers.allocator import PAGE_ALIGN, SlotAllocator
from kvrack.tiers.base import Segment
from kvrack.tiers.blockio import ALIGN, BlockFile, DirectFile, FaultyFile, FileFaultPlan, align_up, aligned_buffer
from kvrack.tiers.gds import word_checksum
from kvrack.tiers.nvme_index import INDEX_VERSION, Geometry, NvmeIndex, Record

log = logging.getLogger("kvrack.tiers.nvme")


class ChecksumError(OSError):
    """Bytes read back do not match the checksum written with them."""


@dataclasses.dataclass(frozen=True)
class BackingPath:
    path: str
    capacity: int  # bytes; for a block device 0 means "the whole device"


class FileRegions:
    """Segment backing: fixed-size regions of the tier's files, handed out and taken back."""

    kind = "file"

    def __init__(self, files: Sequence[BlockFile], region_bytes: int) -> None:
        self.free: list[tuple[int, int]] = []
        for i, f in enumerate(files):
            for off in range(0, f.capacity - region_bytes + 1, region_bytes):
                self.free.append((i, off))
        self.free.reverse()  # hand out from the start of the first file
        self.total = len(self.free)

    def create(self, seg_id: int, size: int) -> tuple[int, int]:
        if not self.free:
            raise RuntimeError("no free region")  # the allocator never asks beyond its capacity
        return self.free.pop()

    def destroy(self, handle: Any) -> None:
        self.free.append(handle)

    def claim(self, handle: tuple[int, int]) -> None:
        """A recovered region in use: take it off the free list."""
        self.free.remove(handle)


@dataclasses.dataclass
class Recovery:
    blocks: int
    bytes: int
    seconds: float
    dropped: int  # index records that no longer fit the files


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class NvmeTier:
    """The NVMe tier. Thread-safe: the daemon calls it from a pool of I/O threads."""

    tier_id = TierId.NVME
    name = "nvme"

    def __init__(self, paths: Sequence[BackingPath], index_dir: str, region_bytes: int = 64 << 20,
                 io_threads: int = 4, open_file: Callable[[str, int], BlockFile] = DirectFile,
                 map_size: int = 1 << 36) -> None:
        if not paths:
            raise ValueError("the NVMe tier needs at least one path")
        if region_bytes % ALIGN:
            raise ValueError(f"region_bytes must be a multiple of {ALIGN}")
        self.paths = list(paths)
        self.files: list[BlockFile] = []
        try:
            for p in self.paths:
                self.files.append(open_file(p.path, p.capacity))
            self.index = NvmeIndex(index_dir, map_size)
        except BaseException:
            self.close()
            raise
        self.region_bytes = region_bytes
        self.regions = FileRegions(self.files, region_bytes)
        if not self.regions.total:
            self.close()
            raise ValueError(f"the NVMe tier's files ({', '.join(p.path for p in self.paths)}) do not hold one "
                             f"{region_bytes}-byte region; give them more space or lower nvme.region_bytes")
        self.allocator = SlotAllocator(TierId.NVME, self.regions.total * region_bytes, region_bytes, self.regions,
                                       min_align=PAGE_ALIGN)
        self.capacity = self.allocator.capacity
        self.max_block_bytes = region_bytes
        self.lock = threading.Lock()  # allocator state; the index and files have their own safety
        self.io_threads = max(1, io_threads)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvrack-nvme")
        self.degraded: str | None = None
        self.errors = {"write": 0, "read": 0, "sync": 0, "checksum": 0}
        self.bytes_written = 0
        self.bytes_read = 0
        self.device_checksums = False  # set by a GdsReader: writes also record gds.word_checksum

    # ------------------------------------------------------------- recovery
    def recover(self) -> tuple[Recovery, list[tuple[str, bytes, Segment, int, Record]]]:
        """Rebuild placement from the index. Returns the report and every live block."""
        t0 = time.perf_counter()
        geometry = Geometry(INDEX_VERSION, [p.path for p in self.paths], [f.capacity for f in self.files],
                            self.region_bytes)
        self.index.check_geometry(geometry)
        live: list[tuple[str, bytes, Record]] = []
        dropped: list[tuple[str, bytes]] = []
        for ns, key, rec in self.index.items():
            fits = rec.file < len(self.files) and rec.offset + rec.slot_size <= self.files[rec.file].capacity \
                and rec.region % self.region_bytes == 0 and rec.region <= rec.offset < rec.region + self.region_bytes
            if fits:
                live.append((ns, key, rec))
            else:
                dropped.append((ns, key))
        if dropped:
            log.warning("nvme: %d index record(s) point outside the configured files; dropping them", len(dropped))
        # two records naming one slot (an index delete that failed before its slot was rewritten):
        # the newer one names the bytes that are there; the older one can only fail its checksum
        by_slot: dict[tuple[int, int], tuple[str, bytes, Record]] = {}
        for item in live:
            where = (item[2].file, item[2].offset)
            other = by_slot.get(where)
            if other is None or other[2].created < item[2].created:
                by_slot[where] = item
        if len(by_slot) < len(live):
            log.warning("nvme: %d index record(s) name a slot a newer record also names; dropping the older",
                        len(live) - len(by_slot))
            dropped += [(item[0], item[1]) for item in live if by_slot[(item[2].file, item[2].offset)] is not item]
            live = list(by_slot.values())
        if dropped:
            self.index.delete_many(dropped)
        with self.lock:
            segs = self.allocator.rebuild(
                (ns, rec.slot_size, (rec.file, rec.region), (rec.offset - rec.region) // rec.slot_size)
                for ns, _key, rec in live)
        blocks = [(ns, key, segs[(rec.file, rec.region)], (rec.offset - rec.region) // rec.slot_size, rec)
                  for ns, key, rec in live]
        report = Recovery(len(blocks), sum(r.length for *_, r in blocks), time.perf_counter() - t0, len(dropped))
        return report, blocks

    # ------------------------------------------------------------ placement
    def allocate(self, owner: str, nbytes: int) -> tuple[Segment, int] | None:
        with self.lock:
            return self.allocator.allocate(owner, nbytes)

    def free(self, segment: Segment, slot: int) -> None:
        with self.lock:
            self.allocator.free(segment, slot)

    def segment(self, seg_id: int) -> Segment | None:
        return self.allocator.segment(seg_id)

    def segments_of(self, owner: str) -> list[Segment]:
        return self.allocator.segments_of(owner)

    def location(self, seg: Segment, slot: int) -> tuple[int, int]:
        file_idx, region = seg.handle
        return file_idx, region + slot * seg.slot_size

    # ------------------------------------------------------------------ I/O
    def write(self, items: Sequence[tuple[str, bytes, Segment, int, memoryview]], layout: bytes = b""
              ) -> list[OSError | None]:
        """Write blocks to their slots, make them durable, then index them. Per-item errors.

        A block is indexed only if its data write and the fdatasync of its file succeeded.
        """
        def one(item: tuple[str, bytes, Segment, int, memoryview]) -> Record:
            ns, key, seg, slot, data = item
            file_idx, offset = self.location(seg, slot)
            length = len(data)
            span = align_up(length)
            if span > seg.slot_size:
                raise ValueError(f"block of {length} bytes does not fit a {seg.slot_size}-byte slot")
            checksum = xxhash.xxh3_64_intdigest(data)
            if length == span and _address(data) % ALIGN == 0:
                self.files[file_idx].pwrite(data, offset)  # straight from the caller's pages
            else:
                bounce = aligned_buffer(span)  # freed with its last view, even when the write raised
                bounce[:length] = data
                self.files[file_idx].pwrite(memoryview(bounce)[:span], offset)
            dev = word_checksum(data) if self.device_checksums else 0
            return Record(file_idx, offset, length, seg.slot_size, seg.handle[1], checksum, time.time(), layout, dev)

        results: list[OSError | None] = [None] * len(items)
        records: list[tuple[int, tuple[str, bytes, Record]]] = []
        for i, outcome in enumerate(self._map_items(one, items, (OSError,))):
            if isinstance(outcome, OSError):
                results[i] = outcome
                self._fail("write", outcome)
            else:
                records.append((i, (items[i][0], items[i][1], outcome)))
        synced: dict[int, OSError | None] = {}
        for file_idx in {rec.file for _, (_, _, rec) in records}:
            try:
                self.files[file_idx].sync()
                synced[file_idx] = None
            except OSError as exc:
                synced[file_idx] = exc
                self._fail("sync", exc)
        durable = []
        for i, (ns, key, rec) in records:
            err = synced[rec.file]
            if err is None:
                durable.append((ns, key, rec))
                self.bytes_written += rec.length
            else:
                results[i] = err
        if durable:
            self.index.put_many(durable)
        return results

    def read_into(self, namespace: str, key: bytes, out: memoryview | None = None) -> memoryview:
        """Read a block, check its checksum, and return its bytes (in ``out`` when given).

        ``out`` of at least the slot-aligned length and page-aligned is read into directly;
        otherwise through a bounce buffer.
        """
        rec = self.index.get(namespace, key)
        if rec is None:
            raise KeyError(key)
        span = align_up(rec.length)
        direct = out is not None and len(out) >= span and _address(out) % ALIGN == 0
        buf = out if direct and out is not None else memoryview(aligned_buffer(span))
        try:
            self.files[rec.file].pread_into(buf[:span], rec.offset)
        except OSError as exc:
            self._fail("read", exc)
            raise
        data = buf[: rec.length]
        if xxhash.xxh3_64_intdigest(data) != rec.checksum:
            self.errors["checksum"] += 1
            log.error("nvme: checksum mismatch for a block of namespace %r at %s+%d; treating it as a miss",
                      namespace, self.paths[rec.file].path, rec.offset)
            raise ChecksumError(74, f"checksum mismatch at {self.paths[rec.file].path}+{rec.offset}")  # EBADMSG
        self.bytes_read += rec.length
        if out is not None and not direct:
            out[: rec.length] = data
            return out[: rec.length]
        return data

    def read_many(self, items: Sequence[tuple[str, bytes, memoryview | None]]) -> list[memoryview | Exception]:
        """Several reads in flight at once (the device's queue depth is where NVMe bandwidth comes from)."""
        return self._map_items(lambda item: self.read_into(*item), items, (OSError, KeyError))

    def _map_items(self, fn: Callable[[Any], Any], items: Sequence[Any], errors: tuple[type[Exception], ...]
                   ) -> list[Any]:
        """``fn`` of every item, in order, each result or its exception, with one contiguous share of the
        items per I/O thread: the device sees the same queue depth as one request per thread, without a
        future, a lock and a queue entry per block."""
        def share(lo: int, hi: int) -> list[Any]:
            out: list[Any] = []
            for item in items[lo:hi]:
                try:
                    out.append(fn(item))
                except errors as exc:
                    out.append(exc)
            return out

        n = len(items)
        shares = min(n, self.io_threads)
        bounds = [n * k // shares for k in range(shares + 1)] if shares else [0]
        futures = [self.pool.submit(share, bounds[k], bounds[k + 1]) for k in range(shares)]
        return [r for f in futures for r in f.result()]

    def remove(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Unindex blocks (durably) before their slots may be reused."""
        return self.index.delete_many(items)

    def _fail(self, what: str, exc: OSError) -> None:
        self.errors[what] += 1
        if self.degraded is None:
            log.error("nvme tier degraded: %s failed: %s", what, exc)
        self.degraded = f"{what} failed: {exc}"

    # ---------------------------------------------------------------- stats
    def probe(self) -> str | None:
        """Whether the tier's file systems take a write again (after ENOSPC or EIO): a small file written, synced
        and removed beside each data file (or beside the index, for block devices). None when they all did, else
        the error. Never touches the data files themselves."""
        dirs = {os.path.dirname(p.path) or "." for p in self.paths if not p.path.startswith("/dev/")}
        dirs.add(self.index.env.path())
        for d in sorted(dirs):
            path = os.path.join(d, f".kvrack-probe-{os.getpid()}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, bytes(4096))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(path)
            except OSError as exc:
                return f"probe write in {d} failed: {exc.strerror or exc}"
        return None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            alloc = self.allocator.stats()
        return {"tier": self.name, "backing": "O_DIRECT files", "paths": [p.path for p in self.paths],
                "degraded": self.degraded, "errors": dict(self.errors), "bytes_written": self.bytes_written,
                "bytes_read": self.bytes_read, **alloc}

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for f in getattr(self, "files", []):
            f.close()
        index = getattr(self, "index", None)
        if index is not None:
            index.close()


def default_nvme_dir() -> str:
    """$XDG_DATA_HOME/kvrack (~/.local/share/kvrack), or /var/lib/kvrack for a system service."""
    state = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory= (the shipped unit sets it)
    if state:
        return state.split(":")[0]
    if os.environ.get("INVOCATION_ID") and os.getuid() == 0:  # started by systemd as root
        return "/var/lib/kvrack"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "kvrack")


def default_nvme_capacity(directory: str) -> int:
    """min(10 GiB, 10% of the free space where the files will live)."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    st = os.statvfs(probe)
    return min(10 << 30, st.f_bavail * st.f_frsize // 10) // ALIGN * ALIGN


def parse_path_spec(spec: str) -> BackingPath:
    """``"PATH"`` or ``"PATH=SIZE"`` (binary units: ``"800GiB"``); a device without a size uses all of it."""
    path, sep, size = spec.rpartition("=") if "=" in spec else (spec, "", "")
    capacity = parse_size(size) if sep else 0
    if not path:
        raise ValueError(f"nvme.paths entry {spec!r} has no path")
    if capacity == 0 and not os.path.exists(path):
        raise ValueError(f"nvme.paths entry {spec!r}: a new file needs a size (\"{path}=100GiB\")")
    return BackingPath(path, capacity)


def open_nvme_tier(directory: str, path_specs: Sequence[str], capacity: int, index_dir: str, region_bytes: int,
                   io_threads: int, fault_plan: str = "") -> NvmeTier:
    """The tier as the daemon configures it: explicit paths, or one file in ``directory``; ``fault_plan``: a
    JSON file of I/O faults to inject (tests only; ``FileFaultPlan``)."""
    if path_specs:
        paths = [parse_path_spec(s) for s in path_specs]
    else:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        paths = [BackingPath(os.path.join(directory, "kvrack-nvme.data"), capacity or default_nvme_capacity(directory))]
    for p in paths:
        if p.capacity and p.capacity < region_bytes and not os.path.exists(p.path):
            raise ValueError(f"{p.path}: capacity {p.capacity} is smaller than one region ({region_bytes} bytes)")
    open_file: Callable[[str, int], BlockFile] = DirectFile
    if fault_plan:
        plan = FileFaultPlan(fault_plan)

        def open_file(path: str, cap: int) -> BlockFile:
            return FaultyFile(DirectFile(path, cap), plan)

    return NvmeTier(paths, index_dir or os.path.join(directory, "index"), region_bytes=region_bytes,
                    io_threads=io_threads, open_file=open_file)
