"""The trace simulator: loaders, generators, admission and promotion accounting, the ``kvrack sim`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvrack.bench.sim import report, traces
from kvrack.bench.sim.profile import reuse_profile
from kvrack.bench.sim.replay import Simulator, belady, simulate
from kvrack.cli.main import app


def write_mooncake(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mooncake_loader_marks_partial_tails(tmp_path: Path) -> None:
    p = write_mooncake(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1024, "output_length": 3, "hash_ids": [1, 2]},
        {"timestamp": 40, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 3]},
    ])
    reqs = traces.load(p)
    assert [r.keys for r in reqs] == [[1, 2], [1, 2, 3]]
    assert [r.partial_tail for r in reqs] == [False, True]
    assert reqs[1].time == pytest.approx(0.04)


def test_partial_tail_is_never_stored() -> None:
    sim = Simulator(10, "lru")
    sim.serve([1, 2, 3], partial_tail=True)
    assert 3 not in sim.dram.resident and 2 in sim.dram.resident
    assert sim.serve([1, 2, 3]) == 2


def test_kvrack_loader_tenants_never_share(tmp_path: Path) -> None:
    p = tmp_path / "k.jsonl"
    p.write_text('{"time": 0, "tenant": "a", "keys": ["x", "y"]}\n{"time": 1, "tenant": "b", "keys": ["x", "y"]}\n'
                 '{"time": 2, "tenant": "a", "keys": ["x", "y", "z"], "parents": [null, "x", "y"]}\n')
    reqs = traces.load(p)
    res = simulate(reqs, 10, "lru")
    assert res.prefix_hits == 2  # only tenant a's second request hits


@pytest.mark.parametrize("body, why", [
    ("not json\n", "not JSON"),
    ('{"keys": "abc"}\n', "must be a list"),
    ('{"keys": ["a"], "parents": []}\n', "one entry per key"),
    ('{"foo": 1}\n', "neither"),
])
def test_bad_traces_say_which_line(tmp_path: Path, body: str, why: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(body)
    with pytest.raises(traces.TraceError, match=why):
        traces.load(p)


def test_bad_mooncake_line_names_the_line(tmp_path: Path) -> None:
    p = write_mooncake(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 5, "hash_ids": [1]},
                                              {"timestamp": 0, "input_length": 5, "hash_ids": ["x"]}])
    with pytest.raises(traces.TraceError, match=r"t.jsonl:2: .*integers"):
        traces.load(p, "mooncake")


@pytest.mark.parametrize("name", sorted(traces.GENERATORS))
def test_generators_are_deterministic_prefix_chains(name: str) -> None:
    a, b = traces.GENERATORS[name](seed=11), traces.GENERATORS[name](seed=11)
    assert [r.keys for r in a] == [r.keys for r in b]
    assert [r.time for r in a] == sorted(r.time for r in a)
    # a block id stands for its whole prefix: the same id always has the same parent
    parent: dict[int, int | None] = {}
    for r in a:
        for i, k in enumerate(r.keys):
            assert parent.setdefault(k, r.keys[i - 1] if i else None) == (r.keys[i - 1] if i else None)


def test_generated_trace_round_trips_through_the_file_format(tmp_path: Path) -> None:
    reqs = traces.zipf(requests=300)
    traces.write(tmp_path / "z.jsonl", reqs)
    back = traces.load(tmp_path / "z.jsonl")
    assert simulate(back, 500, "chain").prefix_hits == simulate(reqs, 500, "chain").prefix_hits


def test_demotion_then_promotion_is_counted() -> None:
    sim = Simulator(4, "lru", nvme_blocks=100, admission="demote")
    sim.serve([1, 2, 3, 4])
    sim.serve([10, 11, 12, 13])  # DRAM full: 1..4 demoted to NVMe
    assert sim.result.demoted == 4 and sim.result.nvme_writes == 4
    assert sim.serve([1, 2, 3, 4]) == 4  # prefix hit from NVMe, promoted back
    assert sim.result.promoted == 4
    assert sim.result.tiers["nvme"].hits == 4


def test_reused_admission_writes_only_reused_blocks() -> None:
    reqs = [traces.Request([i, i + 1000]) for i in range(50)] + [traces.Request([7, 1007])] * 3
    every = simulate(reqs, 10, "lru", 200, admission="all")
    reused = simulate(reqs, 10, "lru", 200, admission="reused")
    assert every.nvme_writes == 100
    assert reused.nvme_writes < 10


def test_belady_is_at_least_lru() -> None:
    reqs = traces.rag(requests=800)
    for cap in (200, 800):
        assert belady(reqs, cap) >= simulate(reqs, cap, "lru").hit_ratio - 1e-9


def test_report_names_best_policy_and_margin() -> None:
    reqs = traces.scan(requests=600)
    r = report.hit_ratios(reqs, 0.1, ["lru", "chain"])
    assert set(r["hit_ratio_by_policy"]) == {"lru", "chain"}
    assert r["best_vs_lru_hit_points"] == pytest.approx(
        100 * (r["hit_ratio_by_policy"][r["best_policy"]] - r["hit_ratio_by_policy"]["lru"]), abs=1e-3)
    with pytest.raises(ValueError, match="unknown policy"):
        report.policy_names("lru,nope")


def test_max_hit_ratio_caps_every_policy_and_the_margin() -> None:
    """The no-eviction hit ratio bounds what any policy can reach, so it bounds the margin over LRU."""
    reqs = traces.chat(sessions=200)
    r = report.hit_ratios(reqs, 0.05, ["lru", "chain", "s3fifo"])
    assert all(h <= r["max_hit_ratio"] + 1e-9 for h in r["hit_ratio_by_policy"].values())
    assert r["belady_hit_ratio"] <= r["max_hit_ratio"] + 1e-9
    assert r["best_vs_lru_hit_points"] <= r["max_vs_lru_hit_points"] + 1e-6
    big = report.hit_ratios(reqs, 1.0, ["lru"])  # room for every block: LRU reaches the cap
    assert big["hit_ratio_by_policy"]["lru"] == pytest.approx(big["max_hit_ratio"], abs=1e-6)


def test_reuse_profile_counts_prefix_reuses_gaps_and_skew() -> None:
    R = traces.Request
    reqs = [
        R([1, 2, 3], time=0.0),
        R([1, 2, 4], time=5.0),              # 1, 2 reused 5 s / 1 request later; 4 new
        R([9, 2], time=20.0),                # 2 is not in the leading run: no reuse
        R([1, 2, 4, 5], time=700.0, partial_tail=True),  # 1 (700 s), 2 (680 s), 4 (695 s) reused; 5 not stored
        R([1, 2, 4, 5], time=710.0),         # 1, 2, 4 reused 10 s later; 5 was partial, so a miss
    ]
    p = reuse_profile(reqs)
    assert (p["unique_blocks"], p["block_accesses"], p["reuses"]) == (6, 16, 8)
    assert p["reused_block_share"] == pytest.approx(3 / 6)
    # unique // 10 = 0, so the single most reused block (1 or 2: three reuses each) is the top tenth
    assert p["top10_block_reuse_share"] == pytest.approx(3 / 8)
    gaps = sorted([5, 5, 700, 680, 695, 10, 10, 10])
    assert p["reuse_under_10s"] == pytest.approx(2 / 8)
    assert p["reuse_within_10s_10min"] == pytest.approx(3 / 8)
    assert p["reuse_gap_s"]["p50"] == gaps[int(0.5 * 7)]
    assert reuse_profile([R([1], time=0.0)])["reuses"] == 0


def test_cyclic_parents_in_a_trace_do_not_hang_the_simulator() -> None:
    R = traces.Request
    reqs = [R([1, 2], parents=[2, 1]), R([3], parents=[3])] + [R([i]) for i in range(10, 40)]
    res = simulate(reqs, 4, "lru")
    assert res.requests == len(reqs) and res.tiers["dram"].evicted > 0


def test_sim_cli_on_a_mooncake_trace(tmp_path: Path) -> None:
    rows = []
    for i in range(200):  # 20 conversations, 10 turns each, behind one shared head
        conv = i % 20
        turn = i // 20
        rows.append({"timestamp": i, "input_length": 512 * (turn + 3) + 7, "output_length": 1,
                     "hash_ids": [0] + [1000 * conv + t for t in range(turn + 3)]})
    p = write_mooncake(tmp_path / "m.jsonl", rows)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["sim", "--trace", str(p), "--format", "mooncake", "--capacity-fraction", "0.2",
                                   "--json", str(out), "--sweep", "0.1,0.5"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["hit_ratio_by_policy"]) >= {"lru", "chain", "s3fifo", "sieve", "lfu"}
    assert all(0 <= v <= 1 for v in data["hit_ratio_by_policy"].values())
    assert "nvme_write_reduction" in data and "best_vs_lru_hit_points" in data
    assert len(data["sweep"]["belady"]) == 2


def test_sim_cli_rejects_a_missing_trace(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["sim", "--trace", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 2 and "No such file" in res.output


def test_sim_cli_generate(tmp_path: Path) -> None:
    out = tmp_path / "chat.jsonl"
    res = CliRunner().invoke(app, ["sim", "--generate", "chat", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert traces.detect_format(out) == "kvrack"
