"""DRAM segments of huge pages (dram.hugepages: memfd MFD_HUGETLB): clients map them and read what was put,
copied or in place; skips without free huge pages in the pool."""

from __future__ import annotations

import numpy as np
import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client

SETTINGS = {"dram.capacity_bytes": "16MiB", "dram.segment_bytes": "2MiB", "nvme.enabled": "false",
            "dram.hugepages": "true"}


def test_huge_page_segments_round_trip_copied_and_in_place(free_huge_pages):
    rng = np.random.default_rng(7)
    keys = [rng.bytes(32) for _ in range(10)]
    data = [rng.integers(0, 255, 1 << 20, dtype=np.uint8) for _ in keys]
    with DaemonProcess(SETTINGS) as d, Client.connect(d.socket_path) as c:
        assert "hugepages" in d.log()
        c.put(keys, data)
        outs = [np.zeros(1 << 20, np.uint8) for _ in keys]
        assert all(c.get_into(keys, outs))
        assert all(np.array_equal(o, x) for o, x in zip(outs, data))
        with c.get(keys[:3]) as lease:  # zero copies: views on the huge-page mapping itself
            assert all(np.array_equal(a, x) for a, x in zip(lease.arrays(np.uint8), data[:3]))


def test_huge_page_segments_must_be_whole_pages():  # validation only: needs no pages in the pool
    with pytest.raises(RuntimeError, match="not a whole number of its 2048 KiB huge pages"):
        DaemonProcess({**SETTINGS, "dram.segment_bytes": "3MiB", "dram.capacity_bytes": "6MiB"})
