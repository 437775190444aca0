"""Where everything lives in a CXL region: one header, then hosts, chunk table, index and data.

All of it is in the shared memory itself, as offsets (never pointers), so
every host that maps the device, at whatever address, reads the same layout::

    0        header (line 0-1: geometry; line 2: formatted word; 3: lock word; 4: allocation hint;
             5: eviction hand; 6: namespace name)
    4096     hosts: one 64-byte line per writer host (claimed, machine id, pid, heartbeat)
    ...      chunk table: one u64 per data chunk, 0 = free, else the host whose heap holds it
    ...      index: fixed number of 64-byte entries, linear probing on the key's first 8 bytes
    ...      data: equal chunks, the first one aligned to the chunk size (2 MiB pages on hugetlbfs)

Every word that more than one host writes sits on its own cache line, or is
written only under the region lock with an invalidate before and a flush
after, because the memory is not coherent between hosts (a host writing back a
whole line would otherwise undo another host's write to a neighbouring word).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

LINE = 64
PAGE = 4096
MAGIC = 0x314C58434B52564B  # "KVRKCXL1", little-endian
FORMATTED = 0x44454D524F46564B  # "KVFORMED": written last, after the whole layout is flushed
VERSION = 1

ENTRY_BYTES = 64
KEY_BYTES = 32
EMPTY, WRITING, READY, TOMBSTONE = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", WRITING: "writing", READY: "ready", TOMBSTONE: "tombstone"}

# header words
OFF_GEOMETRY = 0
OFF_FORMATTED = 2 * LINE
OFF_LOCK = 3 * LINE
OFF_ALLOC_HINT = 4 * LINE
OFF_EVICT_HAND = 5 * LINE
OFF_NAMESPACE = 6 * LINE
NAMESPACE_BYTES = 64
OFF_HOSTS = PAGE

GEOMETRY = struct.Struct("<QIIQQQQQQQQ")  # magic, version, flags, region, hosts, max_hosts, chunks_off,
#                                            nchunks, index_off, nslots, data_off ... then chunk_bytes below
CHUNK_BYTES_AT = GEOMETRY.size
ENTRY = struct.Struct("<QQ32sQQ")  # version, meta, key, loc, check
HOST = struct.Struct("<QQQQ")  # claimed (host id + 1), machine id, pid, heartbeat (ms, realtime)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """The layout of one region, computed by the creator and read back from the header by everyone else."""

    region_bytes: int
    max_hosts: int
    chunks_offset: int
    nchunks: int
    index_offset: int
    nslots: int
    data_offset: int
    chunk_bytes: int

    @classmethod
    def plan(cls, region_bytes: int, chunk_bytes: int, max_hosts: int = 64, slots_per_chunk: int = 2) -> Geometry:
        """The largest layout that fits ``region_bytes``: index at most half full when every chunk holds a block."""
        if chunk_bytes <= 0 or chunk_bytes % LINE:
            raise ValueError(f"cxl chunk size must be a positive multiple of {LINE} bytes, got {chunk_bytes}")
        if not 1 <= max_hosts <= 1023:
            raise ValueError(f"cxl max_hosts must be 1..1023, got {max_hosts}")
        chunks_offset = OFF_HOSTS + _align(max_hosts * LINE, PAGE)
        # metadata per chunk: 8 bytes of chunk table + slots_per_chunk index entries
        per_chunk = chunk_bytes + 8 + slots_per_chunk * ENTRY_BYTES
        nchunks = max(0, (region_bytes - chunks_offset - chunk_bytes - 2 * PAGE) // per_chunk)
        while nchunks > 0:
            nslots = max(8, nchunks * slots_per_chunk)
            index_offset = _align(chunks_offset + nchunks * 8, PAGE)
            data_offset = _align(index_offset + nslots * ENTRY_BYTES, min(chunk_bytes, 2 << 20) if
                                 chunk_bytes & (chunk_bytes - 1) == 0 else PAGE)
            if data_offset + nchunks * chunk_bytes <= region_bytes:
                return cls(region_bytes, max_hosts, chunks_offset, nchunks, index_offset, nslots, data_offset,
                           chunk_bytes)
            nchunks -= 1
        raise ValueError(f"a {region_bytes}-byte cxl region cannot hold one {chunk_bytes}-byte chunk and its metadata")

    def pack(self) -> bytes:
        head = GEOMETRY.pack(MAGIC, VERSION, 0, self.region_bytes, OFF_HOSTS, self.max_hosts, self.chunks_offset,
                             self.nchunks, self.index_offset, self.nslots, self.data_offset)
        return head + struct.pack("<Q", self.chunk_bytes)

    @classmethod
    def unpack(cls, buf: bytes | memoryview | mmap.mmap, actual_bytes: int) -> Geometry:
        """Geometry from a header; a clear error for anything that is not a kvrack region of this version."""
        if len(buf) < CHUNK_BYTES_AT + 8:
            raise ValueError("cxl region: too small for a header")
        magic, version, _flags, region, hosts, max_hosts, chunks_off, nchunks, index_off, nslots, data_off = \
            GEOMETRY.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ValueError("cxl region: no kvrack header (wrong device or file, or never formatted)")
        if version != VERSION:
            raise ValueError(f"cxl region: layout version {version}, this kvrack reads {VERSION}")
        (chunk_bytes,) = struct.unpack_from("<Q", buf, CHUNK_BYTES_AT)
        g = cls(region, max_hosts, chunks_off, nchunks, index_off, nslots, data_off, chunk_bytes)
        if hosts != OFF_HOSTS or region > actual_bytes or data_off + nchunks * chunk_bytes > region \
                or index_off % LINE or index_off + nslots * ENTRY_BYTES > data_off or chunk_bytes <= 0:
            raise ValueError(f"cxl region: inconsistent geometry {g} for {actual_bytes} mapped bytes")
        return g

    def chunk_word(self, chunk: int) -> int:
        return self.chunks_offset + 8 * chunk

    def entry(self, slot: int) -> int:
        return self.index_offset + slot * ENTRY_BYTES

    def chunk(self, chunk: int) -> int:
        return self.data_offset + chunk * self.chunk_bytes

    def host(self, host: int) -> int:
        return OFF_HOSTS + host * LINE


def meta_word(state: int, host: int) -> int:
    return state | (host << 8)


def meta_state(meta: int) -> int:
    return meta & 0xFF


def meta_host(meta: int) -> int:
    return (meta >> 8) & 0xFFFF


def loc_word(chunk: int, nbytes: int) -> int:
    return chunk | (nbytes << 32)


def loc_chunk(loc: int) -> int:
    return loc & 0xFFFFFFFF


def loc_nbytes(loc: int) -> int:
    return loc >> 32
