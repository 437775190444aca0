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


def test_bench_peers_writes_the_contracted_json(tmp_path):
    """Every system runs the same small workload, or is reported with the reason it cannot run here; the keys the
    contract names are present (null with a reason where their peer did not run); nothing is left behind."""
    import shutil
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).iterdir()}
    out = tmp_path / "peers.json"
    data, stdout = run_bench(out, "peers", "--systems", "kvrack-shm,kvrack-tcp,redis-unix,mooncake-tcp,lmcache",
                             "--sizes", "64KiB,2MiB", "--batches", "1,16", "--working-set", "8MiB", "--repeats", "1",
                             "--replay-requests", "60", "--replay-memory", "16MiB", timeout=600)
    shm = data["systems"]["kvrack-shm"]
    assert set(shm["cells"]) == {"64KiB/1", "64KiB/16", "2MiB/1", "2MiB/16"}
    for cell in shm["cells"].values():
        for phase in ("write", "read", "mixed"):
            assert cell[phase]["gbs"] > 0 and cell[phase]["p99_us"] >= cell[phase]["p50_us"] > 0
            assert cell[phase]["complete"]
    replay = shm["replay"]
    assert 0 < replay["hit_ratio"] < 1 and replay["requests"] == 60 and replay["held_blocks"] > 0
    assert replay["memory_bytes_per_held_byte"] >= 1.0  # the tier's memory is counted, not only what the daemon touched
    assert 0 < shm["replay_by_policy"]["s3fifo"]["hit_ratio"] < 1  # the same replay under another dram.policy
    for key in ("vs_redis_get_2mib", "vs_redis_put_2mib", "vs_lmcache_get_2mib", "vs_mooncake_get_2mib"):
        assert key in data
    if shutil.which("redis-server"):
        assert data["vs_redis_get_2mib"] > 0 and data["vs_redis_put_2mib"] > 0
        assert data["systems"]["redis-unix"]["replay"]["hit_ratio"] > 0
    else:
        assert data["systems"]["redis-unix"]["unavailable"]
    for peer in ("lmcache", "mooncake"):
        if data[f"vs_{peer}_get_2mib"] is None:
            assert data[f"vs_{peer}_get_2mib_reason"]
    assert "vs_redis_get_2mib" in stdout
    left = {p.name for p in Path(tempfile.gettempdir()).iterdir()} - before
    assert not [n for n in left if n.startswith(("kvrack-", "mooncake"))], left
    assert subprocess.run(["pgrep", "-f", "redis-server .*kvrack-bench-redis"], capture_output=True).returncode == 1


def test_a_failed_vllm_server_is_reported_by_its_root_cause(tmp_path):
    """`bench e2e --peers` says why a peer did not start: the engine core's exception, not the generic line
    vLLM logs after it."""
    from kvrack.bench.e2e import failure

    log = tmp_path / "vllm.log"
    log.write_text("INFO starting\n(EngineCore pid=7) ERROR Traceback (most recent call last):\n"
                   "(EngineCore pid=7) Exception: CPU Offloading is currently only supported on CUDA-alike and "
                   "XPU GPUs\nRuntimeError: Engine core initialization failed. See root cause above. Failed core "
                   "proc(s): {'EngineCore': 1}\n")
    assert failure(str(log)).endswith("Exception: CPU Offloading is currently only supported on CUDA-alike and "
                                      "XPU GPUs")
    assert failure(str(tmp_path / "missing.log")) == "(no log)"
