"""KV events against real daemons: a subscriber sees exactly the stores and removals the daemon made (evictions
by the background evictor and moves between tiers included), sequence numbers without gaps, replay after a
subscriber restarts, a restarted daemon's recovered blocks, the prefix index over two daemons, the CLI, and a
subscriber that reads nothing holding up nobody."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import zmq

from kvrack import events as E
from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client, KeyBuilder, Layout
from kvrack.clients.router import PrefixIndex, follow
from tests.conftest import eventually

LAYOUT = Layout(layers=2, kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
BLOCK = LAYOUT.block_nbytes  # 8 KiB


def events_daemon(tmp_path, name: str = "d", **extra: str) -> tuple[DaemonProcess, str, str]:
    pub, replay = f"ipc://{tmp_path}/{name}-events.ipc", f"ipc://{tmp_path}/{name}-replay.ipc"
    settings = {"dram.capacity_bytes": "4MiB", "dram.segment_bytes": "1MiB", "nvme.dir": str(tmp_path / f"{name}-nvme"),
                "nvme.capacity_bytes": "64MiB", "events.enabled": "true", "events.endpoint": pub,
                "events.replay_endpoint": replay, "events.interval_s": "0.01", **extra}
    return DaemonProcess(settings), pub, replay


def all_blocks(d: DaemonProcess, namespace: str = "default") -> dict[bytes, set[str]]:
    """Every block of the namespace and its tiers, from the admin API."""
    out: dict[bytes, set[str]] = {}
    cursor = None
    while True:
        page = d.admin().blocks(namespace, limit=1000, cursor=cursor)
        for b in page["blocks"]:
            if b["state"] == "committed":
                out[bytes.fromhex(b["key"])] = {c["tier"].upper() for c in b["copies"]}
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def quiet(d: DaemonProcess) -> None:
    """NVMe writes done and every event published."""
    def settled() -> bool:
        s = d.admin().stats()
        nvme = next(t for t in s["tiers"] if t["tier"] == "nvme")["detail"]
        return nvme["pending_writes"] == 0 and s.get("events", {}).get("pending_blocks") == 0 \
            and s["events"]["queued_batches"] == 0
    assert eventually(settled, timeout=20)
    time.sleep(0.1)


def test_a_subscriber_sees_exactly_what_the_daemon_holds_through_evictions_and_moves(tmp_path):
    d, pub, replay = events_daemon(tmp_path, **{"dram.evict_high_watermark": "0.75", "dram.evict_low_watermark": "0.5"})
    try:
        with PrefixIndex({"d": (pub, replay)}) as index:
            index.catch_up()
            with Client.connect(d.socket_path) as c:
                chains = [[os.urandom(32) for _ in range(16)] for _ in range(40)]  # 5 MiB: DRAM must evict
                for chain in chains:
                    c.put(chain, [os.urandom(BLOCK)] * 16, KeyBuilder.parents(chain))
                c.delete(chains[-1][:4])
                with c.get(chains[0][:2]):  # read back from NVMe into DRAM: a promotion
                    pass
            quiet(d)
            index.pump(quiet_s=0.5)
            truth = all_blocks(d)
            seen = {k: set(index.holds("d", "default", k)) for k in index.daemons["d"].held["default"]}
            assert seen == truth, (len(seen), len(truth))
            stats = d.admin().stats()
            assert stats["tiers"][0]["evictions"]["background"] > 0, "the background evictor ran"
            assert any(tiers == {"NVME"} for tiers in truth.values()), "some blocks left DRAM for NVMe only"
            assert stats["events"]["dropped_blocks"] == 0 and index.stats()["d"]["gaps"] == 0
    finally:
        d.stop()


def test_sequence_numbers_have_no_gaps_and_replay_serves_a_restarted_subscriber(tmp_path):
    d, pub, replay = events_daemon(tmp_path)
    try:
        with Client.connect(d.socket_path) as c:
            first = [os.urandom(32) for _ in range(8)]
            c.put(first, [b"a" * 1000] * 8)
            quiet(d)
            seen = [(seq, b) for _, seq, b in follow(pub, replay, start=0, timeout_s=0.5)]
            seqs = [s for s, _ in seen]
            assert seqs == list(range(len(seqs))) and len(seqs) >= 2, seqs
            assert isinstance(seen[0][1].events[0], E.AllBlocksCleared)  # the daemon's start comes first
            more = [os.urandom(32) for _ in range(8)]
            c.put(more, [b"b" * 1000] * 8)  # while no subscriber listens
            quiet(d)
        with PrefixIndex({"d": (pub, replay)}) as index:  # a subscriber that (re)starts now
            index.catch_up()
            index.pump()
            assert index.longest_prefix(first, "default")["d"] == 8
            assert all(index.holds("d", "default", k) == ["DRAM", "NVME"] for k in first + more)
            assert index.stats()["d"]["next_seq"] == seqs[-1] + 1 + len(list(follow(pub, replay, start=seqs[-1] + 1,
                                                                                      timeout_s=0.3)))
    finally:
        d.stop()


def test_a_restarted_daemon_clears_then_announces_what_it_recovered_and_an_index_follows_it(tmp_path):
    d, pub, replay = events_daemon(tmp_path)
    keys = [os.urandom(32) for _ in range(6)]
    gone = [os.urandom(32) for _ in range(3)]
    with PrefixIndex({"d": (pub, replay)}) as index:
        with Client.connect(d.socket_path) as c:
            c.put(keys, [b"k" * 2000] * 6)
            quiet(d)
            c.put(gone, [b"g" * 2000] * 3)
            quiet(d)
            assert c.delete(gone) == 3
        quiet(d)
        index.pump(0.3)
        assert index.longest_prefix(keys, "default") == {"d": 6}
        caught_up = PrefixIndex({"d": (pub, replay)})  # knows the run from its replay only, then reads nothing
        caught_up.catch_up()
        assert caught_up.longest_prefix(keys, "default") == {"d": 6} and caught_up.stats()["d"]["complete"]
        assert d.stop() == 0
        d2, pub, replay = events_daemon(tmp_path)
        try:
            batches = [b for _, _, b in follow(pub, replay, start=0, timeout_s=0.5)]
            events = [ev for b in batches for ev in b.events]
            assert isinstance(events[0], E.AllBlocksCleared) and events[0].namespace == "default"
            # the clears go out in batches of their own, before any recovered block of any namespace
            assert all(isinstance(ev, E.AllBlocksCleared) for ev in batches[0].events)
            recovered = {k for ev in events if isinstance(ev, E.BlockStored) and ev.medium == "NVME" for k in
                         ev.block_hashes}
            assert recovered == set(keys)
            d2.stop()
            # a third run on an empty NVMe tier: the index drops the old run's blocks (a new epoch, numbers from 0)
            # and takes the new run's, those published before it reconnected included (its replay)
            d2, pub, replay = events_daemon(tmp_path, **{"nvme.dir": str(tmp_path / "empty-nvme")})
            fresh: list[bytes] = []
            with Client.connect(d2.socket_path) as c:
                for _ in range(50):  # until the subscription is back (ZMQ reconnects on its own)
                    fresh.append(os.urandom(32))
                    c.put(fresh[-1:], [b"f" * 2000])
                    quiet(d2)
                    index.pump(0.1)
                    if index.longest_prefix(fresh[-1:], "default") == {"d": 1}:
                        break
            s = index.stats()["d"]
            assert s["restarts"] == 1 and s["gaps"] == 0 and s["complete"], s
            assert index.longest_prefix(keys, "default") == {"d": 0}
            assert all("DRAM" in index.holds("d", "default", k) for k in fresh)
            with caught_up, Client.connect(d2.socket_path) as c:  # two runs later: it tells them from its own run
                for _ in range(50):  # until its subscription is back too
                    fresh.append(os.urandom(32))
                    c.put(fresh[-1:], [b"f" * 2000])
                    quiet(d2)
                    caught_up.pump(0.1)
                    if caught_up.longest_prefix(fresh[-1:], "default") == {"d": 1}:
                        break
                assert caught_up.stats()["d"]["restarts"] >= 1
                assert caught_up.longest_prefix(keys, "default") == {"d": 0}
                assert caught_up.longest_prefix(fresh, "default") == {"d": len(fresh)}
        finally:
            d2.stop()


def test_the_prefix_index_answers_for_two_daemons_and_kvrack_route_says_the_same(tmp_path):
    a, pub_a, rep_a = events_daemon(tmp_path, "a")
    b, pub_b, rep_b = events_daemon(tmp_path, "b")
    try:
        tokens = list(range(1000, 1000 + 16 * 10))
        with Client.connect(a.socket_path) as ca, Client.connect(b.socket_path) as cb:
            assert ca.namespace_salt == cb.namespace_salt  # the same namespace name: the same salt
            keys = KeyBuilder(ca.namespace_salt, "test-model", LAYOUT).chain(tokens)
            ca.put(keys, [os.urandom(BLOCK)] * 10, KeyBuilder.parents(keys))
            cb.put(keys[:4], [os.urandom(BLOCK)] * 4, KeyBuilder.parents(keys[:4]))
            salt = ca.namespace_salt.hex()
        quiet(a)
        quiet(b)
        with PrefixIndex({"a": (pub_a, rep_a), "b": (pub_b, rep_b)}) as index:
            index.catch_up()
            index.pump()
            assert index.longest_prefix(keys) == {"a": 10, "b": 4}
            assert index.best(keys) == ("a", 10)
            assert index.best(keys[4:]) == ("a", 6)
            other = KeyBuilder(bytes.fromhex(salt), "test-model", LAYOUT).chain(tokens, salt="tenant-x")
            assert index.best(other) == (None, 0), "a request's cache_salt makes other keys"
        (tmp_path / "tokens.json").write_text(json.dumps(tokens))
        res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "route", "--tokens", str(tmp_path / "tokens.json"),
                              "--daemon", f"a={pub_a},{rep_a}", "--daemon", f"b={pub_b},{rep_b}", "--model", "test-model",
                              "--layout", "layers=2,kv_heads=2,head_dim=64,dtype=float16,block_tokens=16",
                              "--salt", salt, "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert (out["best"], out["best_blocks"], out["best_tokens"]) == ("a", 10, 160)
        assert out["daemons"]["b"]["prefix_blocks"] == 4 and out["daemons"]["b"]["index"]["gaps"] == 0
    finally:
        a.stop()
        b.stop()


def test_kvrack_events_tails_the_events(tmp_path):
    d, pub, replay = events_daemon(tmp_path)
    try:
        with Client.connect(d.socket_path) as c:
            keys = [os.urandom(32) for _ in range(3)]
            c.put(keys, [b"e" * 500] * 3, KeyBuilder.parents(keys))
        quiet(d)
        res = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "events", pub, "--replay", replay, "--from", "0",
                              "--seconds", "0.5", "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        lines = [json.loads(line) for line in res.stdout.splitlines()]
        stored = [ev for ev in lines if ev["type"] == "BlockStored" and ev["medium"] == "DRAM"]
        assert stored and stored[0]["block_hashes"] == [k.hex() for k in keys] and stored[0]["namespace"] == "default"
        human = subprocess.run([sys.executable, "-m", "kvrack.cli.main", "events", pub, "--replay", replay, "--from",
                                "0", "--seconds", "0.5"], capture_output=True, text=True, timeout=60)
        assert "stored  DRAM 3 block(s)" in human.stdout and "cleared default" in human.stdout
    finally:
        d.stop()


def test_a_subscriber_that_reads_nothing_holds_up_nobody(tmp_path):
    d, pub, replay = events_daemon(tmp_path)
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(pub)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with Client.connect(d.socket_path) as c:
            for _ in range(200):
                keys = [os.urandom(32) for _ in range(16)]
                assert c.put(keys, [b"s" * 1000] * 16).stored == 16
        quiet(d)
        ev = d.admin().stats()["events"]
        assert ev["published_batches"] + ev["unsent_batches"] + ev["dropped_batches"] == ev["next_seq"] and ev["pending_blocks"] == 0
    finally:
        stuck.close(linger=0)
        d.stop()


def _publish_all(tmp_path, name: str, blocks: int, **limits: int) -> tuple[dict, list[int], int]:
    """A publisher given ``blocks`` removals in three namespaces, then closed: its stats, the sequence numbers a
    subscriber got, and the blocks in them."""
    from kvrack.daemon.events import EventPublisher

    endpoint = f"ipc://{tmp_path}/{name}.ipc"
    pub = EventPublisher(endpoint, max_batch_events=100, **limits)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        time.sleep(0.3)  # the subscription reaches the publisher before anything is sent
        for i in range(blocks):
            pub.removed_key(f"ns{i % 3}", i.to_bytes(32, "big"), 3)
        pub.close()
        stats = pub.stats()
        seqs, got = [], 0
        while sub.poll(500):
            _, seq, payload = sub.recv_multipart()
            seqs.append(E.seq_of(seq))
            got += sum(len(ev.block_hashes) for ev in E.decoder.decode(payload).events)
        return stats, seqs, got
    finally:
        sub.close(linger=0)


def test_closing_publishes_every_pending_event_and_full_queues_and_rate_limits_leave_gaps_subscribers_see(tmp_path):
    stats, seqs, got = _publish_all(tmp_path, "all", 20_000)
    assert got == 20_000 and stats["published_blocks"] == 20_000 and stats["pending_blocks"] == 0
    assert seqs == list(range(stats["next_seq"])) and stats["dropped_batches"] == 0
    # a queue of one batch: whatever the publisher thread did not take in time is dropped, and its numbers are gaps
    stats, seqs, got = _publish_all(tmp_path, "few", 20_000, max_queued_batches=1)
    assert stats["dropped_batches"] > 0
    missing = set(range(stats["next_seq"])) - set(seqs)
    assert len(missing) == stats["dropped_batches"] and got + stats["dropped_blocks"] == 20_000
    # a rate limit of 1,000 block events a second (a second's burst): the first 1,000 go out, the rest are gaps
    stats, seqs, got = _publish_all(tmp_path, "rate", 20_000, max_blocks_per_s=1000)
    assert got == 1000 and stats["rate_limited_blocks"] == 19_000 and stats["dropped_batches"] == 0
    assert len(set(range(stats["next_seq"])) - set(seqs)) == stats["rate_limited_batches"] > 0


def test_an_event_batch_reads_back_with_vllms_field_set(tmp_path):
    """vLLM's decoder requires every BlockStored field without a default, lora_name included: always sent."""
    batch = E.KVEventBatch(1.0, [E.BlockStored(block_hashes=[b"k" * 32], parent_block_hash=None, token_ids=[],
                                               block_size=0, lora_id=None, medium="DRAM", lora_name=None,
                                               namespace="default", block_bytes=[10])])
    raw = E.encoder.encode(batch)
    import msgspec

    plain = msgspec.msgpack.decode(raw)
    assert {"lora_name", "lora_id", "medium", "token_ids", "block_size", "parent_block_hash"} <= set(plain[1][0])
    assert E.decoder.decode(raw) == batch
