"""Benchmark targets of the local data path (`make bench-check`; not in the default run).

Ratios are against memcpy measured in the same run, so the check follows the
machine rather than absolute numbers.
"""

import pytest

from kvrack.bench import local as bench_local

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module")
def result():
    return bench_local.run(None, ["2MiB"], repeats=3, index_blocks=1_000_000)


def test_get_and_put_bandwidth_vs_memcpy(result):
    assert result["get_vs_memcpy"] >= 0.8
    assert result["put_vs_memcpy"] >= 0.7


def test_lookup_rate_against_a_dict_of_the_same_keys(result):
    assert result["lookup_vs_dict"] >= 0.035


def test_round_trip_against_a_raw_socket_round_trip(result):
    assert result["rtt_vs_raw_socket"] <= 4.0


def test_index_memory(result):
    assert result["index_bytes_per_block"] <= 300
