"""The reliability suite's short versions (the long ones: `make reliability-report`)."""

from __future__ import annotations

import pytest

from tests.reliability import suite


@pytest.mark.timeout(300)
def test_kill_9_under_load_loses_nothing_acknowledged_and_never_serves_wrong_bytes():
    r = suite.crash_recovery(kills=3)
    assert r["kills_survived"] == 3 and r["blocks_written"] > 0 and r["acknowledged_persistent_blocks"] > 0, r
    assert r["corrupt_reads"] == 0 and r["lost_acknowledged_blocks"] == 0, r


@pytest.mark.timeout(300)
def test_fuzzed_frames_no_crash_no_internal_error_and_the_good_client_is_unharmed():
    r = suite.fuzz(frames=20_000, seconds=60)
    assert r["fuzz_frames"] >= 20_000, r
    assert r == {**r, "internal_errors": 0, "malformed_replies": 0, "verify_errors": 0, "daemon_crashes": 0}


@pytest.mark.timeout(300)
def test_bad_clients_leave_no_lease_bounded_memory_and_a_good_client_unharmed():
    r = suite.bad_clients(seconds=6)
    assert r["leaked_leases"] == 0 and r["good_client_errors"] == 0 and r["daemon_crashes"] == 0, r
    assert r["max_rss_growth_bytes"] <= 256 << 20, r


@pytest.mark.timeout(120)
def test_a_hoarding_tenant_cannot_starve_another_under_its_quota():
    assert suite.starvation(seconds=3)["starved_tenant_errors"] == 0


@pytest.mark.timeout(300)
def test_a_two_minute_soak_stays_flat():
    from tests.reliability import soak
    report = soak.soak(minutes=2, interval_s=15)
    assert not soak.flat(report), (soak.flat(report), report["rows"])
