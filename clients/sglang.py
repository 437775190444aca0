"""kvrack as SGLang's HiCache L3 storage backend (``HiCacheStorage``).

Selected through SGLang's dynamic backend option (docs/sglang.md)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "kvrack", "module_path": "kvrack.clients.sglang",
        "class_name": "KvrackHiCacheStorage", "interface_v1": 1, "address": "unix:///run/kvrack/kvrack.sock"}'

A HiCache page is one kvrack block. Its key is SGLang's page hash (a SHA-256 chain over the page tokens, the
request's ``cache_salt`` and ``extra_key`` folded in from the first page) hashed again with the shard identity:
model, attention TP rank and size (MHA; MLA pages are the same on every rank), pipeline and context-parallel
ranks, the host pool's layout, dtype and geometry, and the namespace's salt. Ranks that hold different bytes
never share a key; every engine with the same shard shares every page.

With ``interface_v1`` the pages move between kvrack's shared memory and HiCache's host pool with one copy each
way, straight from and into the pool's page memory (``get_page_buffer_meta``); the legacy calls copy flat page
tensors. Each page's parent is the page before it, so the daemon evicts chains from their leaves.

Nothing here fails an SGLang request: a daemon that is down or slow reads as misses (SGLang recomputes) and
failed writes as False (SGLang keeps the pages in host memory only).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import blake3
import torch

try:
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
        PoolHitPolicy,
        PoolName,
        PoolTransfer,
        PoolTransferResult,
    )
except ImportError as exc:  # pragma: no cover - used inside SGLang only
    raise ImportError(f"kvrack.clients.sglang is SGLang's HiCache backend and needs sglang ({exc}); "
                      "see docs/sglang.md") from exc

from kvrack.clients.blocks import Pieces
from kvrack.clients.client import Client
from kvrack.clients.link import Link
from kvrack.protocol import ErrorCode

log = logging.getLogger("kvrack.clients.sglang")

_KEY_TAG = b"kvrack-sglang-v1"
_LEN = struct.Struct("<Q")
# a put that returns these stored the page (or it is stored already, or another engine is storing the same bytes)
_STORED = {int(ErrorCode.OK), int(ErrorCode.ALREADY_EXISTS), int(ErrorCode.IN_PROGRESS)}
_T = TypeVar("_T")

DEFAULTS: dict[str, Any] = {
    "address": None,  # the kvrack client's search when unset: $KVRACK_ADDRESS, /run/kvrack/kvrack.sock, ...
    "namespace": "default",
    "token": "",
    "timeout_s": 5.0,  # a call slower than this counts as a failure (misses, recompute)
    "retry_s": 5.0,  # after a failure, the next connection attempt
    "salt": "",  # a deployment's own tag: engines with different salts share nothing
    "allow_clear": False,  # SGLang's "clear the storage backend" drops the whole namespace (through the admin API)
    "admin": None,  # the admin endpoint for that; found beside the data socket when unset
}


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _hash_bytes(page_hash: str) -> bytes:
    """SGLang's hex page hash as its 32 bytes; any other key string as its UTF-8 bytes."""
    if len(page_hash) == 64:
        try:
            return bytes.fromhex(page_hash)
        except ValueError:
            pass
    return page_hash.encode()


def shard_identity(config: HiCacheStorageConfig | None) -> str:
    """What makes one rank's page bytes differ from another's for the same tokens."""
    if config is None:
        return "single"
    parts = [f"model={config.model_name or ''}"]
    if not config.is_mla_model:
        parts.append(f"tp={config.tp_rank}/{config.tp_size}")
    if config.pp_size > 1:
        parts.append(f"pp={config.pp_rank}/{config.pp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp={config.attn_cp_rank}/{config.attn_cp_size}")
    if getattr(config, "dcp_size", 1) > 1:
        parts.append(f"dcp={config.dcp_rank}/{config.dcp_size}")
    return ",".join(parts)


def pool_identity(pool: Any, name: str) -> str:
    """The host pool's byte layout of a page: same identity, same bytes for the same tokens."""
    dtype = getattr(pool, "dtype", None)
    fields = [f"pool={name}", type(pool).__name__, f"layout={getattr(pool, 'layout', '')}", f"dtype={dtype}",
              f"page={getattr(pool, 'page_size', '')}"]
    for attr in ("layer_num", "head_num", "head_dim", "kv_lora_rank", "qk_rope_head_dim", "kv_cache_dim"):
        if hasattr(pool, attr):
            fields.append(f"{attr}={getattr(pool, attr)}")
    return ",".join(fields)


class _PoolPages:
    """A registered host pool's pages as kvrack blocks: zero-copy pieces, or flat pages where it has no
    pointer API."""

    def __init__(self, pool: Any, name: str, ident: bytes) -> None:
        self.pool = pool
        self.name = name
        self.ident = ident
        self.page_size = int(getattr(pool, "page_size", 1) or 1)
        self.zero_copy = hasattr(pool, "get_page_buffer_meta")
        self.spans: list[tuple[int, int]] = []
        for tensor in self._buffers():
            start = int(tensor.data_ptr())
            self.spans.append((start, start + int(tensor.untyped_storage().nbytes())))
        self.page_bytes = 0

    def _buffers(self) -> list[Any]:
        kv = getattr(self.pool, "kv_buffer", None)
        if isinstance(kv, torch.Tensor):
            return [kv]
        try:
            return [t for t in self.pool.get_hybrid_pool_buffer() if isinstance(t, torch.Tensor)]
        except Exception:
            return []

    def first_slots(self, host_indices: torch.Tensor, pages: int) -> list[int]:
        if host_indices.numel() != pages * self.page_size:
            raise ValueError(f"{pages} pages of {self.page_size} tokens need {pages * self.page_size} host "
                             f"indices, got {host_indices.numel()}")
        return [int(i) for i in host_indices[:: self.page_size].tolist()]

    def pieces(self, host_indices: torch.Tensor, pages: int) -> list[Pieces]:
        """Each page's memory in the host pool, in the order SGLang's own zero-copy backends send it."""
        self.first_slots(host_indices, pages)
        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        if not pages:
            return []
        per_page = len(ptrs) // pages
        if per_page * pages != len(ptrs) or per_page == 0:
            raise ValueError(f"{len(ptrs)} buffers for {pages} pages")
        views = [self._view(int(p), int(n)) for p, n in zip(ptrs, sizes)]
        return [Pieces(views[i * per_page: (i + 1) * per_page]) for i in range(pages)]

    def _view(self, ptr: int, nbytes: int) -> memoryview:
        if self.spans and not any(lo <= ptr and ptr + nbytes <= hi for lo, hi in self.spans):
            raise ValueError(f"page buffer {ptr:#x}+{nbytes} is outside the registered host pool")
        return memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")


class KvrackHiCacheStorage(HiCacheStorage):
    """SGLang HiCache L3 tier on a kvrack daemon (see the module's docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig | None = None, kwargs: dict[str, Any] | None = None
                 ) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        extra.update(kwargs or {})
        self.options = {k: extra.get(k, extra.get(f"kvrack.{k}", v)) for k, v in DEFAULTS.items()}
        self.config = storage_config
        self.shard = shard_identity(storage_config)
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        if storage_config is not None and getattr(storage_config, "should_split_heads", False):
            log.warning("kvrack: heterogeneous-TP head splitting is not supported; pages are stored per TP size")
        self.rank_name = f"sglang-tp{getattr(storage_config, 'tp_rank', 0)}"
        # SGLang calls from its prefetch, transfer and backup threads at once: a connection each, so that a long
        # transfer never holds up an existence check
        self._local = threading.local()
        self._links: list[Link] = []
        self._links_lock = threading.Lock()
        self.pools: dict[str, _PoolPages] = {}
        self.registered_pools: dict[str, Any] = {}
        self.mem_pool_host: Any = None
        self._salt: bytes | None = None  # the namespace's salt, from the first connection
        self.counters: dict[str, float] = dict.fromkeys(
            ("lookups", "lookup_pages", "hit_pages", "get_pages", "got_pages", "set_pages", "stored_pages",
             "daemon_errors", "get_seconds", "set_seconds"), 0)
        self._metrics: dict[str, list[float]] = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [],
                                                  "backup_bandwidth": []}
        self._metrics_lock = threading.Lock()
        self._closed = False
        # connect now: a reachable daemon is used from the first request; an absent one is logged once
        link = self._link()
        with link.lock:
            self._client(link)

    # ------------------------------------------------------------ registration
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.pools[PoolName.KV.value] = self._pool_pages(mem_pool_host, PoolName.KV.value)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = getattr(host_pool_name, "value", host_pool_name)
        self.pools[str(name)] = self._pool_pages(host_pool, str(name))

    def _pool_pages(self, pool: Any, name: str) -> _PoolPages:
        ident = f"{self.shard}|{pool_identity(pool, name)}|salt={self.options['salt']}".encode()
        pages = _PoolPages(pool, name, ident)
        log.info("kvrack: HiCache pool %s registered (%s; %s)", name, pool_identity(pool, name),
                 "zero-copy pages" if pages.zero_copy else "flat pages")
        return pages

    # ------------------------------------------------------------------- keys
    def _link(self) -> Link:
        """The calling thread's connection."""
        link: Link | None = getattr(self._local, "link", None)
        if link is None:
            o = self.options
            link = Link(o["address"], o["namespace"], o["token"], float(o["timeout_s"]), float(o["retry_s"]),
                        f"{self.rank_name}-{threading.current_thread().name}")
            with self._links_lock:
                self._links.append(link)
            self._local.link = link
        return link

    def _client(self, link: Link) -> Client | None:
        client = link.get()
        if client is not None and self._salt is None:
            self._salt = client.namespace_salt
        return client

    def kvrack_keys(self, keys: Sequence[str], pool: str = PoolName.KV.value) -> list[bytes]:
        """The kvrack block keys of SGLang page hashes, for one registered pool."""
        if self._salt is None:
            raise RuntimeError("kvrack keys need the namespace's salt: no daemon connection yet")
        pages = self.pools.get(pool)
        ident = pages.ident if pages is not None else f"{self.shard}|pool={pool}|unregistered".encode()
        root = _KEY_TAG + _field(self._salt) + _field(ident)
        return [blake3.blake3(root + _field(_hash_bytes(k))).digest() for k in keys]

    def _parents(self, keys: list[bytes], prefix_keys: Sequence[str] | None, pool: str) -> list[bytes | None]:
        first = self.kvrack_keys([prefix_keys[-1]], pool)[0] if prefix_keys else None
        return [first, *keys[:-1]]

    def _call(self, default: _T, fn: Callable[[Client], _T]) -> _T:
        """Run ``fn`` on the daemon connection; ``default`` (a miss) when there is none or it fails."""
        link = self._link()
        with link.lock:
            if self._closed:
                return default
            client = self._client(link)
            if client is None:
                return default
            try:
                return fn(client)
            except Exception as exc:
                link.failed(exc)
                self._count(daemon_errors=1)
                return default

    def _count(self, **amounts: float) -> None:
        with self._metrics_lock:
            for name, value in amounts.items():
                self.counters[name] += value

    # ------------------------------------------------------------------ exists
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages kvrack holds (one lookup for the whole span)."""
        if not keys:
            return 0
        found = self._call(0, lambda c: c.lookup(self.kvrack_keys(keys)).prefix)
        self._count(lookups=1, lookup_pages=len(keys), hit_pages=found)
        return found

    # ------------------------------------------------------- zero copy (v1)
    def _kv_pages(self) -> _PoolPages:
        pages = self.pools.get(PoolName.KV.value)
        if pages is None:
            raise RuntimeError("no HiCache host pool registered (register_mem_pool_host)")
        return pages

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read pages straight into the host pool's page memory; per-page hit flags."""
        return self._get_pages(self._kv_pages(), keys, host_indices)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Write pages straight from the host pool's page memory; pages kvrack holds already are not copied."""
        prefix = extra_info.prefix_keys if extra_info is not None else None
        return self._set_pages(self._kv_pages(), keys, host_indices, prefix)

    def _get_pages(self, pages: _PoolPages, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        if not keys:
            return []
        start = time.perf_counter()
        if pages.zero_copy:
            def read(c: Client) -> list[bool]:
                return list(c.get_into(self.kvrack_keys(keys, pages.name), pages.pieces(host_indices, len(keys))))
        else:
            def read(c: Client) -> list[bool]:
                slots = pages.first_slots(host_indices, len(keys))
                outs = [pages.pool.get_dummy_flat_data_page() for _ in keys]
                hits = list(c.get_into(self.kvrack_keys(keys, pages.name), outs))
                for slot, out, hit in zip(slots, outs, hits):
                    if hit:
                        pages.pool.set_from_flat_data_page(slot, out)
                return hits
        hits = self._call([False] * len(keys), read)
        got = sum(hits)
        self._record("prefetch", "get", len(keys), got, time.perf_counter() - start, pages)
        return hits

    def _set_pages(self, pages: _PoolPages, keys: list[str], host_indices: torch.Tensor,
                   prefix_keys: Sequence[str] | None) -> list[bool]:
        def buffers() -> list[Any]:
            if pages.zero_copy:
                return list(pages.pieces(host_indices, len(keys)))
            return [pages.pool.get_data_page(slot, flat=True) for slot in pages.first_slots(host_indices, len(keys))]

        return self._store(pages.name, keys, buffers, prefix_keys)

    def _store(self, pool: str, keys: list[str], buffers: Callable[[], list[Any]],
               prefix_keys: Sequence[str] | None) -> list[bool]:
        """Put one pool's pages (``buffers()``, built once connected), chained; per-page: stored or held."""
        if not keys:
            return []
        if not self.is_writer:  # MLA: one rank writes the pages every rank holds
            return [True] * len(keys)
        start = time.perf_counter()

        def write(c: Client) -> list[bool]:
            kv = self.kvrack_keys(keys, pool)
            result = c.put(kv, buffers(), self._parents(kv, prefix_keys, pool))
            return [code in _STORED for code in result.codes]

        ok = self._call([False] * len(keys), write)
        pages = self.pools.get(pool)
        if pages is not None:
            self._record("backup", "set", len(keys), sum(ok), time.perf_counter() - start, pages)
        return ok

    def _record(self, metric: str, op: str, asked: int, done: int, seconds: float, pages: _PoolPages) -> None:
        self._count(**{f"{op}_pages": asked, "got_pages" if op == "get" else "stored_pages": done,
                       f"{op}_seconds": seconds})
        if done and seconds > 0 and pages.name == PoolName.KV.value:
            page_gib = self._page_bytes(pages) / (1 << 30)
            with self._metrics_lock:
                self._metrics[f"{metric}_pgs"].append(done)
                self._metrics[f"{metric}_bandwidth"].append(done * page_gib / seconds)

    @staticmethod
    def _page_bytes(pages: _PoolPages) -> int:
        if not pages.page_bytes:
            try:
                pages.page_bytes = int(pages.pool.get_size_per_token()) * pages.page_size
            except Exception:
                pages.page_bytes = 0
        return pages.page_bytes

    # ------------------------------------------------------------ per pool (v2)
    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> PoolTransferResult:
        """KV prefix, then each sidecar pool's pages under its hit policy (one lookup for all of them)."""
        transfers = [t for t in pool_transfers or () if str(getattr(t.name, "value", t.name)) != PoolName.KV.value]
        names = [str(getattr(t.name, "value", t.name)) for t in transfers]
        if not keys:
            return PoolTransferResult(0, {}, [])

        def query(c: Client) -> dict[str, bytes]:
            wanted = {PoolName.KV.value: self.kvrack_keys(keys)}
            for name in names:
                wanted[name] = self.kvrack_keys(keys, name)
            flat = [k for ks in wanted.values() for k in ks]
            tiers = c.lookup(flat).tiers
            out, at = {}, 0
            for name, ks in wanted.items():
                out[name] = tiers[at: at + len(ks)]
                at += len(ks)
            return out

        nothing: dict[str, bytes] = {}
        found = self._call(nothing, query)
        kv_tiers = found.get(PoolName.KV.value, b"")
        kv_pages = next((i for i, t in enumerate(kv_tiers) if not t), len(kv_tiers))
        hits: dict[str, int] = {PoolName.KV.value: kv_pages} if kv_pages else {}
        restorable = set(range(1, kv_pages + 1))
        for transfer, name in zip(transfers, names):
            held = found.get(name, b"")
            if transfer.hit_policy == PoolHitPolicy.ALL_PAGES:
                boundary = next((i for i in range(kv_pages) if not held[i]), kv_pages)
                allowed = set(range(1, boundary + 1))
            elif transfer.hit_policy == PoolHitPolicy.TRAILING_PAGES:
                window = max(1, len(transfer.keys) if transfer.keys else 1)
                allowed = {n for n in range(1, kv_pages + 1) if all(held[i] for i in range(max(0, n - window), n))}
                boundary = max(allowed, default=0)
            else:  # block groups: not kept by this backend; the pool reads as a miss, so nothing is restored
                log.warning("kvrack: pool %s asks for hit policy %s, which this backend does not serve", name,
                            transfer.hit_policy)
                allowed, boundary = set(), 0
            if boundary:
                hits[name] = boundary
            restorable &= allowed
        ordered = sorted(restorable)
        return PoolTransferResult(ordered[-1] if ordered else 0, hits, ordered)

    def _per_pool(self, transfers: list[PoolTransfer], op: Callable[[_PoolPages, PoolTransfer], list[bool]]
                  ) -> dict[str, list[bool]]:
        results: dict[str, list[bool]] = {}
        for transfer in transfers:
            name = str(getattr(transfer.name, "value", transfer.name))
            keys = transfer.keys or []
            pages = self.pools.get(name)
            if pages is None or transfer.host_indices is None:
                log.error("kvrack: pool %s is not registered or has no host indices", name)
                results[name] = [False] * len(keys)
                continue
            results[name] = op(pages, transfer)
        return results

    def batch_get_v2(self, transfers: list[PoolTransfer], extra_info: HiCacheStorageExtraInfo | None = None
                     ) -> dict[str, list[bool]]:
        return self._per_pool(transfers, lambda p, t: self._get_pages(p, t.keys or [], t.host_indices))

    def batch_set_v2(self, transfers: list[PoolTransfer], extra_info: HiCacheStorageExtraInfo | None = None
                     ) -> dict[str, list[bool]]:
        prefix = extra_info.prefix_keys if extra_info is not None else None
        return self._per_pool(transfers, lambda p, t: self._set_pages(p, t.keys or [], t.host_indices, prefix))

    # ------------------------------------------------ flat pages (legacy API)
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None
            ) -> torch.Tensor | None:
        got = self.batch_get([key], [target_location] if target_location is not None else None)
        return got[0] if isinstance(got, list) else None

    def batch_get(self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
                  ) -> list[torch.Tensor | None]:
        """Flat page tensors (filled in place when given), None for a miss."""
        if not keys:
            return []
        start = time.perf_counter()

        def read(c: Client) -> list[torch.Tensor | None]:
            kv = self.kvrack_keys(keys)
            if target_locations is None:
                with c.get(kv) as lease:
                    return [None if view is None else torch.frombuffer(bytearray(view), dtype=torch.uint8)
                            for view in lease.views]
            outs = list(target_locations)
            hits = c.get_into(kv, outs)
            return [out if hit else None for out, hit in zip(outs, hits)]

        misses: list[torch.Tensor | None] = [None] * len(keys)
        out = self._call(misses, read)
        pages = self.pools.get(PoolName.KV.value)
        if pages is not None:
            self._record("prefetch", "get", len(keys), sum(o is not None for o in out), time.perf_counter() - start,
                         pages)
        return out

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        """Store flat page tensors; True only if every page is stored (or held already)."""
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            log.error("kvrack: batch_set needs one value per key")
            return False
        flat = [v.contiguous() if isinstance(v, torch.Tensor) else v for v in values]
        return all(self._store(PoolName.KV.value, keys, lambda: flat, None))

    # ------------------------------------------------------------- the rest
    def clear(self) -> None:
        """Drop every block of the namespace (SGLang's ``POST /hicache/storage-backend/clear``), when the extra
        config says ``"allow_clear": true``. Other engines read the same namespace, so by default one engine may
        not clear it: the call fails, SGLang logs why, and nothing is dropped."""
        namespace = self.options["namespace"]
        if not self.options["allow_clear"]:
            raise PermissionError(f"kvrack: namespace {namespace!r} is shared by every engine that uses it; set "
                                  f'"allow_clear": true in the backend\'s extra config to let SGLang clear it, or run '
                                  f"`kvrack blocks clear --namespace {namespace}`")
        from kvrack.clients.admin import AdminClient

        address = self.options["address"]
        result = AdminClient(self.options["admin"], data_address=address).clear(namespace)
        log.warning("kvrack: namespace %r cleared on SGLang's request (%s)", namespace, result)

    def get_stats(self) -> Any:
        """Pages and bandwidth (GiB/s) of each transfer since the last call, for SGLang's storage metrics."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._metrics_lock:
            metrics = StorageMetrics(**{k: list(v) for k, v in self._metrics.items()})
            for v in self._metrics.values():
                v.clear()
        return metrics

    def stats(self) -> dict[str, float]:
        """Counters since the backend started (tests and logs read this)."""
        with self._metrics_lock:
            return dict(self.counters)

    def close(self) -> None:
        self._closed = True
        with self._links_lock:
            links, self._links = self._links, []
        for link in links:
            with link.lock:
                link.close()
