"""DRAM segments that outlive the daemon: named files on tmpfs or hugetlbfs, re-adopted after a clean stop.

With ``dram.shm_dir`` set, each segment is a file in that directory instead of an
anonymous memfd. A clean shutdown (SIGTERM, every session closed, NVMe writes
flushed) writes a state file next to them: a header (magic, version, geometry,
clean-shutdown marker) and the slot table of every committed block, oldest first.
The next start reads the state file, deletes it at once (from then on the
segments change, so a crash must not find a stale table), checks the header
and every segment file, and re-adopts the blocks. Anything else (no state file:
the last stop was a crash; a changed geometry; a missing or resized file)
starts cold and removes the old segment files.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import struct
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec

from kvrack.protocol import KEY_BYTES
from kvrack.tiers.base import huge_page_bytes, size_segment_fd

log = logging.getLogger("kvrack.tiers.dram")

STATE_MAGIC = "kvrack-dram-state"
STATE_VERSION = 1
STATE_FILE = "kvrack-dram.state"
LOCK_FILE = "kvrack-dram.lock"
SEGMENT_PREFIX = "dram-"
SEGMENT_SUFFIX = ".seg"
NO_PARENT = bytes(KEY_BYTES)


class DirInUse(OSError):
    """Another daemon holds the segment directory."""


class SegmentRecord(msgspec.Struct, array_like=True):
    file: str
    owner: str
    slot_size: int


class DramState(msgspec.Struct):
    """The state file. Block columns are packed arrays: one entry per committed DRAM block, oldest first."""

    magic: str
    version: int
    clean: bool
    segment_bytes: int
    capacity: int
    saved_at: float
    segments: list[SegmentRecord]
    namespaces: list[str]
    keys: bytes  # n x KEY_BYTES
    parents: bytes  # n x KEY_BYTES, zeros = no parent
    ns_index: bytes  # uint16 per block: index into namespaces
    seg_index: bytes  # uint32 per block: index into segments
    slots: bytes  # uint32 per block
    sizes: bytes  # uint64 per block


@dataclass(frozen=True)
class SavedBlock:
    namespace: str
    key: bytes
    parent: bytes | None
    file: str
    owner: str
    slot_size: int
    slot: int
    nbytes: int


class ShmDirBacking:
    """Segments as files in one directory (tmpfs or hugetlbfs), reachable by clients only through passed fds.

    Files are created 0600 in a 0700 directory; the directory is locked for the daemon's
    life so two daemons never share segments.
    """

    kind = "shm-dir"

    def __init__(self, directory: str, prefault: bool = True) -> None:
        self.dir = directory
        self.prefault = prefault
        self.keep_files = False  # set after a clean-shutdown state file is written
        self._paths: dict[int, str] = {}  # fd -> file
        self._generation = secrets.token_hex(4)  # file names never collide with adopted ones
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"dram.shm_dir {directory}: cannot create it: {exc.strerror}") from None
        self._lock_fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DirInUse(errno.EBUSY, f"dram.shm_dir {directory} is in use by another kvrackd") from None

    @property
    def state_path(self) -> str:
        return os.path.join(self.dir, STATE_FILE)

    def create(self, seg_id: int, size: int) -> int:
        path = os.path.join(self.dir, f"{SEGMENT_PREFIX}{self._generation}-{seg_id:x}{SEGMENT_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size_segment_fd(fd, size, self.prefault, path)
        except OSError:
            os.unlink(path)
            raise
        self._paths[fd] = path
        return fd

    def open_existing(self, name: str, size: int) -> int:
        """A segment file a clean shutdown left; its size must be the configured segment size."""
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(fd)
        if st.st_size != size:
            os.close(fd)
            raise ValueError(f"segment file {path} has {st.st_size} bytes, expected {size}")
        self._paths[fd] = path
        return fd

    def claim(self, handle: int) -> None:
        """A re-adopted segment joins the allocator (``open_existing`` already tracks it)."""

    def forget(self, handle: int) -> None:
        """Close a segment without deleting its file (a re-adoption that was abandoned)."""
        self._paths.pop(handle, None)
        os.close(handle)

    def file_of(self, handle: int) -> str:
        return os.path.basename(self._paths[handle])

    def destroy(self, handle: int) -> None:
        path = self._paths.pop(handle, None)
        os.close(handle)
        if path is not None and not self.keep_files:
            _unlink_quietly(path)

    def segment_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.dir) if n.startswith(SEGMENT_PREFIX) and n.endswith(SEGMENT_SUFFIX))

    def remove_stale(self, keep: Iterable[str] = ()) -> int:
        """Delete segment files no live segment uses (left by a crash, or not re-adopted)."""
        live = {os.path.basename(p) for p in self._paths.values()} | set(keep)
        removed = 0
        for name in self.segment_files():
            if name not in live:
                _unlink_quietly(os.path.join(self.dir, name))
                removed += 1
        return removed

    def close_lock(self) -> None:
        os.close(self._lock_fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_state(backing: ShmDirBacking, segment_bytes: int, capacity: int,
               blocks: Iterable[tuple[str, bytes, bytes | None, int, int, int, int]]) -> int:
    """Write the clean-shutdown state: blocks are (namespace, key, parent, segment handle, slot size, slot, nbytes).

    Returns the number of blocks written. The file appears whole or not at all (rename).
    """
    seg_index: dict[int, int] = {}
    segments: list[SegmentRecord] = []
    ns_index: dict[str, int] = {}
    keys, parents = bytearray(), bytearray()
    nsi, segi, slots, sizes = array("H"), array("I"), array("I"), array("Q")
    for ns, key, parent, handle, slot_size, slot, nbytes in blocks:
        si = seg_index.get(handle)
        if si is None:
            si = seg_index[handle] = len(segments)
            segments.append(SegmentRecord(backing.file_of(handle), ns, slot_size))
        keys += key
        parents += parent if parent is not None else NO_PARENT
        nsi.append(ns_index.setdefault(ns, len(ns_index)))
        segi.append(si)
        slots.append(slot)
        sizes.append(nbytes)
    state = DramState(STATE_MAGIC, STATE_VERSION, True, segment_bytes, capacity, time.time(), segments,
                      list(ns_index), bytes(keys), bytes(parents), nsi.tobytes(), segi.tobytes(), slots.tobytes(),
                      sizes.tobytes())
    tmp = backing.state_path + ".tmp"
    write_state_bytes(tmp, msgspec.msgpack.encode(state))
    os.replace(tmp, backing.state_path)
    return len(sizes)


MAPPED_STATE = struct.Struct("<8sQ")  # a state file written through a mapping: magic, then the payload's length
MAPPED_MAGIC = b"KVRKSTAT"  # a msgpack payload never starts with it (a map starts 0x8?, 0xde or 0xdf)


def write_state_bytes(path: str, data: bytes, mapped: bool | None = None) -> None:
    """Write a new file whole, durably. hugetlbfs (whose pages are larger than the CPU's) takes no write():
    there the file is sized in whole pages and filled through a mapping, its payload behind ``MAPPED_STATE``.
    ``mapped`` forces one way or the other (tests)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        huge = huge_page_bytes(fd)
        if mapped is None:
            mapped = bool(huge)
        if mapped:
            size = MAPPED_STATE.size + len(data)
            size += -size % (huge or mmap.PAGESIZE)
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size, mmap.MAP_SHARED) as m:
                m[MAPPED_STATE.size: MAPPED_STATE.size + len(data)] = data
                m[: MAPPED_STATE.size] = MAPPED_STATE.pack(MAPPED_MAGIC, len(data))
                m.flush()
        else:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state_bytes(path: str) -> bytes:
    """A file ``write_state_bytes`` wrote, either way: its payload."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[: len(MAPPED_MAGIC)] != MAPPED_MAGIC:
        return raw
    if len(raw) < MAPPED_STATE.size:
        raise ValueError(f"{path}: a mapped state file of {len(raw)} bytes has no header")
    _magic, n = MAPPED_STATE.unpack_from(raw)
    if MAPPED_STATE.size + n > len(raw):
        raise ValueError(f"{path}: a mapped state file says {n} bytes of payload, holds {len(raw) - MAPPED_STATE.size}")
    return raw[MAPPED_STATE.size: MAPPED_STATE.size + n]


def take_state(backing: ShmDirBacking, segment_bytes: int, capacity: int) -> tuple[DramState | None, str]:
    """Read and delete the state file. Returns (state, "") when it is usable, else (None, why not)."""
    path = backing.state_path
    try:
        raw = read_state_bytes(path)
    except FileNotFoundError:
        return None, "no clean-shutdown state (first start, or the last stop was not clean)"
    except ValueError as exc:
        os.unlink(path)
        return None, f"state file unreadable: {exc}"
    finally:
        _unlink_quietly(path + ".tmp")
    os.unlink(path)  # from here on the segments change: a later crash must not find this table
    try:
        state = msgspec.msgpack.decode(raw, type=DramState)
    except msgspec.DecodeError as exc:
        return None, f"state file unreadable: {exc}"
    n = len(state.sizes) // 8
    if state.magic != STATE_MAGIC or state.version != STATE_VERSION:
        return None, f"state file is {state.magic!r} version {state.version}, expected version {STATE_VERSION}"
    if not state.clean:
        return None, "state file is not marked clean"
    if state.segment_bytes != segment_bytes:
        return None, f"dram.segment_bytes changed ({state.segment_bytes} -> {segment_bytes})"
    if len(state.segments) > capacity // segment_bytes:
        return None, f"dram.capacity_bytes shrank below the {len(state.segments)} segments in use"
    if not (len(state.keys) == len(state.parents) == n * KEY_BYTES and len(state.ns_index) == 2 * n
            and len(state.seg_index) == len(state.slots) == 4 * n):
        return None, "state file columns disagree in length"
    return state, ""


def saved_blocks(state: DramState) -> Iterator[SavedBlock]:
    """The blocks of a state file, oldest first."""
    nsi, segi, slots, sizes = array("H"), array("I"), array("I"), array("Q")
    nsi.frombytes(state.ns_index)
    segi.frombytes(state.seg_index)
    slots.frombytes(state.slots)
    sizes.frombytes(state.sizes)
    keys, parents = state.keys, state.parents
    for i in range(len(sizes)):
        off = i * KEY_BYTES
        parent = parents[off: off + KEY_BYTES]
        seg = state.segments[segi[i]]
        yield SavedBlock(state.namespaces[nsi[i]], keys[off: off + KEY_BYTES], None if parent == NO_PARENT else parent,
                         seg.file, seg.owner, seg.slot_size, slots[i], sizes[i])
