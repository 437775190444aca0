"""The NVMe tier's persistent index: one LMDB environment, (namespace, key) -> record.

A record is written only after the block's data is durable (the tier
fdatasyncs its files first), so the index never names bytes that are not on
disk; it is deleted before a slot can be reused. LMDB commits are durable and
atomic, so after ``kill -9`` the index is exactly its last committed state.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence

import lmdb
import msgspec

INDEX_VERSION = 1


class Record(msgspec.Struct, array_like=True, frozen=True):
    """Where a block is on the tier's media and how to check it."""

    file: int  # index into the tier's configured paths
    offset: int  # byte offset of its slot in that file
    length: int  # bytes of block data
    slot_size: int  # the slot's size class (>= length, page-aligned)
    region: int  # byte offset of the slot's region (segment) in that file
    checksum: int  # xxh3-64 of the block data
    created: float  # unix time of the write
    layout: bytes = b""  # the client's layout id when known
    device_checksum: int = 0  # gds.word_checksum of the data when a GPU reader was attached; 0 = none


class Geometry(msgspec.Struct, frozen=True):
    """What the data files looked like when the index was written; checked at every open."""

    version: int
    paths: list[str]
    capacities: list[int]
    region_bytes: int


_enc = msgspec.msgpack.Encoder()
_rec = msgspec.msgpack.Decoder(Record)
_geo = msgspec.msgpack.Decoder(Geometry)


def index_key(namespace: str, key: bytes) -> bytes:
    return namespace.encode() + b"\0" + key


def split_key(raw: bytes) -> tuple[str, bytes]:
    ns, _, key = bytes(raw).partition(b"\0")
    return ns.decode(), key


class GeometryMismatch(RuntimeError):
    """The index was written for other files; refusing beats misreading every block."""


class IndexInUse(OSError):
    """Another process has this index (and so the tier's files) open."""


def _lock_directory(directory: str) -> int:
    """An exclusive lock held for the index's life: two daemons on the same files would corrupt each other."""
    path = os.path.join(directory, "kvrack.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise IndexInUse(errno.EBUSY, f"the NVMe index at {directory} is in use by pid {holder}; "
                                      "each kvrackd needs its own nvme.dir / nvme.index_dir and data paths") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class NvmeIndex:
    def __init__(self, directory: str, map_size: int = 1 << 36) -> None:
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = _lock_directory(directory)
        # sync + metasync: a committed transaction survives power loss; writemap off keeps
        # stray writes from corrupting the map
        try:
            self.env = lmdb.open(directory, map_size=map_size, max_dbs=2, sync=True, metasync=True, lock=True,
                                 readahead=False)
        except lmdb.Error as exc:
            os.close(self._lock_fd)
            raise OSError(errno.EIO, f"cannot open the NVMe index at {directory}: {exc}") from None
        self.blocks = self.env.open_db(b"blocks")
        self.meta = self.env.open_db(b"meta")

    def check_geometry(self, geometry: Geometry) -> None:
        """Record the geometry on first use; afterwards it must match."""
        with self.env.begin(write=True, db=self.meta) as txn:
            raw = txn.get(b"geometry")
            if raw is None:
                txn.put(b"geometry", _enc.encode(geometry))
                return
            old = _geo.decode(raw)
            if old.version != geometry.version or old.paths != geometry.paths or old.region_bytes != geometry.region_bytes \
                    or any(c < o for c, o in zip(geometry.capacities, old.capacities)):
                raise GeometryMismatch(
                    f"the NVMe index at {self.env.path()} was written for paths {old.paths} (capacities "
                    f"{old.capacities}, regions of {old.region_bytes} bytes, index v{old.version}); the config now "
                    f"says {geometry.paths} ({geometry.capacities}, {geometry.region_bytes}). Restore the old "
                    "settings, or move the index directory away to start the tier empty.")
            if geometry.capacities != old.capacities:  # grown files: remember the new sizes
                txn.put(b"geometry", _enc.encode(geometry))

    def put_many(self, items: Sequence[tuple[str, bytes, Record]]) -> None:
        """One durable transaction for a batch of records."""
        with self.env.begin(write=True, db=self.blocks) as txn:
            for ns, key, rec in items:
                txn.put(index_key(ns, key), _enc.encode(rec))

    def delete_many(self, items: Sequence[tuple[str, bytes]]) -> int:
        deleted = 0
        with self.env.begin(write=True, db=self.blocks) as txn:
            for ns, key in items:
                deleted += bool(txn.delete(index_key(ns, key)))
        return deleted

    def get(self, namespace: str, key: bytes) -> Record | None:
        with self.env.begin(db=self.blocks, buffers=True) as txn:
            raw = txn.get(index_key(namespace, key))
            return None if raw is None else _rec.decode(raw)

    def items(self) -> Iterator[tuple[str, bytes, Record]]:
        with self.env.begin(db=self.blocks) as txn:
            for raw_key, raw in txn.cursor():
                ns, key = split_key(raw_key)
                yield ns, key, _rec.decode(raw)

    def close(self) -> None:
        self.env.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

