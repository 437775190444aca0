"""``kvrack events`` (tail a daemon's KV events) and ``kvrack route`` (which daemon holds the longest cached
prefix of a token file)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvrack.cli.common import console


def _short(key: Any) -> str:
    return key.hex()[:12] if isinstance(key, bytes) else str(key)


def _describe(ev: Any) -> str:
    kind = type(ev).__name__
    if kind == "AllBlocksCleared":
        return f"cleared {ev.namespace or 'all namespaces'}"
    keys = ev.block_hashes
    what = f"{len(keys)} block(s) {_short(keys[0])}" + (f"..{_short(keys[-1])}" if len(keys) > 1 else "")
    if kind == "BlockStored":
        parent = f" after {_short(ev.parent_block_hash)}" if ev.parent_block_hash is not None else ""
        size = f", {sum(ev.block_bytes):,} bytes" if ev.block_bytes else ""
        return f"stored  {ev.medium:<4} {what}{parent}{size}"
    return f"removed {ev.medium:<4} {what}"


def _jsonable(ev: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(ev).__name__}
    for field in ev.__struct_fields__:
        value = getattr(ev, field)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, list):
            value = [v.hex() if isinstance(v, bytes) else v for v in value]
        out[field] = value
    return out


def events(endpoint: Annotated[str, typer.Argument(help="the daemon's events.endpoint, e.g. tcp://HOST:5557")],
           replay: Annotated[str | None, typer.Option(help="its events.replay_endpoint, to start from --from")] = None,
           start: Annotated[int | None, typer.Option("--from", help="replay from this sequence number first")] = None,
           namespace: Annotated[str | None, typer.Option(help="only this namespace")] = None,
           topic_prefix: Annotated[str, typer.Option(help="the daemon's events.topic_prefix")] = "kvrack.",
           count: Annotated[int, typer.Option(help="stop after this many batches (0: no limit)")] = 0,
           seconds: Annotated[float, typer.Option(help="stop after this long without a batch (0: never)")] = 0.0,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object per event")] = False) -> None:
    """Tail a daemon's KV events (blocks stored and removed per tier), human-readable or as JSON lines."""
    from kvrack.clients.router import follow

    if start is not None and not replay:
        raise typer.BadParameter("--from replays from the daemon's replay endpoint: give --replay too")
    topic = (topic_prefix + namespace).encode() if namespace else b""
    seen = 0
    for t, seq, batch in follow(endpoint, replay, start, topic, seconds or None):
        if topic and t != topic:  # a subscription matches by prefix: namespace "a" would take "ab"'s batches
            continue
        for ev in batch.events:
            if as_json:
                sys.stdout.write(json.dumps({"seq": seq, "topic": t.decode(errors="replace"), "ts": batch.ts,
                                             **_jsonable(ev)}) + "\n")
            else:
                console.print(f"{seq:>8} {time.strftime('%H:%M:%S', time.localtime(batch.ts))} "
                              f"{escape(t.decode(errors='replace'))}  {_describe(ev)}", highlight=False)
        sys.stdout.flush()
        seen += 1
        if count and seen >= count:
            break


def _layout(spec: str) -> Any:
    from kvrack.clients.layout import Layout

    fields: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--layout: expected NAME=VALUE, got {item!r}")
        fields[name.strip()] = int(value) if value.strip().isdigit() else value.strip()
    try:
        return Layout(**fields)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(f"--layout: {exc}") from None


def _tokens(path: Path) -> list[int]:
    text = path.read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("token_ids") or data.get("tokens") or data.get("prompt_token_ids")
        return [int(t) for t in data]
    except (ValueError, TypeError):
        return [int(t) for t in text.split()]


def route(tokens: Annotated[Path, typer.Option(help="a token file: a JSON list (or {\"token_ids\": [...]}), or "
                                                     "whitespace-separated ids", exists=True, dir_okay=False)],
          daemon: Annotated[list[str], typer.Option(help="NAME=EVENTS_ENDPOINT[,REPLAY_ENDPOINT], once per daemon")],
          model: Annotated[str, typer.Option(help="the model fingerprint the engine's keys use")],
          layout: Annotated[str, typer.Option(help="the engine's block layout: layers=..,kv_heads=..,head_dim=..,"
                                                   "dtype=..,block_tokens=..[,tp_rank,tp_size,kv_order]")],
          salt: Annotated[str | None, typer.Option(help="the namespace's salt, hex (or --address to ask a daemon)")]
          = None,
          address: Annotated[str | None, typer.Option(help="a daemon to read the namespace's salt from")] = None,
          namespace: str = "default",
          cache_salt: Annotated[str, typer.Option(help="the request's cache_salt, if any")] = "",
          wait: Annotated[float, typer.Option(help="seconds to take in events first")] = 1.0,
          topic_prefix: Annotated[str, typer.Option(help="the daemons' events.topic_prefix")] = "kvrack.",
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which daemon holds the longest cached prefix of the tokens in a file (from the daemons' KV events)."""
    from kvrack.clients import Client, KeyBuilder
    from kvrack.clients.router import PrefixIndex

    if (salt is None) == (address is None):
        raise typer.BadParameter("give exactly one of --salt and --address")
    if salt is None:
        with Client.connect(address, namespace=namespace, client_name="kvrack-route") as c:
            ns_salt = c.namespace_salt
    else:
        ns_salt = bytes.fromhex(salt)
    endpoints: dict[str, Any] = {}
    for item in daemon:
        name, sep, where = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--daemon: expected NAME=ENDPOINT[,REPLAY], got {item!r}")
        pub, _, replay = where.partition(",")
        endpoints[name] = (pub, replay or None)
    keys = KeyBuilder(ns_salt, model, _layout(layout)).chain(_tokens(tokens), salt=cache_salt)
    with PrefixIndex(endpoints, topic_prefix=topic_prefix) as index:
        index.catch_up()
        index.pump(quiet_s=min(wait, 0.5), max_s=wait)
        prefixes = index.longest_prefix(keys, namespace)
        best, blocks = index.best(keys, namespace)
        block_tokens = _layout(layout).block_tokens
        result = {"blocks": len(keys), "best": best, "best_blocks": blocks, "best_tokens": blocks * block_tokens,
                  "daemons": {n: {"prefix_blocks": p, "prefix_tokens": p * block_tokens, "index": index.stats()[n]}
                              for n, p in prefixes.items()}}
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"cached prefix of {len(keys)} block(s)")
    for col in ("daemon", "blocks", "tokens", "gaps"):
        table.add_column(col, justify="left" if col == "daemon" else "right")
    for n, p in prefixes.items():
        table.add_row(escape(n), str(p), str(p * block_tokens), str(result["daemons"][n]["index"]["gaps"]))
    console.print(table)
    console.print(f"best: {escape(best)} ({blocks} blocks)" if best else "no daemon holds the first block")
