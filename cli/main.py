"""The ``kvrack`` command: status of a running daemon, benchmarks, the trace simulator."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvrack import __version__
from kvrack.cli.bench import bench_app
from kvrack.cli.common import AddressOpt, console
from kvrack.cli.sim import sim
from kvrack.clients.client import Client
from kvrack.clients.errors import KvrackError
from kvrack.sizes import in_unit, unit_of

app = typer.Typer(help="kvrack: pooled KV cache for LLM inference.", no_args_is_help=True, add_completion=False)
app.add_typer(bench_app, name="bench")
app.command()(sim)


def _version(value: bool) -> None:
    if value:
        console.print(f"kvrack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """kvrack: pooled KV cache for LLM inference."""


def _fetch_stats(address: str | None, namespace: str, as_json: bool) -> dict[str, Any]:
    """The daemon's stats, or exit 1 saying why not (as JSON with ``--json``)."""
    try:
        with Client.connect(address, namespace=namespace, client_name="kvrack-status", timeout=5.0) as client:
            stats = client.stats()
            stats["address"] = client.address
            return stats
    except (KvrackError, OSError, ValueError) as exc:
        if as_json:
            sys.stdout.write(json.dumps({"error": str(exc), "code": getattr(exc, "code", None),
                                         "address": address}) + "\n")
        else:
            console.print(f"[red]cannot reach kvrackd: {escape(str(exc))}")
        raise typer.Exit(1) from None


def _tier_row(t: dict[str, Any]) -> tuple[str, ...]:
    if t.get("available") is False:
        return (t["tier"], "-", "-", "-", "-", "-", "unavailable")
    if t.get("present") is False:  # the HBM tier when it is off or there is no GPU
        return (t["tier"], "-", "-", "-", "-", "-", "absent")
    cap = t.get("capacity_bytes", t.get("capacity", 0)) or 0
    used = t.get("used_bytes", 0) or 0
    unit = unit_of(cap)  # used in the unit of the capacity, so the two read side by side
    pct = f" {100 * used / cap:.0f}%" if cap else ""
    hit = t.get("hit_ratio")
    segments = f"{t['segments_assigned']}/{t['segments_total']}" if "segments_total" in t else "-"
    frag = f"{t['fragmentation']:.2f}" if "fragmentation" in t else "-"
    return (t["tier"], in_unit(cap, unit), f"{in_unit(used, unit)}{pct}", f"{t.get('blocks', '-'):,}"
            if isinstance(t.get("blocks"), int) else "-", segments, frag, "-" if hit is None else f"{hit:.3f}")


@app.command()
def status(address: AddressOpt = None, namespace: str = "default",
           as_json: Annotated[bool, typer.Option("--json", help="print the raw stats (or the error) as JSON")] = False
           ) -> None:
    """Tiers, capacity, use, blocks and hit ratio of a running daemon."""
    stats = _fetch_stats(address, namespace, as_json)
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    d = stats.get("daemon", {})
    console.print(f"kvrackd {d.get('version', '?')} pid {d.get('pid', '?')} up {d.get('uptime_s', '?')} s, "
                  f"{stats['server']['sessions']} session(s), at {stats['address']}")
    tcp = stats.get("tcp")
    if tcp:
        console.print(f"remote clients: {tcp['address']}" + (" (NIXL)" if tcp.get("nixl") else ""))
    table = Table(title="tiers", min_width=60)
    for col in ("tier", "capacity", "used", "blocks", "segs", "frag", "hit"):
        table.add_column(col, justify="left" if col == "tier" else "right", no_wrap=True)
    notes = []
    for t in stats["tiers"]:
        table.add_row(*_tier_row(t))
        if t.get("degraded"):
            notes.append(f"[yellow]{t['tier']} tier {'unavailable' if t.get('available') is False else 'degraded'}: "
                         f"{escape(str(t['degraded']))}")
        if t.get("present") is False:
            notes.append(f"[dim]{t['tier']} tier absent: {escape(t.get('reason', ''))}")
    console.print(table)
    for note in notes:
        console.print(note)
    nvme = next((t for t in stats["tiers"] if t["tier"] == "nvme" and t.get("available", True)), None)
    if nvme is not None:
        console.print(f"nvme: pending writes {nvme['pending_writes']}, written {nvme['written_blocks']}, read back "
                      f"{nvme['promoted_blocks']}, errors {nvme['read_errors']} read / {nvme['write_errors']} write, "
                      f"evictions {nvme['evictions']}")
    ops = stats["ops"]
    console.print(f"puts {ops['puts']}, evictions {ops['evictions']}, no-space {ops['no_space']}, expired "
                  f"reservations {ops['expired_reservations']}, expired pins {ops['expired_pins']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
