"""Multi-process hammer for a CXL region: each process maps the region as its own "host".

Blocks verify themselves: 32-byte key, 8-byte generation, 8-byte xxh3 of the
payload, then the payload (a function of key and generation). A read that
returns another key's block, a mix of two generations, or bytes that do not
match their checksum counts as bad. Run as a script by the tests:
``python -m tests.cxl_stress PATH SECONDS SEED ROLE [MIN_OPS]`` prints one JSON line. A process runs for
SECONDS and for MIN_OPS operations at least (whichever ends later: a slow machine still does the work the test
counts on), at most ``SECONDS + OVERTIME_S``.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import time

import blake3
import numpy as np
import xxhash

from kvrack.tiers.cxl import CxlFull, CxlRegion

HEADER = struct.Struct("<32sQQ")
KEYSPACE = 600
MAX_OPS = 2_000_000
OVERTIME_S = 300.0


def key_of(i: int) -> bytes:
    return blake3.blake3(f"stress-{i}".encode()).digest()


def make_block(key: bytes, gen: int, size: int) -> bytes:
    seed = int.from_bytes(key[:8], "little") ^ gen
    payload = np.random.default_rng(seed).integers(0, 256, size - HEADER.size, dtype=np.uint8).tobytes()
    return HEADER.pack(key, gen, xxhash.xxh3_64_intdigest(payload)) + payload


def verify(key: bytes, data: memoryview) -> bool:
    if len(data) < HEADER.size:
        return False
    k, _gen, check = HEADER.unpack_from(data, 0)
    return k == key and xxhash.xxh3_64_intdigest(data[HEADER.size:]) == check


def run(path: str, seconds: float, seed: int, role: str, min_ops: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    writer = role != "reader"
    region = CxlRegion.open(path, writable=writer)
    if writer:
        region.register_host()
    buf = bytearray(region.g.chunk_bytes)
    view = memoryview(buf)
    batch_views = [memoryview(bytearray(region.g.chunk_bytes)) for _ in range(8)]
    counts = {"ops": 0, "reads": 0, "hits": 0, "bad": 0, "puts": 0, "exists": 0, "deletes": 0, "evictions": 0,
              "full": 0, "lookups": 0}
    start = time.monotonic()
    deadline, cap = start + seconds, start + seconds + OVERTIME_S
    gen = seed << 32
    while counts["ops"] < MAX_OPS:
        now = time.monotonic()
        if now >= cap or (now >= deadline and counts["ops"] >= min_ops):
            break
        counts["ops"] += 1
        op = rng.random()
        key = key_of(rng.randrange(KEYSPACE))
        if not writer or op < 0.5:
            counts["reads"] += 1
            n = region.read(key, buf)
            if n is not None:
                counts["hits"] += 1
                if not verify(key, view[:n]):
                    counts["bad"] += 1
            if rng.random() < 0.1:
                keys = [key_of(rng.randrange(KEYSPACE)) for _ in range(16)]
                _lead, slots = region.lookup(keys)
                counts["lookups"] += len(keys)
            if rng.random() < 0.1:  # a batch in one call, as a client's get_into reads a prefix
                keys = [key_of(rng.randrange(KEYSPACE)) for _ in range(8)]
                counts["reads"] += len(keys)
                for k, got, out in zip(keys, region.read_many(keys, batch_views), batch_views):
                    if got is not None:
                        counts["hits"] += 1
                        counts["bad"] += not verify(k, out[:got])
        elif op < 0.85:
            gen += 1
            size = rng.choice((HEADER.size + 64, 4096, 65536, region.g.chunk_bytes))
            try:
                if region.put(key, make_block(key, gen, size)):
                    counts["puts"] += 1
                else:
                    counts["exists"] += 1
            except CxlFull:
                counts["full"] += 1
        elif op < 0.95:
            counts["deletes"] += region.delete(key)
        else:
            counts["evictions"] += region.evict(rng.randrange(1, 8))
        if writer and counts["ops"] % 256 == 0:
            region.heartbeat()
    st = region.stats()  # hits that dropped the block's lines, and hits on a block unchanged since read here
    counts["reads_invalidated"], counts["reads_unchanged"] = st["reads_invalidated"], st["reads_unchanged_since_last_read"]
    region.close()
    return counts


if __name__ == "__main__":
    out = run(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
              int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    print(json.dumps(out), flush=True)
