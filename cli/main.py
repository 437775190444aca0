"""The ``kvrack`` command: status of a running daemon, benchmarks, the trace simulator."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvrack import __version__
from kvrack.cli import admin as admin_cli
from kvrack.cli import events as events_cli
from kvrack.cli.admin import AdminOpt, TokenOpt
from kvrack.cli.bench import bench_app
from kvrack.cli.common import AddressOpt, console
from kvrack.cli.sim import sim
from kvrack.clients.admin import AdminApiError, AdminClient
from kvrack.clients.client import Client
from kvrack.clients.errors import KvrackError
from kvrack.daemon.admin.views import stats_view
from kvrack.sizes import in_unit, unit_of

app = typer.Typer(help="kvrack: pooled KV cache for LLM inference.", no_args_is_help=True, add_completion=False)
app.add_typer(bench_app, name="bench")
app.command()(sim)
admin_cli.register(app)
app.command()(events_cli.events)
app.command()(events_cli.route)


def _version(value: bool) -> None:
    if value:
        console.print(f"kvrack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """kvrack: pooled KV cache for LLM inference."""


def _fetch_stats(address: str | None, namespace: str, as_json: bool, admin: str | None = None,
                 token: str | None = None) -> dict[str, Any]:
    """The daemon's stats view: through the admin API, else (admin API off or not found) the data socket's
    stats request; or exit 1 saying why not (as JSON with ``--json``)."""
    api = AdminClient(admin, token, data_address=address, timeout=5.0)
    try:
        view = api.stats()
        view["address"] = view["daemon"].get("socket") or address
        return view
    except AdminApiError as exc:
        if exc.status != 0 or admin:  # it answered, with an error; or the admin API named could not be reached
            if as_json:
                sys.stdout.write(json.dumps({"error": exc.message, **exc.as_dict()}) + "\n")
            else:
                console.print(f"[red]kvrackd's admin API: {escape(exc.message)}")
            raise typer.Exit(1) from None
    try:
        with Client.connect(address, namespace=namespace, client_name="kvrack-status", timeout=5.0) as client:
            view = stats_view(client.stats())
            view["address"] = client.address
            return view
    except (KvrackError, OSError, ValueError) as exc:
        if as_json:
            sys.stdout.write(json.dumps({"error": str(exc), "code": getattr(exc, "code", None),
                                         "address": address}) + "\n")
        else:
            console.print(f"[red]cannot reach kvrackd: {escape(str(exc))}")
        raise typer.Exit(1) from None


def _tier_row(t: dict[str, Any]) -> tuple[str, ...]:
    """One tier of the stats view: capacity, use (in the capacity's unit), blocks, segments, fragmentation and
    the share of looked-up keys it served."""
    d = t["detail"]
    if not t["present"]:
        return (t["tier"], "-", "-", "-", "-", "-", "unavailable" if d.get("available") is False else "absent")
    cap, used = t["capacity_bytes"], t["used_bytes"]
    unit = unit_of(cap)  # used in the unit of the capacity, so the two read side by side
    pct = f" {100 * used / cap:.0f}%" if cap else ""
    looked = t["hits"] + t["misses"]
    segments = f"{d['segments_assigned']}/{d['segments_total']}" if "segments_total" in d else "-"
    frag = f"{d['fragmentation']:.2f}" if "fragmentation" in d else "-"
    return (t["tier"], in_unit(cap, unit), f"{in_unit(used, unit)}{pct}", f"{t['blocks']:,}", segments, frag,
            f"{t['hits'] / looked:.3f}" if looked else "-")


@app.command()
def status(address: AddressOpt = None, namespace: str = "default", admin: AdminOpt = None, token: TokenOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="print the stats view (or the error) as JSON")] = False
           ) -> None:
    """Tiers, capacity, use, blocks and hit ratio of a running daemon (through its admin API; the data socket's
    stats when the admin API is off)."""
    stats = _fetch_stats(address, namespace, as_json, admin, token)
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    d = stats.get("daemon", {})
    drain = stats.get("drain", {}).get("state", "serving")
    console.print(f"kvrackd {d.get('version', '?')} pid {d.get('pid', '?')} up {d.get('uptime_s', '?')} s, "
                  f"{stats['sessions']} session(s), at {stats['address']}" + ("" if drain == "serving" else f", {drain}"))
    tcp = stats.get("tcp")
    if tcp:
        console.print(f"remote clients: {tcp['address']}" + (" (NIXL)" if tcp.get("nixl") else ""))
    table = Table(title="tiers", min_width=60)
    for col in ("tier", "capacity", "used", "blocks", "segs", "frag", "hit"):
        table.add_column(col, justify="left" if col == "tier" else "right", no_wrap=True)
    notes = []
    for t in stats["tiers"]:
        table.add_row(*_tier_row(t))
        if t["degraded"]:
            notes.append(f"[yellow]{t['tier']} tier {'unavailable' if t['detail'].get('available') is False else 'degraded'}"
                         f": {escape(str(t['detail'].get('degraded') or t['degraded']))}")
        elif not t["present"]:
            notes.append(f"[dim]{t['tier']} tier absent: {escape(t.get('reason') or '')}")
    console.print(table)
    for note in notes:
        console.print(note)
    nvme = next((t for t in stats["tiers"] if t["tier"] == "nvme" and t["present"]), None)
    if nvme is not None:
        n = nvme["detail"]
        console.print(f"nvme: pending writes {n['pending_writes']}, written {n['written_blocks']}, read back "
                      f"{n['promoted_blocks']}, errors {n['read_errors']} read / {n['write_errors']} write, "
                      f"evictions {n['evictions']}")
    ops = stats["counters"]
    console.print(f"puts {ops['puts']}, evictions {ops['evictions']}, no-space {ops['no_space']}, expired "
                  f"reservations {ops['expired_reservations']}, expired pins {ops['expired_pins']}")
    lookups = stats["lookups"]
    if lookups["keys"]:
        console.print(f"lookups {lookups['keys']:,}, hit ratio {lookups['hit_ratio']:.3f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
