"""Benchmark targets of the NVMe tier (`make bench-check`; not in the default run).

Ratios are against raw O_DIRECT I/O of the same sizes, threads and batches on the
same file system, measured in the same run.
"""

import pytest

from kvrack.bench import nvme as bench_nvme

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module")
def result():
    return bench_nvme.run(None, ["2MiB"], working_set=512 << 20, repeats=2)


def test_tier_get_and_put_vs_raw_o_direct(result):
    assert result["nvme_get_vs_raw"] >= 0.8
    assert result["nvme_put_vs_raw"] >= 0.7


def test_daemon_end_to_end_vs_raw_o_direct(result):
    # through kvrackd and a client: the DRAM hop and the control messages must not halve the device
    assert result["daemon_get_vs_raw"] >= 0.5
    assert result["daemon_put_vs_raw"] >= 0.5
