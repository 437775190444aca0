"""Page throughput of the SGLang backend against memcpy, on Llama-3-8B-shaped pages (32 layers, 8 KV heads x
128, fp16, 64-token pages: 8 MiB a page), 32 pages a batch, zero-copy calls, a private daemon:

    .venv-sglang/bin/python tests/engines/sglang_pages_bench.py      # one JSON line (best of 5 rounds)

The baseline is what ``kvrack bench local`` uses: numpy's copy of each page, in the same process, same bytes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

PAGE, LAYERS, HEADS, DIM, PAGES, ROUNDS = 64, 32, 8, 128, 32, 5


def main() -> None:
    ext = tempfile.mkdtemp(prefix="kvrack-torchext-")
    os.environ["TORCH_EXTENSIONS_DIR"] = ext
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims"))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import numpy as np
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvrack.bench.spawn import DaemonProcess

    daemon = DaemonProcess({"dram.capacity_bytes": "4GiB", "nvme.enabled": "false"})
    try:
        dev = MHATokenToKVPool(PAGES * PAGE, PAGE, torch.float16, HEADS, DIM, LAYERS, "cpu", False, start_layer=0,
                               end_layer=LAYERS - 1)
        host = MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, "page_first",
                                    pin_memory=False, device="cpu", device_capacity_tokens=dev.size, start_layer=0,
                                    end_layer=LAYERS - 1)
        host.kv_buffer.view(-1)[:] = 1
        extra = {"backend_name": "kvrack", "module_path": "kvrack.clients.sglang",
                 "class_name": "KvrackHiCacheStorage", "interface_v1": 1, "address": f"unix://{daemon.socket_path}"}
        config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                      is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                      model_name="bench", extra_config=extra)
        backend = StorageBackendFactory.create_backend("dynamic", config, host)
        backend.register_mem_pool_host(host)
        page_bytes = host.get_size_per_token() * PAGE
        total = PAGES * page_bytes
        src, dst = host.alloc(PAGES * PAGE), host.alloc(PAGES * PAGE)
        rng = np.random.default_rng(0)
        pages_in = [rng.integers(0, 255, page_bytes, dtype=np.uint8) for _ in range(PAGES)]
        pages_out = [np.ones(page_bytes, dtype=np.uint8) for _ in range(PAGES)]
        times: dict[str, list[float]] = {"set": [], "get": [], "memcpy": []}
        for r in range(ROUNDS):
            keys = [f"{r:02x}{i:062x}" for i in range(PAGES)]
            t = time.perf_counter()
            assert all(backend.batch_set_v1(keys, src))
            times["set"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert all(backend.batch_get_v1(keys, dst))
            times["get"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for page_in, page_out in zip(pages_in, pages_out):
                np.copyto(page_out, page_in)
            times["memcpy"].append(time.perf_counter() - t)
        backend.close()
    finally:
        daemon.stop()
        shutil.rmtree(ext, ignore_errors=True)
    gib = total / 2**30
    out: dict[str, Any] = {"page_mib": page_bytes / 2**20, "pages_per_batch": PAGES}
    for name, seconds in times.items():
        out[f"{name}_gib_s"] = round(gib / min(seconds), 2)
    out["set_vs_memcpy"] = round(out["set_gib_s"] / out["memcpy_gib_s"], 2)
    out["get_vs_memcpy"] = round(out["get_gib_s"] / out["memcpy_gib_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
