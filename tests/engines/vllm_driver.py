"""A vLLM engine in one process, driven by JSON lines on stdin, one JSON line of result each on stdout.

The engine runs in-process (no EngineCore or Worker subprocess), so the driver can reach the connector's two
sides: the scheduler's through the engine, the worker's through vLLM's KV transfer group.

    python vllm_driver.py '{"model": DIR, "kv_transfer_config": {...} or null}'
    stdin:  {"op": "generate", "prompts": [{"len": 1024, "seed": 1, "salt": "a"}], "max_tokens": 8}
            {"op": "stats"} | {"op": "loaded_pages"} | {"op": "reset_prefix_cache"} | {"op": "quit"}
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# results go to the original stdout; everything else anything prints (vLLM's logs included) to stderr
RESULTS = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def main() -> None:
    config = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from kvrack.bench.vllm_model import engine_args, prompt

    llm = LLM(**engine_args(config["model"], config.get("kv_transfer_config"), distributed_executor_backend="uni",
                            **config.get("engine", {})))
    out = RESULTS
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "generate":
            prompts = [TokensPrompt(prompt_token_ids=p.get("tokens") or prompt(p["len"], p["seed"]),
                                    **({"cache_salt": p["salt"]} if p.get("salt") else {}))
                       for p in cmd["prompts"]]
            params = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 8), ignore_eos=True)
            result = [{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens,
                       "ttft": o.metrics.first_token_latency if o.metrics else None}
                      for o in llm.generate(prompts, params, use_tqdm=False)]
        elif op == "stats":
            scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector
            worker = get_kv_transfer_group() if has_kv_transfer_group() else None
            result = {"scheduler": scheduler.stats() if scheduler else None, "worker": worker.stats() if worker else None}
        elif op == "loaded_pages":  # sha256 of the pages of every block the worker loaded, by key
            worker = get_kv_transfer_group()
            result = {key.hex(): hashlib.sha256(b"".join(bytes(p) for p in worker.paged.block(block).parts)).hexdigest()
                      for key, block in worker.loaded}
        elif op == "reset_prefix_cache":
            result = llm.reset_prefix_cache()
        else:
            result = {"error": f"unknown op {op}"}
        out.write(json.dumps({"op": op, "result": result}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
