"""Benchmark targets of remote clients (`make bench-check`; not in the default run).

kvrack's remote get over the TCP byte stream and over NIXL against a raw TCP
socket and a raw NIXL READ between the same endpoints, measured in the same run.
"""

import pytest

from kvrack.bench import remote as bench_remote

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module")
def result():
    return bench_remote.run(["2MiB"], 256 << 20, repeats=5)


def test_tcp_get_vs_raw_socket(result):
    assert result["tcp_get_vs_raw_socket"] >= 0.8


def test_nixl_get_vs_raw_nixl(result):
    if result["nixl_unavailable"]:
        pytest.skip(result["nixl_unavailable"])
    assert result["nixl_get_vs_raw_nixl"] >= 0.9
