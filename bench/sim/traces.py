"""Traces for the simulator: generators for typical KV workloads, and loaders for recorded ones.

A trace is a sequence of ``Request``: the block keys of one prompt, head
first (each key's parent is the key before it), with the time, the tenant and
whether the last block is partial (engines cache only full blocks).

Formats read:

- ``kvrack``: JSONL, one request per line:
  ``{"time": 12.5, "tenant": "team-a", "keys": ["9f…", "c2…"], "parents": [null, "9f…"], "partial_tail": false}``.
  ``keys`` is required (strings or integers); ``parents`` (one per key,
  ``null`` for a root) defaults to the chain order; tenants never share
  blocks. ``kvrack sim --generate NAME --out FILE`` writes this format.
- ``mooncake``: the public FAST'25 traces, JSONL lines
  ``{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}``,
  ``hash_ids`` being prefix block ids of ``block_tokens`` (512) tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Request:
    keys: list[Any]
    time: float = 0.0
    tenant: str = ""
    partial_tail: bool = False
    parents: list[Any] | None = field(default=None)


class TraceError(ValueError):
    """A trace line that cannot be read; says which line and why."""


FORMATS = ("kvrack", "mooncake")


def detect_format(path: Path) -> str:
    """``mooncake`` when the first record has ``hash_ids``, ``kvrack`` when it has ``keys``."""
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:1: not JSON: {exc}") from None
                if isinstance(first, dict) and "hash_ids" in first:
                    return "mooncake"
                if isinstance(first, dict) and "keys" in first:
                    return "kvrack"
                raise TraceError(f"{path}: first record has neither 'hash_ids' (mooncake) nor 'keys' (kvrack)")
    raise TraceError(f"{path}: empty trace")


def load(path: Path, fmt: str = "auto", block_tokens: int = 512) -> list[Request]:
    """Every request of a recorded trace, in file order."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; choose from {', '.join(FORMATS)}")
    parse = _mooncake_request if fmt == "mooncake" else _kvrack_request
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise TypeError("a record must be a JSON object")
                req = parse(rec, block_tokens)
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
                what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise TraceError(f"{path}:{n}: bad {fmt} record: {what}") from None
            if req.keys:
                out.append(req)
    if not out:
        raise TraceError(f"{path}: no requests")
    return out


def _mooncake_request(rec: dict[str, Any], block_tokens: int) -> Request:
    ids = rec["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(h, int) for h in ids):
        raise ValueError("'hash_ids' must be a list of integers")
    length = rec.get("input_length")
    partial = isinstance(length, int) and length % block_tokens != 0
    return Request(ids, float(rec.get("timestamp", 0)) / 1000.0, "", partial)


def _kvrack_request(rec: dict[str, Any], block_tokens: int) -> Request:
    keys = rec["keys"]
    if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
        raise ValueError("'keys' must be a list of strings or integers")
    parents = rec.get("parents")
    if parents is not None and (not isinstance(parents, list) or len(parents) != len(keys)):
        raise ValueError("'parents' must be a list with one entry per key")
    tenant = str(rec.get("tenant", ""))
    if tenant:  # tenants never share blocks
        keys = [(tenant, k) for k in keys]
        if parents is not None:
            parents = [None if p is None else (tenant, p) for p in parents]
    return Request(keys, float(rec.get("time", 0.0)), tenant, bool(rec.get("partial_tail", False)), parents)


def write(path: Path, requests: Sequence[Request]) -> None:
    """A trace in kvrack's JSONL format (integer keys as they are)."""
    with path.open("w") as f:
        for r in requests:
            rec: dict[str, Any] = {"time": round(r.time, 3), "keys": list(r.keys)}
            if r.tenant:
                rec["tenant"] = r.tenant
            if r.partial_tail:
                rec["partial_tail"] = True
            f.write(json.dumps(rec) + "\n")


def unique_blocks(requests: Sequence[Request]) -> int:
    return len({k for r in requests for k in r.keys})


# ------------------------------------------------------------------ generators
class _Ids:
    """Fresh block ids: a block's id stands for its whole prefix, so new content means a new id."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _zipf_weights(n: int, alpha: float) -> list[float]:
    return [1.0 / (i + 1) ** alpha for i in range(n)]


def _interleave(streams: list[tuple[float, Request]]) -> list[Request]:
    streams.sort(key=lambda tr: tr[0])
    for t, r in streams:
        r.time = t
    return [r for _, r in streams]


def chat(sessions: int = 1500, seed: int = 1, system_prompts: int = 20, one_shot_share: float = 0.3,
         turn_gap_s: tuple[float, float] = (30.0, 1200.0), duration_s: float = 3600.0) -> list[Request]:
    """Multi-turn chat sessions behind shared system prompts, plus one-shot long prompts.

    A session starts behind one of ``system_prompts`` (Zipf-popular, 4-12
    blocks) and has a geometric number of turns (mean 3); each turn re-sends
    the whole conversation plus 1-6 new blocks, 30-1200 s after the previous one.
    ``one_shot_share`` of the requests are one-time long prompts (batch
    summarisation, agents' tool dumps): 16-64 new blocks behind a system
    prompt, never read again. Most requests end in a partial block.
    """
    rng = random.Random(seed)
    ids = _Ids()
    prompts = [ids.take(rng.randint(4, 12)) for _ in range(system_prompts)]
    weights = _zipf_weights(system_prompts, 1.0)
    events: list[tuple[float, Request]] = []
    for _ in range(sessions):
        t = rng.uniform(0, duration_s)
        convo = list(rng.choices(prompts, weights)[0])
        turns = 1
        while rng.random() < 2 / 3 and turns < 40:
            turns += 1
        for _turn in range(turns):
            convo = convo + ids.take(rng.randint(1, 6))
            events.append((t, Request(list(convo), partial_tail=True)))
            t += rng.uniform(*turn_gap_s)
    n_one_shot = int(len(events) * one_shot_share / (1 - one_shot_share)) if one_shot_share < 1 else len(events)
    for _ in range(n_one_shot):
        head = rng.choices(prompts, weights)[0]
        events.append((rng.uniform(0, duration_s), Request(list(head) + ids.take(rng.randint(16, 64)),
                                                           partial_tail=True)))
    return _interleave(events)


def rag(requests: int = 5000, seed: int = 2, documents: int = 2000, alpha: float = 0.9,
        one_shot_share: float = 0.2, duration_s: float = 3600.0) -> list[Request]:
    """Retrieval-augmented prompts: a shared instruction, then retrieved documents, then the question.

    Documents (8-32 blocks) are Zipf-popular; a request places one or two of
    them after a shared 4-block instruction (cache-friendly ordering, so the
    instruction + first document is a shared prefix), then a 1-3 block
    question. ``one_shot_share`` of the requests carry a fresh document
    nobody asks about again.
    """
    rng = random.Random(seed)
    ids = _Ids()
    instruction = ids.take(4)
    doc_len = [rng.randint(8, 32) for _ in range(documents)]
    weights = _zipf_weights(documents, alpha)
    chains: dict[tuple[int, ...], list[int]] = {}

    def chain(docs: tuple[int, ...]) -> list[int]:
        if docs not in chains:
            head = chain(docs[:-1]) if len(docs) > 1 else instruction
            chains[docs] = head + ids.take(doc_len[docs[-1]])
        return chains[docs]

    events: list[tuple[float, Request]] = []
    for _ in range(requests):
        t = rng.uniform(0, duration_s)
        if rng.random() < one_shot_share:
            keys = instruction + ids.take(rng.randint(8, 32))
        else:
            docs = tuple(rng.choices(range(documents), weights, k=rng.choice((1, 1, 2))))
            keys = list(chain(docs))
        events.append((t, Request(keys + ids.take(rng.randint(1, 3)), partial_tail=True)))
    return _interleave(events)


def zipf(requests: int = 5000, seed: int = 3, prefixes: int = 1000, alpha: float = 1.0) -> list[Request]:
    """Zipf-popular prefixes (4-32 blocks) each followed by 1-4 unique blocks."""
    rng = random.Random(seed)
    ids = _Ids()
    heads = [ids.take(rng.randint(4, 32)) for _ in range(prefixes)]
    weights = _zipf_weights(prefixes, alpha)
    out = []
    for i in range(requests):
        head = rng.choices(heads, weights)[0]
        out.append(Request(head + ids.take(rng.randint(1, 4)), time=float(i), partial_tail=True))
    return out


def scan(requests: int = 5000, seed: int = 4, hot_prefixes: int = 100, scan_share: float = 0.7) -> list[Request]:
    """Scan resistance: ``scan_share`` one-time long prompts (32-128 blocks) among reads of a small hot set."""
    rng = random.Random(seed)
    ids = _Ids()
    hot = [ids.take(rng.randint(8, 24)) for _ in range(hot_prefixes)]
    out = []
    for i in range(requests):
        if rng.random() < scan_share:
            keys = ids.take(rng.randint(32, 128))
        else:
            keys = rng.choice(hot) + ids.take(rng.randint(1, 2))
        out.append(Request(keys, time=float(i), partial_tail=True))
    return out


GENERATORS: dict[str, Callable[..., list[Request]]] = {"chat": chat, "rag": rag, "zipf": zipf, "scan": scan}
