"""kvrack as SGLang's HiCache L3 backend, with SGLang's own classes on CPU and a real kvrackd: `make test-sglang`.

SGLang 0.5.23 builds its host memory pool, its HiCache controller and its radix tree on CPU (device<->host page
moves need its CUDA kernels, so no request runs end to end here; docs/sglang.md says what ran). The backend is
created the way SGLang creates it: ``StorageBackendFactory.create_backend("dynamic", ...)`` from the extra config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest

if importlib.util.find_spec("torchvision") is None:  # SGLang's pools import its multimodal configs, and so torchvision
    sys.path.insert(0, str(Path(__file__).with_name("shims")))
sglang = pytest.importorskip("sglang", reason="the SGLang tests run in their own environment: make test-sglang")

# made once the module runs (a skipped module must leave no folder behind); removed by the module's fixture
_TORCH_EXT = tempfile.mkdtemp(prefix="kvrack-sglang-ext-")  # SGLang JIT-builds its page hash here
os.environ["TORCH_EXTENSIONS_DIR"] = _TORCH_EXT

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from kvrack.bench.spawn import DaemonProcess  # noqa: E402
from kvrack.clients import Client  # noqa: E402
from kvrack.clients.sglang import KvrackHiCacheStorage, shard_identity  # noqa: E402
from tests.conftest import eventually  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
PAGE, HEADS, DIM, LAYERS = 4, 2, 8, 3
LAYOUTS = ["page_first", "page_first_direct", "layer_first", "page_head"]


def teardown_module() -> None:
    shutil.rmtree(_TORCH_EXT, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess({"dram.capacity_bytes": "256MiB"})
    yield d
    d.stop()


def host_pool(layout: str = "page_first", tokens: int = 64) -> MHATokenToKVPoolHost:
    """SGLang's MHA host pool (unpinned: pinning needs CUDA), filled with random pages."""
    dev = MHATokenToKVPool(tokens, PAGE, torch.float16, HEADS, DIM, LAYERS, "cpu", False, start_layer=0,
                           end_layer=LAYERS - 1)
    host = MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=dev.size, start_layer=0, end_layer=LAYERS - 1)
    host.kv_buffer.view(-1)[:] = torch.randn(host.kv_buffer.numel()).half()
    return host


def extra_config(daemon: DaemonProcess, **more: object) -> dict:
    return {"backend_name": "kvrack", "module_path": "kvrack.clients.sglang", "class_name": "KvrackHiCacheStorage",
            "interface_v1": 1, "address": f"unix://{daemon.socket_path}", "retry_s": 0.2, **more}


def storage_config(extra: dict, tp_rank: int = 0, tp_size: int = 1, mla: bool = False, model: str = "org/model",
                   layout: str = "page_first") -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=True,
                                is_page_first_layout=layout == "page_first", model_name=model, extra_config=extra)


def backend(host: MHATokenToKVPoolHost, extra: dict, **config: object) -> KvrackHiCacheStorage:
    """Created as SGLang creates a dynamic backend, then given its host pool as the controller does."""
    be = StorageBackendFactory.create_backend("dynamic", storage_config(extra, layout=host.layout, **config), host)
    assert isinstance(be, KvrackHiCacheStorage)
    be.register_mem_pool_host(host)
    be.on_host_pools_registered()
    return be


def pages(host: MHATokenToKVPoolHost, indices: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [host.get_data_page(int(indices[i * PAGE]), flat=True).clone() for i in range(n)]


def chain(first: int, n: int, salt: str | None = None) -> list[str]:
    """SGLang's own page hashes of n pages of tokens."""
    tokens = list(range(first, first + n * PAGE))
    if salt is None:
        return get_hash_str(tokens, None, page_size=PAGE)
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    return get_storage_hash_str(RadixKey(tokens, extra_key=None, cache_salt=salt), None, page_size=PAGE)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_method_of_the_interface_against_a_real_daemon(daemon, layout):
    host = host_pool(layout)
    be = backend(host, extra_config(daemon))
    n = 5
    keys = chain(1000 + 100 * LAYOUTS.index(layout), n)
    src = host.alloc(n * PAGE)
    want = pages(host, src, n)
    # existence: the whole span in one call, the leading run
    assert be.batch_exists(keys) == 0 and be.exists(keys[0]) is False
    assert be.batch_set_v1(keys[:3], src[: 3 * PAGE], HiCacheStorageExtraInfo(prefix_keys=[])) == [True] * 3
    assert be.batch_exists(keys) == 3 and be.exists(keys[2]) and not be.exists(keys[3])
    # zero copy: the three held pages are not sent again, the two new ones are
    stored_before = be.stats()["stored_pages"]
    assert be.batch_set_v1(keys, src, HiCacheStorageExtraInfo(prefix_keys=[])) == [True] * n
    assert be.batch_exists(keys) == n and be.stats()["stored_pages"] == stored_before + n
    dst = host.alloc(n * PAGE)
    assert be.batch_get_v1(keys, dst) == [True] * n
    assert all(torch.equal(a, b) for a, b in zip(want, pages(host, dst, n))), "bit-exact into other host slots"
    assert be.batch_get_v1(keys[:2] + ["ab" * 32], host.alloc(3 * PAGE)) == [True, True, False]
    # flat pages (the legacy calls): another TP rank's shard, so other keys
    other = backend(host, extra_config(daemon), tp_rank=1, tp_size=2)
    assert other.batch_exists(keys) == 0
    assert other.batch_set(keys, [host.get_data_page(int(src[i * PAGE])) for i in range(n)]) is True
    outs = other.batch_get(keys, [host.get_dummy_flat_data_page() for _ in keys])
    assert all(o is not None and torch.equal(o, w) for o, w in zip(outs, want))
    fresh = other.batch_get(keys[:1])[0]  # no target: a new tensor of the page's bytes
    # SGLang's prefetch, transfer and backup threads call at once: each has its own connection
    found: list[int] = []
    threads = [threading.Thread(target=lambda: found.append(be.batch_exists(keys))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [n] * 4 and len(be._links) >= 5
    assert fresh is not None and bytes(fresh.numpy()) == bytes(want[0].view(torch.uint8).numpy())
    one = chain(5000 + LAYOUTS.index(layout), 1)[0]
    assert other.get(one) is None and other.set(one, want[1]) is True
    target = host.get_dummy_flat_data_page()
    assert other.get(one, target) is target and torch.equal(target, want[1])
    if layout != "layer_first":  # a page's zero-copy pieces, in order, are its flat page: v1 and legacy agree
        assert be.batch_get([keys[0]], [host.get_dummy_flat_data_page()])[0].equal(want[0])
    # per-pool calls (hybrid models): a sidecar pool registered under its own name, its pages under their own keys
    side = host_pool(layout)
    be.register_mem_host_pool_v2(side, PoolName.SWA)
    sidx = side.alloc(2 * PAGE)
    swant = pages(side, sidx, 2)
    tail = PoolTransfer(name=PoolName.SWA, host_indices=sidx, keys=keys[3:5], hit_policy=PoolHitPolicy.TRAILING_PAGES)
    assert be.batch_set_v2([tail]) == {"swa": [True, True]}
    result = be.batch_exists_v2(keys, [tail])
    assert result.kv_hit_pages == n and result.extra_pool_hit_pages == {"kv": n, "swa": n}
    assert result.restorable_prefix_pages == [n]
    all_pages = PoolTransfer(name=PoolName.SWA, host_indices=sidx, keys=keys[:2], hit_policy=PoolHitPolicy.ALL_PAGES)
    assert be.batch_exists_v2(keys, [all_pages]).kv_hit_pages == 0, "pages 0 and 1 of the sidecar are not held"
    back = side.alloc(2 * PAGE)
    got = be.batch_get_v2([PoolTransfer(name=PoolName.SWA, host_indices=back, keys=keys[3:5])])
    assert got == {"swa": [True, True]} and all(torch.equal(a, b) for a, b in zip(swant, pages(side, back, 2)))
    # metrics for SGLang's storage collector, then nothing until the next transfer
    metrics = be.get_stats()
    assert metrics.backup_pgs and metrics.prefetch_pgs and all(b > 0 for b in metrics.prefetch_bandwidth)
    assert be.get_stats().backup_pgs == []
    with pytest.raises(PermissionError, match="allow_clear"):  # a shared namespace is not one engine's to clear
        be.clear()
    assert be.batch_exists(keys) == n
    be.close()
    other.close()
    assert be.batch_exists(keys) == 0, "closed: misses, never an error"


def test_pages_keep_their_chain_parents_and_each_shard_its_own_keys(daemon):
    host = host_pool()
    ns = "default"
    be = backend(host, extra_config(daemon))
    keys = chain(2000, 6)
    src = host.alloc(6 * PAGE)
    assert be.batch_set_v1(keys[:2], src[: 2 * PAGE], HiCacheStorageExtraInfo(prefix_keys=[])) == [True, True]
    # the controller passes the hashes before a batch (hicache_storage_pass_prefix_keys): the chain continues
    assert be.batch_set_v1(keys[2:], src[2 * PAGE:], HiCacheStorageExtraInfo(prefix_keys=keys[:2])) == [True] * 4
    kv = be.kvrack_keys(keys)
    admin = daemon.admin()
    parents = [admin.block(ns, k.hex())["parent"] for k in kv]
    assert parents == [None] + [k.hex() for k in kv[:-1]]
    # other ranks, models and layouts hold other bytes for the same tokens: other keys
    variants = [backend(host, extra_config(daemon), tp_rank=1, tp_size=2),
                backend(host, extra_config(daemon), model="org/other"),
                backend(host_pool("page_head"), extra_config(daemon))]
    assert len({tuple(v.kvrack_keys(keys)) for v in variants} | {tuple(kv)}) == 4
    for v in variants:
        assert v.batch_exists(keys) == 0
        v.close()
    # MLA pages are the same on every TP rank: one key for all, and only the writing rank stores
    mla = [storage_config({}, tp_rank=r, tp_size=2, mla=True) for r in (0, 1)]
    assert shard_identity(mla[0]) == shard_identity(mla[1]) and mla[1].is_storage_writer is False
    reader = StorageBackendFactory.create_backend("dynamic", storage_config(
        extra_config(daemon), tp_rank=1, tp_size=2, mla=True), host)
    reader.register_mem_pool_host(host)
    mla_keys = chain(2100, 2)
    assert reader.batch_set_v1(mla_keys, src[: 2 * PAGE]) == [True, True]
    with Client.connect(daemon.socket_path) as c:
        assert c.lookup(reader.kvrack_keys(mla_keys)).hits == 0, "a non-writing rank stores nothing"
    reader.close()
    be.close()


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """What SGLang's scheduler sets up before it builds a cache controller: its parallel context and a TP group
    (gloo, one rank)."""
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0)
    path = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def controller(host: MHATokenToKVPoolHost, group, extra: dict):
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    dev = MHATokenToKVPool(64, PAGE, torch.float16, HEADS, DIM, LAYERS, "cpu", False, start_layer=0,
                           end_layer=LAYERS - 1)
    alloc = PagedTokenToKVPoolAllocator(64, PAGE, torch.float16, "cpu", dev, need_sort=False)
    return HiCacheController(alloc, host, PAGE, tp_group=group, load_cache_event=threading.Event(),
                             write_policy="write_through", io_backend="direct", storage_backend="dynamic",
                             prefetch_threshold=PAGE, model_name="org/model", storage_backend_extra_config=dict(extra))


def test_sglangs_controller_backs_up_pages_that_another_engine_prefetches(daemon, process_group):
    from sglang.srt.managers.cache_controller import PrefetchOperation

    extra = extra_config(daemon)
    writer_host, reader_host = host_pool(), host_pool()
    writer = controller(writer_host, process_group, extra)
    reader = controller(reader_host, process_group, extra)
    try:
        assert type(writer.storage_backend).__name__ == "KvrackHiCacheStorage"
        assert writer.page_set_func.__name__ == "_page_set_zero_copy", "interface_v1 selects the zero-copy calls"
        tokens = list(range(3000, 3000 + 6 * PAGE))
        hashes = get_hash_str(tokens, None, page_size=PAGE)
        src = writer_host.alloc(len(tokens))
        want = pages(writer_host, src, 6)
        writer.write_storage(src, tokens, hashes, None)  # the backup thread stores the pages
        ack = writer.ack_backup_queue.get(timeout=30)
        assert ack.completed_tokens == len(tokens)
        # the other engine: the prefetch thread's hit query, then the page transfer into its host pool
        op = PrefetchOperation("req", tokens, None, None)
        found, hit_tokens = reader._storage_hit_query(op)
        assert hit_tokens == len(tokens) and found == hashes
        op.hash_value = found
        op.host_indices = reader_host.alloc(hit_tokens)
        assert reader._page_transfer(op) == 6
        assert all(torch.equal(a, b) for a, b in zip(want, pages(reader_host, op.host_indices, 6)))
        assert reader.storage_backend.stats()["got_pages"] == 6
    finally:
        writer.detach_storage_backend()
        reader.detach_storage_backend()


def test_sglangs_radix_cache_finds_stored_pages_per_tenant_salt(daemon, process_group, monkeypatch):
    """UnifiedRadixCache with HiCache on: its storage query hashes prompts with their cache_salt, so one tenant's
    pages are another's misses."""
    import sglang.srt.mem_cache.pool_host.common as pool_common
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    from sglang.srt.runtime_context import get_context

    monkeypatch.setattr(pool_common, "_cuda_host_register", lambda *a, **k: None)  # host pinning needs CUDA
    overrides = get_context().override_server_args(
        enable_hierarchical_cache=True, hicache_storage_backend="dynamic", hicache_mem_layout="page_first",
        hicache_storage_backend_extra_config=json.dumps(extra_config(daemon)),
        hicache_io_backend="direct", page_size=PAGE, device="cpu")
    with overrides as args:
        dev = MHATokenToKVPool(256, PAGE, torch.float16, HEADS, DIM, LAYERS, "cpu", False, start_layer=0,
                               end_layer=LAYERS - 1)
        allocator = PagedTokenToKVPoolAllocator(256, PAGE, torch.float16, "cpu", dev, need_sort=False)
        params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(8, 128, "cpu", False),
                                 token_to_kv_pool_allocator=allocator, page_size=PAGE, tp_cache_group=process_group,
                                 tree_components=(ComponentType.FULL,))
        cache = UnifiedRadixCache(params)
        cache.init_hicache(args, params)
        ctrl = cache.cache_controller
        try:
            assert type(ctrl.storage_backend).__name__ == "KvrackHiCacheStorage"
            tokens = list(range(7000, 7000 + 64 * PAGE))
            keys = chain(7000, 64, salt="tenant-A")
            src = ctrl.storage_host_pool.alloc(len(tokens))
            assert all(ctrl.storage_backend.batch_set_v1(keys, src))
            root = cache.root_node_handle(None)
            assert cache.query_storage_hit_length(root, tokens, cache_salt="tenant-A") == len(tokens)
            assert cache.query_storage_hit_length(root, tokens, cache_salt="tenant-B") == 0
            assert cache.query_storage_hit_length(root, tokens, cache_salt=None) == 0
        finally:
            ctrl.detach_storage_backend()


def test_a_daemon_that_is_down_or_stalled_costs_misses_never_errors(tmp_path):
    socket_path = str(tmp_path / "kvrack.sock")
    host = host_pool()
    extra = {"backend_name": "kvrack", "module_path": "kvrack.clients.sglang", "class_name": "KvrackHiCacheStorage",
             "interface_v1": 1, "address": f"unix://{socket_path}", "retry_s": 0.2, "timeout_s": 1.0}
    be = backend(host, extra)  # no daemon yet: created anyway
    keys = chain(9000, 3)
    src = host.alloc(3 * PAGE)
    assert be.batch_exists(keys) == 0
    assert be.batch_set_v1(keys, src) == [False] * 3
    assert be.batch_get_v1(keys, host.alloc(3 * PAGE)) == [False] * 3
    assert be.batch_set(keys, pages(host, src, 3)) is False and be.batch_get(keys) == [None] * 3
    d = DaemonProcess({"dram.capacity_bytes": "64MiB"}, socket_path=socket_path)
    try:
        assert eventually(lambda: be.batch_set_v1(keys, src) == [True] * 3, timeout=20), "reconnected"
        assert be.batch_exists(keys) == 3
        os.kill(d.proc.pid, signal.SIGSTOP)  # a daemon that stops answering
        try:
            assert be.batch_get_v1(keys, host.alloc(3 * PAGE)) == [False] * 3  # after timeout_s
            assert be.batch_exists(keys) == 0  # within retry_s: not even tried
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert be.stats()["daemon_errors"] >= 1
        assert eventually(lambda: be.batch_exists(keys) == 3, timeout=20), "back after the stall"
        # an operator who lets SGLang clear the namespace: through the admin API found beside the data socket
        clearing = backend(host, {**extra, "allow_clear": True})
        clearing.clear()
        assert be.batch_exists(keys) == 0
        clearing.close()
    finally:
        be.close()
        d.stop()
