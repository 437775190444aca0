"""``kvrack bench e2e``: time to first token through vLLM's OpenAI-compatible server, as users run it.

One vLLM server (streaming ``/v1/completions``, prompts as token ids) with kvrack's connector, and a private
kvrackd with a DRAM and an NVMe tier. For each prompt length:

- recompute: a prompt no cache has seen (vLLM computes it; the connector saves its blocks);
- DRAM hit: the same prompt after vLLM's own prefix cache is reset, so the prefix comes from kvrack's DRAM;
- NVMe hit: the same again after kvrackd restarted (DRAM cold, the blocks on its NVMe tier).

TTFT is the time to the first streamed token. The connector's event log says how long each load took (the
share of TTFT spent in kvrack) and how many bytes a token's KV is. Greedy tokens are compared across the three
(float32 model). Every loop is bounded; the server and the daemon are started and stopped here.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kvrack.bench.spawn import DaemonProcess, free_port, terminate
from kvrack.bench.targets import check_targets
from kvrack.bench.vllm_model import ModelShape, build_model, connector_config, describe, prompt

LENGTHS = (512, 2048, 4096, 8192)
TARGETS = {"ttft_hit_vs_recompute_4k": ("<=", 0.2), "prompt_tokens_loaded_share_4k": (">=", 0.9)}


class ServerFailed(RuntimeError):
    """The vLLM server exited while starting; the message holds the error its log ends with."""


def failure(log_path: str) -> str:
    """The last error line of a server log (what made it exit)."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return "(no log)"
    errors = [ln.strip() for ln in lines if re.search(r"\b\w*(Error|Exception): ", ln)]
    # a failed engine core logs the cause first, then generic lines pointing back at it
    causes = [ln for ln in errors if "See root cause" not in ln and "initialization failed" not in ln]
    found = causes or errors
    return found[-1][-400:] if found else (lines[-1][-400:] if lines else "(empty log)")


class Server:
    """vLLM's OpenAI-compatible server on a local port, in a process of its own."""

    def __init__(self, model: str, kv_transfer_config: dict[str, Any] | None, port: int, log_path: str,
                 timeout: float = 600.0, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.port = port
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", "float32", "--block-size", "32", "--max-model-len", "16384",
                "--max-num-batched-tokens", "16384", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
                "--enable-prefix-caching", "--enable-prompt-tokens-details", "--enforce-eager", *extra_args]
        if kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise ServerFailed(f"the vLLM server exited with {self.proc.returncode}: {failure(log_path)}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    self.model = json.loads(self.request("GET", "/v1/models")[1])["data"][0]["id"]
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the vLLM server did not come up in {timeout} s; see {log_path}")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def reset_prefix_cache(self) -> None:
        status, body = self.request("POST", "/reset_prefix_cache")
        if status != 200:
            raise RuntimeError(f"reset_prefix_cache answered {status}: {body[:200]!r}")

    def complete(self, tokens: list[int], max_tokens: int = 8) -> dict[str, Any]:
        """One streamed completion: TTFT, the greedy tokens, and the prompt tokens vLLM did not compute."""
        body = {"model": self.model, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        ttft = None
        out: list[int] = []
        usage: dict[str, Any] = {}
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"completion answered {resp.status}: {resp.read()[:300]!r}")
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    if ttft is None and (ids or choice.get("text")):
                        ttft = time.perf_counter() - t0
                    out.extend(ids)
        finally:
            conn.close()
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        return {"ttft_s": ttft, "tokens": out[:max_tokens], "cached_tokens": cached}

    def stop(self) -> None:
        terminate(self.proc, 60, group=True)
        self.log.close()


def _loads_since(path: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The connector's load events written after byte ``offset`` of its event log, and the new offset."""
    try:
        with open(path) as fh:
            fh.seek(offset)
            text = fh.read()
            return [e for e in map(json.loads, filter(None, text.splitlines())) if e.get("event") == "load"], \
                offset + len(text.encode())
    except FileNotFoundError:
        return [], offset


def run(lengths: list[int], repeats: int = 2, model_dir: str | None = None,
        progress: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """Every figure of the benchmark (see the module's docstring)."""
    shape = ModelShape()
    model = build_model(model_dir or os.path.join(tempfile.gettempdir(), "kvrack-e2e-model"), shape)
    work = tempfile.mkdtemp(prefix="kvrack-bench-e2e-")
    events = os.path.join(work, "connector.jsonl")
    settings = {"dram.capacity_bytes": "2GiB", "nvme.dir": os.path.join(work, "nvme"), "nvme.capacity_bytes": "4GiB"}
    socket_path = os.path.join(work, "kvrack.sock")
    out: dict[str, Any] = {"model": describe(shape), "lengths": {}, "repeats": repeats, "cpu_count": os.cpu_count(),
                           "server": "vllm OpenAI-compatible server, streaming /v1/completions, enforce_eager, float32"}
    daemon = DaemonProcess(settings, socket_path=socket_path)
    server = None
    try:
        import vllm

        out["vllm_version"] = vllm.__version__
        progress("starting the vLLM server")
        config = connector_config(f"unix://{socket_path}", "kv_both",
                                  **{"kvrack.stats_path": events, "kvrack.retry_s": 0.2})
        server = Server(model, config, free_port(), os.path.join(work, "vllm.log"))
        server.complete(prompt(64, 999), max_tokens=2)  # warm-up
        offset = _loads_since(events, 0)[1]
        prompts = {n: prompt(n, 10_000 + n) for n in lengths}
        for n in lengths:
            progress(f"{n} tokens: recompute")
            r: dict[str, Any] = {"recompute": [], "dram_hit": [], "nvme_hit": []}
            for i in range(repeats):  # fresh prompts of the same length: nothing cached anywhere
                r["recompute"].append(server.complete(prompt(n, 20_000 + 100 * n + i)))
            first = server.complete(prompts[n])  # computed, and saved by the connector
            r["recompute"].append(first)
            offset = _loads_since(events, offset)[1]
            progress(f"{n} tokens: from kvrack's DRAM")
            for _ in range(repeats + 1):
                server.reset_prefix_cache()
                hit = server.complete(prompts[n])
                hit["loads"], offset = _loads_since(events, offset)
                r["dram_hit"].append(hit)
            out["lengths"][str(n)] = r
        for rep in range(repeats):  # blocks come from NVMe only after a restart empties DRAM
            progress(f"restarting kvrackd (DRAM cold), pass {rep + 1}")
            daemon.stop()
            daemon = DaemonProcess(settings, socket_path=socket_path)
            for i in range(2):  # the connector's two sides find the old connection gone, then reconnect
                time.sleep(0.3)  # past the connector's retry interval
                server.complete(prompt(96, 30_000 + 10 * rep + i), max_tokens=2)
            offset = _loads_since(events, offset)[1]
            for n in lengths:
                server.reset_prefix_cache()
                hit = server.complete(prompts[n])
                hit["loads"], offset = _loads_since(events, offset)
                out["lengths"][str(n)]["nvme_hit"].append(hit)
    finally:
        if server is not None:
            server.stop()
        daemon.stop()
    _summarise(out, lengths)
    out["targets"] = {name: bound for name, (_op, bound) in TARGETS.items()}
    out["checks"] = check_targets(out, TARGETS)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


def _summarise(out: dict[str, Any], lengths: list[int]) -> None:
    identical = True
    for n in lengths:
        r = out["lengths"][str(n)]
        reference = r["recompute"][-1]["tokens"]
        for case in ("recompute", "dram_hit", "nvme_hit"):
            runs = r[case]
            ttfts = [x["ttft_s"] for x in runs if x["ttft_s"] is not None]
            r[f"{case}_ttft_s"] = round(statistics.median(ttfts), 4) if ttfts else None
            if case != "recompute":
                identical &= all(x["tokens"] == reference for x in runs)
                loads = [e for x in runs for e in x.get("loads", [])]
                r[f"{case}_loaded_tokens"] = statistics.median([sum(e["tokens"] for e in x.get("loads", []))
                                                                for x in runs]) if runs else 0
                r[f"{case}_cached_tokens"] = statistics.median([x["cached_tokens"] for x in runs]) if runs else 0
                seconds = [sum(e["seconds"] for e in x.get("loads", [])) for x in runs]
                r[f"{case}_kvrack_s"] = round(statistics.median(seconds), 4) if seconds else None
                r[f"{case}_kvrack_share_of_ttft"] = round(r[f"{case}_kvrack_s"] / r[f"{case}_ttft_s"], 4) \
                    if r[f"{case}_ttft_s"] and r[f"{case}_kvrack_s"] is not None else None
                total_tokens = sum(e["tokens"] for e in loads)
                r[f"{case}_bytes_per_token"] = round(sum(e["bytes"] for e in loads) / total_tokens) \
                    if total_tokens else None
        base = r["recompute_ttft_s"]
        r["dram_hit_vs_recompute"] = round(r["dram_hit_ttft_s"] / base, 4) if base and r["dram_hit_ttft_s"] else None
        r["nvme_hit_vs_recompute"] = round(r["nvme_hit_ttft_s"] / base, 4) if base and r["nvme_hit_ttft_s"] else None
        r["prompt_tokens_loaded_share"] = round(r["dram_hit_loaded_tokens"] / n, 4)
    out["greedy_tokens_identical"] = identical
    four = out["lengths"].get("4096")
    if four is not None:
        out["ttft_hit_vs_recompute_4k"] = four["dram_hit_vs_recompute"]
        out["ttft_nvme_hit_vs_recompute_4k"] = four["nvme_hit_vs_recompute"]
        out["prompt_tokens_loaded_share_4k"] = four["prompt_tokens_loaded_share"]
