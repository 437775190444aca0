"""`kvrack bench local` runs end to end and writes the JSON keys its contract names (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_bench(out: Path, name: str, *args: str, timeout: int = 300) -> tuple[dict[str, Any], str]:
    """``kvrack bench NAME --json OUT ARGS`` in a subprocess: its JSON and its console output."""
    res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "bench", name, "--json", str(out), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text()), res.stdout


def test_bench_local_writes_the_contracted_json(tmp_path):
    out = tmp_path / "bench.json"
    data, stdout = run_bench(out, "local", "--sizes", "64KiB,2MiB", "--repeats", "1", "--working-set", "8MiB",
                             "--index-blocks", "20000")
    for key in ("get_vs_memcpy", "put_vs_memcpy", "lookup_keys_per_s", "lookup_vs_dict", "rtt_p50_us",
                "rtt_vs_raw_socket", "index_bytes_per_block"):
        assert isinstance(data[key], (int, float)) and data[key] > 0, key
    assert data["index_blocks"] >= 20000
    assert set(data["sizes"]) == {"64KiB", "2MiB"}
    assert "put 2MiB blocks" in stdout


def test_bench_nvme_writes_the_contracted_json(tmp_path):
    out = tmp_path / "nvme.json"
    data, _ = run_bench(out, "nvme", "--dir", str(tmp_path), "--working-set", "8MiB", "--repeats", "1")
    for key in ("nvme_get_vs_raw", "nvme_put_vs_raw"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert set(data["sizes"]) == {"2MiB", "256KiB"}
    assert "gds_get_vs_raw" in data  # null with the reason in sizes[..]["gds_unavailable"] when there is no GPU
    if data["gds_get_vs_raw"] is None:
        assert data["sizes"]["2MiB"]["gds_unavailable"]
    assert [p.name for p in tmp_path.iterdir()] == ["nvme.json"], "the bench cleans up its files"


def test_bench_cxl_writes_the_contracted_json(tmp_path):
    out = tmp_path / "cxl.json"
    region_dir = tmp_path / "regions"
    region_dir.mkdir()
    data, _ = run_bench(out, "cxl", "--dir", str(region_dir), "--sizes", "2MiB,64KiB", "--working-set", "16MiB",
                        "--repeats", "1")
    for key in ("cxl_get_vs_memcpy", "cxl_lookup_keys_per_s", "cxl_lookup_vs_dict", "cxl_get_coherent_vs_memcpy",
                "cxl_get_repeat_vs_memcpy",
                "cxl_get_batched_vs_memcpy", "cxl_invalidate_us_per_block", "cxl_invalidate_bound_vs_memcpy",
                "cxl_get_vs_invalidate_bound"):
        assert isinstance(data[key], float) and data[key] > 0, key
    for s in data["sizes"].values():  # the bound is memcpy's time over memcpy's plus the invalidation's, per block
        memcpy_us = s["block_bytes"] / s["memcpy_gbs"] / 1e3
        bound = memcpy_us / (memcpy_us + s["invalidate_us_per_block"])
        assert s["invalidate_bound_vs_memcpy"] == pytest.approx(bound)
        assert s["get_vs_invalidate_bound"] == pytest.approx(s["get_gbs"] / (bound * s["memcpy_gbs"]))
    assert set(data["sizes"]) == {"2MiB", "64KiB"}
    assert data["primitives"]["invalidate"] in {"clflushopt", "clflush", "none"}
    assert list(region_dir.iterdir()) == [], "the bench removes its region files"


def test_bench_remote_writes_the_contracted_json(tmp_path):
    out = tmp_path / "remote.json"
    data, _ = run_bench(out, "remote", "--sizes", "2MiB,64KiB", "--working-set", "32MiB", "--repeats", "1")
    assert isinstance(data["tcp_get_vs_raw_socket"], float) and data["tcp_get_vs_raw_socket"] > 0
    assert set(data["sizes"]) == {"2MiB", "64KiB"}
    if data["nixl_unavailable"] is None:
        assert isinstance(data["nixl_get_vs_raw_nixl"], float) and data["nixl_get_vs_raw_nixl"] > 0
        assert data["sizes"]["2MiB"]["kvrack_nixl_put_gbs"] > 0
    else:  # null, with the reason beside it
        assert data["nixl_get_vs_raw_nixl"] is None and data["nixl_unavailable"]


def test_bench_overwrite_writes_the_contracted_json(tmp_path):
    out = tmp_path / "overwrite.json"
    data, _ = run_bench(out, "overwrite", "--capacity", "16MiB", "--block", "256KiB", "--fills", "2",
                        "--chain-depth", "16")
    assert data["chain_depth"] == 16
    for key in ("put_p50_us", "put_p99_us", "put_p99_vs_p50"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["background"]["background_evictions"] > 0 and data["inline"]["background_evictions"] == 0
    assert data["inline"]["evictions"] >= data["puts"] - 64  # every measured put displaced a block


def test_bench_hbm_writes_the_contracted_json(tmp_path):
    """With a GPU the figures; without one, null figures and the reason (the run still succeeds)."""
    from kvrack.tiers.hbm_ipc import probe

    out = tmp_path / "hbm.json"
    data, _ = run_bench(out, "hbm", "--working-set", "64MiB", "--repeats", "1", timeout=600)
    present, why = probe(0)
    if present:
        assert data["hbm_get_vs_d2d_memcpy"] > 0 and not data["hbm_unavailable"]
    else:
        assert data["hbm_get_vs_d2d_memcpy"] is None and data["hbm_unavailable"] == why
