"""kvrack as a vLLM KV connector: prefixes computed by one engine are loaded by the next instead of recomputed.

Selected with ``--kv-transfer-config`` (see docs/vllm.md)::

    {"kv_connector": "KvrackConnector", "kv_connector_module_path": "kvrack.clients.vllm", "kv_role": "kv_both",
     "kv_connector_extra_config": {"kvrack.address": "unix:///run/kvrack/kvrack.sock", "kvrack.namespace": "default"}}

Scheduler side: when a request arrives, one batched lookup of its prompt's block keys says how many leading
blocks kvrack holds beyond vLLM's own prefix cache; those tokens are external, loaded synchronously before the
forward pass. The blocks a step computes (prompt blocks, chunked prefill included) are saved at the end of that
step. Worker side: loads copy kvrack's blocks straight into vLLM's paged KV tensors, saves copy the pages
straight into kvrack's memory (``kvrack.clients.paged``), one copy each way.

Keys come from kvrack's key builder over the prompt's token ids, the model and the layout (block size, heads,
head size, dtype, tensor-parallel rank, the backend's page order), so every engine with the same model and
layout finds the same blocks; a request's ``cache_salt`` enters the first key, so tenants who salt never share a
block; the namespace's salt (``kvrack.namespace``) separates namespaces. A daemon that is down, slow or full
costs a recompute, never a failed request: lookups time out to a miss, loads that fail are reported to vLLM as
blocks to recompute, saves that fail are counted and dropped, and the connector reconnects after
``kvrack.retry_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvrack.clients.client import Client
from kvrack.clients.keys import KeyBuilder
from kvrack.clients.layout import DTYPE_BYTES, Layout
from kvrack.clients.link import Link
from kvrack.clients.paged import PagedKV, get_kv, put_kv

log = logging.getLogger("kvrack.vllm")

DEFAULTS: dict[str, Any] = {
    "kvrack.address": None,  # None: $KVRACK_ADDRESS, /run/kvrack/kvrack.sock, the per-user socket
    "kvrack.namespace": "default",
    "kvrack.token": None,  # TCP addresses: the namespace's token (default $KVRACK_TOKEN)
    "kvrack.model": None,  # the model's name in keys (default: vLLM's model path or name, and dtype)
    "kvrack.lookup_timeout_s": 0.5,  # the scheduler's lookups: past this, a miss
    "kvrack.timeout_s": 10.0,  # the workers' loads and saves
    "kvrack.retry_s": 5.0,  # after a failure, how long before the connector tries the daemon again
    "kvrack.load_failure_policy": "recompute",  # vLLM's kv_load_failure_policy: recompute (never fail) or fail
    "kvrack.save_decode": False,  # also save blocks filled by generated tokens
    "kvrack.stats_path": None,  # a JSON line per load and save, and each side's counters at shutdown
}
COUNTERS = ("lookups", "lookup_tokens", "hit_tokens", "load_requests", "loaded_blocks", "loaded_tokens",
            "loaded_bytes", "load_failed_blocks", "load_s", "saved_blocks", "saved_tokens", "saved_bytes",
            "save_skipped_blocks", "save_failed_blocks", "save_s", "daemon_errors")


def options(vllm_config: Any) -> dict[str, Any]:
    """The connector's settings: ``kv_connector_extra_config`` over ``DEFAULTS`` (unknown ``kvrack.*`` keys
    are an error, so a misspelt option is not ignored)."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    unknown = [k for k in extra if k.startswith("kvrack.") and k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown kv_connector_extra_config option(s) {unknown}; known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **{k: v for k, v in extra.items() if k in DEFAULTS}}


def layout_of(vllm_config: Any, kv_cache_config: Any, tp_rank: int) -> Layout:
    """kvrack's layout for one tensor-parallel rank's blocks of this engine."""
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    dtype = str(spec.dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"KV cache dtype {dtype} has no kvrack layout; known: {', '.join(DTYPE_BYTES)}")
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    # blocks of different backends (page orders) or devices never share a key
    order = (f"vllm:{kv_cache_config.kv_cache_layout or 'default'}:{vllm_config.device_config.device_type}:"
             f"{type(spec).__name__}")
    return Layout(layers=len(group.layer_names), kv_heads=spec.num_kv_heads, head_dim=spec.head_size, dtype=dtype,
                  block_tokens=spec.block_size, tp_rank=tp_rank, tp_size=tp_size, kv_order=order)


def model_name(vllm_config: Any, configured: str | None) -> str:
    mc = vllm_config.model_config
    return configured or f"{mc.model}|{mc.revision or ''}|{mc.dtype}"


@dataclasses.dataclass
class Transfer:
    """Blocks of one request to load or save: the prompt's tokens (each worker builds its own rank's keys)
    and the engine block ids of blocks ``first .. first + len(block_ids) - 1``."""

    req_id: str
    tokens: list[int]
    salt: str
    first: int
    block_ids: list[int]


@dataclasses.dataclass
class KvrackMetadata(KVConnectorMetadata):
    loads: list[Transfer] = dataclasses.field(default_factory=list)
    saves: list[Transfer] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KvrackStats(KVConnectorStats):
    """Counters since the last report, from both sides (summed)."""

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KvrackStats:
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.data.items() if v}

    def is_empty(self) -> bool:
        return not any(self.data.values())


@dataclasses.dataclass
class _Request:
    """What the scheduler keeps of a request between steps."""

    tokens: list[int]
    salt: str
    keys: list[bytes] = dataclasses.field(default_factory=list)
    local_blocks: int = 0  # blocks vLLM's own prefix cache had when it asked
    found_blocks: int = 0  # leading blocks kvrack held then
    saved_blocks: int = 0  # blocks saved (or known to be in kvrack) so far
    block_ids: list[int] = dataclasses.field(default_factory=list)


class KvrackConnector(KVConnectorBase_V1):
    """vLLM's ``KVConnectorBase_V1`` on kvrack (roles ``kv_producer``, ``kv_consumer`` and ``kv_both``)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.opts = options(vllm_config)
        policy = self.opts["kvrack.load_failure_policy"]
        if policy not in ("recompute", "fail"):
            raise ValueError(f"kvrack.load_failure_policy is recompute or fail, got {policy!r}")
        # a block that cannot be loaded is recomputed, never a failed request (unless the operator says so);
        # the scheduler reads this right after creating its connector
        self._kv_transfer_config.kv_load_failure_policy = policy
        cfg = self._kv_transfer_config
        self.loads = cfg.kv_role in ("kv_consumer", "kv_both")
        self.saves = cfg.kv_role in ("kv_producer", "kv_both")
        self.block_size = vllm_config.cache_config.block_size
        self.model = model_name(vllm_config, self.opts["kvrack.model"])
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._since_report: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        if role == KVConnectorRole.SCHEDULER:
            self.layout = layout_of(vllm_config, kv_cache_config, 0)  # rank 0's keys stand for every rank's
            self.link = self._link(float(self.opts["kvrack.lookup_timeout_s"]), "vllm-scheduler")
            self.requests: dict[str, _Request] = {}
            self.pending_loads: list[Transfer] = []
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.layout = layout_of(vllm_config, kv_cache_config, get_tensor_model_parallel_rank())
            self.link = self._link(float(self.opts["kvrack.timeout_s"]), "vllm-worker")
            self.paged: PagedKV | None = None
            self.failed_blocks: set[int] = set()
            # (key, engine block id) of the blocks loaded lately, newest last: what a test checks byte for byte
            self.loaded: collections.deque[tuple[bytes, int]] = collections.deque(maxlen=4096)
            self.chains: dict[str, list[bytes]] = {}  # this rank's keys per request, built once
        self.keys: KeyBuilder | None = None  # built once the namespace's salt is known (first connection)

    # ------------------------------------------------------------------ shared
    def _link(self, timeout: float, name: str) -> Link:
        o = self.opts
        return Link(o["kvrack.address"], o["kvrack.namespace"], o["kvrack.token"], timeout, float(o["kvrack.retry_s"]),
                    name)

    def _count(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.counters[k] += v
            self._since_report[k] += v

    def _client(self) -> Client | None:
        client = self.link.get()
        if client is not None and self.keys is None:
            self.keys = KeyBuilder(client.namespace_salt, self.model, self.layout)
        return client

    def _chain(self, tokens: list[int], salt: str, blocks: int, have: list[bytes]) -> list[bytes]:
        """Keys of the first ``blocks`` full blocks of ``tokens``, extending ``have``."""
        assert self.keys is not None
        if len(have) >= blocks:
            return have
        return list(self.keys.chain(tokens[: blocks * self.block_size], salt=salt, start=have))

    def _event(self, kind: str, **fields: Any) -> None:
        """One line of ``kvrack.stats_path`` (benchmarks read what each load cost)."""
        path = self.opts["kvrack.stats_path"]
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def stats(self) -> dict[str, float]:
        """Every counter since the connector started (tests and logs read this)."""
        return dict(self.counters)

    def get_kv_connector_stats(self) -> KvrackStats | None:
        if not any(self._since_report.values()):
            return None
        out = KvrackStats(data=dict(self._since_report))
        self._since_report = dict.fromkeys(COUNTERS, 0)
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvrackStats | None:
        return KvrackStats(data=dict(data or dict.fromkeys(COUNTERS, 0)))

    # --------------------------------------------------------------- scheduler
    def on_new_request(self, request: Any) -> None:
        self.requests[request.request_id] = _Request(list(request.prompt_token_ids or ()), request.cache_salt or "")

    def _request(self, request: Any) -> _Request:
        state = self.requests.get(request.request_id)
        if state is None:  # added before the connector saw it (it does not happen in 0.32; cheap to allow)
            state = self.requests[request.request_id] = _Request(list(request.prompt_token_ids or ()),
                                                                  request.cache_salt or "")
        return state

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond vLLM's own prefix hit that kvrack holds, loaded synchronously (0 on any trouble)."""
        state = self._request(request)
        bs = self.block_size
        state.local_blocks = num_computed_tokens // bs
        if not self.loads:
            return 0, False
        loadable = (len(state.tokens) - 1) // bs  # vLLM computes at least the last prompt token itself
        if loadable <= state.local_blocks:
            return 0, False
        with self.link.lock:
            client = self._client()
            if client is None:
                return 0, False
            try:
                state.keys = self._chain(state.tokens, state.salt, loadable, state.keys)
                found = client.lookup(state.keys[:loadable]).prefix
            except Exception as exc:
                self.link.failed(exc)
                self._count(daemon_errors=1)
                return 0, False
        self._count(lookups=1, lookup_tokens=loadable * bs)
        state.found_blocks = found
        state.saved_blocks = max(state.saved_blocks, found)  # what kvrack holds need not be saved again
        external = found * bs - num_computed_tokens
        if external <= 0:
            return 0, False
        self._count(hit_tokens=external)
        return external, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        state = self._request(request)
        block_ids = list(blocks.get_block_ids()[0])
        first = state.local_blocks
        count = num_external_tokens // self.block_size
        self.pending_loads.append(Transfer(request.request_id, state.tokens[: (first + count) * self.block_size],
                                           state.salt, first, block_ids[first: first + count]))
        self._count(load_requests=1)

    def build_connector_meta(self, scheduler_output: Any) -> KvrackMetadata:
        meta = KvrackMetadata(loads=self.pending_loads)
        self.pending_loads = []
        if not self.saves:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._save_upto(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:  # after a preemption: the request's blocks anew
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            self._save_upto(meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _save_upto(self, meta: KvrackMetadata, req_id: str, state: _Request, computed: int) -> None:
        """Save the full prompt blocks this step computes that kvrack does not hold yet."""
        limit = computed if self.opts["kvrack.save_decode"] else min(computed, len(state.tokens))
        upto = min(limit // self.block_size, len(state.block_ids))
        if upto <= state.saved_blocks:
            return
        meta.saves.append(Transfer(req_id, state.tokens[: upto * self.block_size], state.salt, state.saved_blocks,
                                   state.block_ids[state.saved_blocks: upto]))
        state.saved_blocks = upto

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.requests.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The paged KV tensors, in the order of the KV cache group's layers; the dimension that indexes blocks
        is the one whose size is the number of blocks."""
        names = list(self._kv_cache_config.kv_cache_groups[0].layer_names) if self._kv_cache_config else list(kv_caches)
        tensors = [kv_caches[n] for n in names if n in kv_caches]
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config else None
        shape = list(tensors[0].shape)
        block_dim = next((d for d, s in enumerate(shape) if s == num_blocks), 0)
        self.paged = PagedKV(tensors, block_dim=block_dim)
        if self.paged.block_nbytes != self.layout.block_nbytes:
            log.warning("kvrack: a block of the paged cache has %d bytes, the layout %d (padding?); blocks are "
                        "stored as the cache holds them", self.paged.block_nbytes, self.layout.block_nbytes)

    def _worker_keys(self, t: Transfer) -> list[bytes]:
        have = self.chains.get(t.req_id, [])
        keys = self._chain(t.tokens, t.salt, t.first + len(t.block_ids), have)
        self.chains[t.req_id] = keys
        return keys[t.first: t.first + len(t.block_ids)]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvrackMetadata) or not meta.loads or self.paged is None:
            return
        for t in meta.loads:
            t0 = time.perf_counter()
            client = self._client()
            if client is None:
                self.failed_blocks.update(t.block_ids)
                self._count(load_failed_blocks=len(t.block_ids))
                continue
            try:
                keys = self._worker_keys(t)
                got = get_kv(client, keys, self.paged, t.block_ids)
            except Exception as exc:
                self.link.failed(exc)
                self.failed_blocks.update(t.block_ids)
                self._count(load_failed_blocks=len(t.block_ids), daemon_errors=1)
                continue
            missed = [b for b, hit in zip(t.block_ids, got) if not hit]
            self.loaded.extend((k, b) for k, b, hit in zip(keys, t.block_ids, got) if hit)
            if missed:  # evicted since the lookup: vLLM recomputes these (and what follows them)
                self.failed_blocks.update(missed)
                self._count(load_failed_blocks=len(missed))
            n = len(t.block_ids) - len(missed)
            took = time.perf_counter() - t0
            self._count(loaded_blocks=n, loaded_tokens=n * self.block_size, loaded_bytes=sum(got.nbytes), load_s=took)
            self._event("load", req=t.req_id, blocks=n, tokens=n * self.block_size, bytes=sum(got.nbytes),
                        missed=len(missed), seconds=took)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every layer was loaded before the forward pass (start_load_kv)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # a kvrack block holds every layer: saved once the step has computed them all (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvrackMetadata) or not meta.saves or self.paged is None:
            return
        for t in meta.saves:
            t0 = time.perf_counter()
            client = self._client()
            if client is None:
                self._count(save_failed_blocks=len(t.block_ids))
                continue
            try:
                keys = self._worker_keys(t)
                chain = self.chains[t.req_id]
                parents = [chain[t.first + i - 1] if t.first + i > 0 else None for i in range(len(keys))]
                res = put_kv(client, keys, self.paged, t.block_ids, parents, raise_on_error=False)
            except Exception as exc:
                self.link.failed(exc)
                self._count(save_failed_blocks=len(t.block_ids), daemon_errors=1)
                continue
            stored = res.stored
            took = time.perf_counter() - t0
            self._count(saved_blocks=stored, saved_tokens=stored * self.block_size,
                        saved_bytes=stored * self.paged.block_nbytes, save_skipped_blocks=res.existing,
                        save_failed_blocks=len(res.failed), save_s=took)
            self._event("save", req=t.req_id, blocks=stored, existing=res.existing, failed=len(res.failed),
                        seconds=took)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for req_id in finished_req_ids:  # loads and saves are synchronous: nothing is in flight
            self.chains.pop(req_id, None)
        return None, None

    def shutdown(self) -> None:
        self.link.close()
        self._event("shutdown", role=self._role.name.lower(), pid=os.getpid(), **self.counters)


__all__ = ["KvrackConnector", "KvrackMetadata", "KvrackStats"]
