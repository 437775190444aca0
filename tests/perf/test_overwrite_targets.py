"""Put latency under sustained overwrite (`make bench-check`; not in the default run).

The target is a ratio within one run: p99 put latency at most twice p50 while
every put displaces older blocks, for independent blocks and for long chains
(each put's parent the previous block), where eviction goes leaf first.
"""

import pytest

from kvrack.bench import overwrite as bench_overwrite

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("chain_depth", [1, 1000])
def test_put_p99_within_twice_p50_with_the_background_evictor(chain_depth):
    result = bench_overwrite.run(128 << 20, 64 << 10, 3.0, chain_depth=chain_depth)
    assert result["put_p99_vs_p50"] <= 2.0, result["background"]
