"""``kvrack`` commands that operate a running daemon through its admin API: tiers, namespaces, blocks, config,
quota, evict, drain. Each prints a table, or the API's JSON with ``--json``; errors exit 1 (as JSON with
``--json``)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvrack.cli.common import AddressOpt, console
from kvrack.clients.admin import AdminApiError, AdminClient
from kvrack.sizes import SizeError, format_size, parse_size

AdminOpt = Annotated[str | None, typer.Option(
    "--admin", help="the admin API: its socket path, unix:PATH or http://HOST:PORT; default: $KVRACK_ADMIN, else "
                    "kvrack-admin.sock beside the daemon's socket")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="admin token (default: $KVRACK_ADMIN_TOKEN, $KVRACK_ADMIN_TOKEN_FILE, else kvrack-admin.token "
                    "beside the admin socket)")]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's answer (or the error) as JSON")]

blocks_app = typer.Typer(help="Blocks of a namespace: list, inspect, remove, clear.", no_args_is_help=True)
config_app = typer.Typer(help="Settings of the running daemon: show them, change the runtime ones.",
                         no_args_is_help=True)
quota_app = typer.Typer(help="Per-namespace quotas: show, set.", no_args_is_help=True)


def client(admin: str | None, address: str | None, token: str | None) -> AdminClient:
    return AdminClient(admin, token, data_address=address)


def run(as_json: bool, fn: Callable[[], Any], show: Callable[[Any], None]) -> None:
    """Call the API; print JSON or the human view; on an error say why and exit 1."""
    try:
        out = fn()
    except AdminApiError as exc:
        fail(exc, as_json)
    if as_json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        show(out)


def fail(exc: AdminApiError, as_json: bool) -> NoReturn:
    if as_json:
        sys.stdout.write(json.dumps({"error": exc.message, **exc.as_dict()}) + "\n")
    else:
        hint = ""
        if exc.status == 401:
            hint = " (give --token, or run as a user who can read the admin token file)"
        console.print(f"[red]{escape(exc.error)}: {escape(exc.message)}{hint}")
        if isinstance(exc.detail, dict):
            for name, why in exc.detail.items():
                console.print(f"  {escape(str(name))}: {escape(str(why))}")
    raise typer.Exit(1)


def size_cell(n: Any) -> str:
    return format_size(int(n)) if isinstance(n, int) else "-"


# ---------------------------------------------------------------------------------------------- tiers
def tiers(admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None, as_json: AsJson = False) -> None:
    """Every tier: capacity, use, blocks, hits, evictions, promotions, demotions, state."""
    def show(rows: list[dict[str, Any]]) -> None:
        table = Table(title="tiers")
        for col in ("tier", "capacity", "used", "blocks", "hits", "evicted", "up", "down", "state"):
            table.add_column(col, justify="left" if col in ("tier", "state") else "right", no_wrap=True)
        notes = []
        for t in rows:
            if not t["present"]:
                table.add_row(t["tier"], "-", "-", "-", "-", "-", "-", "-", "absent")
                notes.append(f"[dim]{t['tier']}: {escape(t.get('reason') or t['degraded'] or 'absent')}")
                continue
            table.add_row(t["tier"], size_cell(t["capacity_bytes"]), size_cell(t["used_bytes"]), f"{t['blocks']:,}",
                          f"{t['hits']:,}", f"{sum(t['evictions'].values()):,}", f"{t['promotions']:,}",
                          f"{t['demotions']:,}", "degraded" if t["degraded"] else "ok")
            if t["degraded"]:
                notes.append(f"[yellow]{t['tier']}: {escape(t['degraded'])}")
        console.print(table)
        console.print("up: blocks promoted into the tier; down: blocks demoted into it")
        for note in notes:
            console.print(note)
    run(as_json, client(admin, address, token).tiers, show)


# ------------------------------------------------------------------------------------------ namespaces
def namespaces(admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
               as_json: AsJson = False) -> None:
    """Every namespace: sessions, blocks and bytes per tier, quota, hit ratio."""
    def show(rows: list[dict[str, Any]]) -> None:
        table = Table(title="namespaces")
        for col in ("namespace", "sessions", "blocks", "dram", "nvme", "quota", "hit"):
            table.add_column(col, justify="left" if col in ("namespace", "quota") else "right", no_wrap=True)
        for ns in rows:
            quota = ", ".join(f"{k} {size_cell(v) if k.endswith('bytes') else v}" for k, v in ns["quota"].items())
            hit = f"{ns['lookup_hits'] / ns['lookup_keys']:.3f}" if ns["lookup_keys"] else "-"
            table.add_row(escape(ns["name"]), str(ns["sessions"]), f"{ns['blocks']:,}", size_cell(ns["dram_bytes"]),
                          size_cell(ns["nvme_bytes"]), escape(quota) or "none", hit)
        console.print(table)
    run(as_json, client(admin, address, token).namespaces, show)


# -------------------------------------------------------------------------------------------- blocks
def _block_rows(blocks: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("key", "size", "state", "tiers", "age", "hits", "pins"):
        table.add_column(col, justify="left" if col in ("key", "state", "tiers") else "right", no_wrap=True)
    for b in blocks:
        table.add_row(b["key"][:16] + "…", size_cell(b["size_bytes"]), b["state"],
                      ",".join(c["tier"] for c in b["copies"]), "-" if b["age_s"] is None else f"{b['age_s']}s",
                      "-" if b["hits"] is None else str(b["hits"]), str(b["pins"]))
    return table


@blocks_app.command("ls")
def blocks_ls(namespace: Annotated[str, typer.Argument(help="namespace")] = "default",
              prefix: Annotated[str, typer.Option(help="key prefix, hex")] = "",
              limit: Annotated[int, typer.Option(help="blocks per page (1-1000)")] = 50,
              cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
              admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
              as_json: AsJson = False) -> None:
    """A page of a namespace's blocks in key order (metadata only)."""
    def show(page: dict[str, Any]) -> None:
        console.print(_block_rows(page["blocks"], f"blocks of {escape(page['namespace'])}"))
        if page["next_cursor"]:
            console.print(f"more: --cursor {page['next_cursor']}")
    run(as_json, lambda: client(admin, address, token).blocks(namespace, prefix, limit, cursor), show)


@blocks_app.command("inspect")
def blocks_inspect(namespace: str, key: Annotated[str, typer.Argument(help="the block's key, 64 hex digits")],
                   admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
                   as_json: AsJson = False) -> None:
    """One block: copies per tier, size, age, hits, pins, parent."""
    def show(b: dict[str, Any]) -> None:
        for k, v in b.items():
            console.print(f"{k:17} {escape(json.dumps(v) if isinstance(v, (list, dict)) else str(v))}")
    run(as_json, lambda: client(admin, address, token).block(namespace, key), show)


@blocks_app.command("rm")
def blocks_rm(namespace: str, keys: Annotated[list[str], typer.Argument(help="keys, 64 hex digits each")],
              admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
              as_json: AsJson = False) -> None:
    """Delete blocks from every tier."""
    api = client(admin, address, token)
    done: list[dict[str, Any]] = []
    for key in keys:
        try:
            done.append(api.delete_block(namespace, key))
        except AdminApiError as exc:
            if as_json:
                sys.stdout.write(json.dumps({"deleted": done, "error": exc.message, **exc.as_dict()}) + "\n")
                raise typer.Exit(1) from None
            fail(exc, False)
        if not as_json:
            console.print(f"deleted {key}")
    if as_json:
        sys.stdout.write(json.dumps({"deleted": done}, indent=2) + "\n")


@blocks_app.command("clear")
def blocks_clear(namespace: str, admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
                 yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
                 as_json: AsJson = False) -> None:
    """Delete every committed block of a namespace (a progress bar per slice)."""
    api = client(admin, address, token)
    try:
        ns = next((n for n in api.namespaces() if n["name"] == namespace), None)
    except AdminApiError as exc:
        fail(exc, as_json)
    if ns is None:
        fail(AdminApiError(404, 200, "UNKNOWN_NAMESPACE", f"no namespace {namespace!r} is configured"), as_json)
    total = ns["blocks"]
    if not yes and not as_json and not typer.confirm(f"delete the {total:,} block(s) of {namespace!r}?"):
        raise typer.Exit(1)
    deleted = 0
    with _progress(as_json) as progress:
        task = progress.add_task(f"clearing {namespace}", total=max(total, 1))
        while True:
            try:
                out = api.clear(namespace, limit=max(1024, total // 50))
            except AdminApiError as exc:
                fail(exc, as_json)
            deleted += out["deleted"]
            progress.update(task, completed=min(deleted, total))
            if not out["deleted"] or not out["remaining"]:
                break
    result = {"namespace": namespace, "deleted": deleted, "remaining": out["remaining"], "writing": out["writing"]}
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(f"deleted {deleted:,} block(s); {out['remaining']:,} left, {out['writing']} being written")


# -------------------------------------------------------------------------------------------- config
@config_app.command("get")
def config_get(name: Annotated[str | None, typer.Argument(help="one setting, e.g. log.level")] = None,
               admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
               as_json: AsJson = False) -> None:
    """Effective settings with their sources ("runtime" ones may change without a restart)."""
    def fetch() -> Any:
        out = client(admin, address, token).config()
        if name is None:
            return out
        if name not in out["settings"]:
            raise AdminApiError(404, 102, "BAD_REQUEST", f"no setting {name!r}")
        return {name: out["settings"][name]}

    def show(out: dict[str, Any]) -> None:
        settings = out.get("settings", out)
        table = Table(title="settings")
        for col in ("setting", "value", "source", "runtime"):
            table.add_column(col, no_wrap=col != "value")
        for key, s in settings.items():
            table.add_row(key, escape(json.dumps(s["value"])), escape(s["source"]), "yes" if s["runtime"] else "")
        console.print(table)
    run(as_json, fetch, show)


@config_app.command("set")
def config_set(assignments: Annotated[list[str], typer.Argument(help="NAME=VALUE ...")],
               admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
               as_json: AsJson = False) -> None:
    """Change settings marked changeable at runtime: all of them or none."""
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}")
        values[key.strip()] = value.strip()

    def show(out: dict[str, Any]) -> None:
        if not out["changed"]:
            console.print("nothing changed (the values were already in effect)")
        for key, value in out["changed"].items():
            console.print(f"{key} = {value!r}")
    run(as_json, lambda: client(admin, address, token).set_config(values), show)


# --------------------------------------------------------------------------------------------- quota
QUOTA_KEYS = ("dram_bytes", "dram_blocks", "nvme_bytes", "nvme_blocks", "leases")  # the admin API's quota fields
def _show_quota(q: dict[str, Any]) -> None:
    table = Table(title=f"quota of {escape(q['namespace'])}")
    for col in ("", "used", "quota"):
        table.add_column(col, justify="left" if not col else "right")
    for field in QUOTA_KEYS:
        limit = q["quota"].get(field)
        fmt = size_cell if field.endswith("bytes") else (lambda v: f"{v:,}")
        table.add_row(field, fmt(q.get(field, 0)), fmt(limit) if limit else "none")
    console.print(table)
    if q.get("evicted_blocks"):
        console.print(f"evicted {q['evicted_blocks']:,} of its block(s) to fit")


@quota_app.command("get")
def quota_get(namespace: Annotated[str, typer.Argument(help="namespace")] = "default", admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
              as_json: AsJson = False) -> None:
    """A namespace's quota and use."""
    run(as_json, lambda: client(admin, address, token).quota(namespace), _show_quota)


@quota_app.command("set")
def quota_set(namespace: str,
              limits: Annotated[list[str], typer.Argument(help="dram_bytes=SIZE dram_blocks=N nvme_bytes=SIZE "
                                                              "nvme_blocks=N leases=N (0 or none: no limit)")],
              admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None,
              as_json: AsJson = False) -> None:
    """Replace a namespace's quota (limits left out are lifted); over it, its own blocks are evicted now."""
    quota: dict[str, int] = {}
    for item in limits:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in QUOTA_KEYS:
            raise typer.BadParameter(f"expected {', '.join(k + '=' for k in QUOTA_KEYS)}; got {item!r}")
        if value.lower() in ("none", "0", ""):
            continue
        try:
            quota[key] = parse_size(value) if key.endswith("bytes") else int(value)
        except (SizeError, ValueError) as exc:
            raise typer.BadParameter(f"{key}: {exc}") from None
    run(as_json, lambda: client(admin, address, token).set_quota(namespace, **quota), _show_quota)


# --------------------------------------------------------------------------------------------- evict
def evict(tier: Annotated[str, typer.Argument(help="dram or nvme")],
          size: Annotated[str | None, typer.Option("--bytes", help="how much, e.g. 4GiB")] = None,
          share: Annotated[float | None, typer.Option("--share", help="a share of what the tier holds, 0-1")] = None,
          admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None, as_json: AsJson = False) -> None:
    """Evict blocks from a tier by its policy (pinned blocks stay), with a progress bar."""
    if (size is None) == (share is None):
        raise typer.BadParameter("give exactly one of --bytes and --share")
    api = client(admin, address, token)
    try:
        used = next((t["used_bytes"] for t in api.tiers() if t["tier"] == tier), None)
        target = parse_size(size) if size is not None else int((used or 0) * (share or 0.0))
    except AdminApiError as exc:
        fail(exc, as_json)
    except SizeError as exc:
        raise typer.BadParameter(str(exc)) from None
    steps = 20  # one request per step: the bar moves, and each request is a short one for the daemon
    blocks = freed = 0
    with _progress(as_json) as progress:
        task = progress.add_task(f"evicting {tier}", total=max(target, 1))
        while freed < target:
            try:
                out = api.evict(tier, nbytes=min(target - freed, max(1, target // steps)))
            except AdminApiError as exc:
                fail(exc, as_json)
            blocks += out["evicted_blocks"]
            freed += out["evicted_bytes"]
            progress.update(task, completed=min(freed, target))
            if not out["evicted_blocks"]:
                break
    result: dict[str, Any] = {"tier": tier, "requested_bytes": target, "evicted_blocks": blocks, "evicted_bytes": freed,
              "used_bytes": out["used_bytes"] if target else used}
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(f"evicted {blocks:,} block(s), {format_size(freed)}; {tier} now holds "
                      f"{format_size(result['used_bytes'] or 0)}")


# --------------------------------------------------------------------------------------------- drain
def drain(grace: Annotated[float | None, typer.Option("--grace", help="seconds work in flight may take "
                                                      "(default: server.drain_timeout_s)")] = None,
          admin: AdminOpt = None, address: AddressOpt = None, token: TokenOpt = None, as_json: AsJson = False) -> None:
    """Drain the daemon and let it exit: no new clients or puts, work in flight finishes (progress shown),
    persistent tiers made durable. SIGTERM takes the same path."""
    api = client(admin, address, token)
    try:
        status = api.drain_status()
    except AdminApiError as exc:
        fail(exc, as_json)
    answer: dict[str, Any] = {}

    def wait_for_it() -> None:  # the drain's own request answers once the daemon stopped, with its report
        try:
            answer["status"] = api.request("POST", "/v1/drain", body={"grace_s": grace} if grace is not None else None,
                                           query={"wait": "true"}, timeout=(grace or 600.0) + 120.0)
        except AdminApiError as exc:
            answer["error"] = exc

    waiter = threading.Thread(target=wait_for_it, daemon=True)
    waiter.start()
    start_held = 0
    with _progress(as_json) as progress:
        task = progress.add_task("draining", total=1)
        while waiter.is_alive():
            waiter.join(0.1)
            try:
                now = api.drain_status()
            except AdminApiError:
                continue
            held = now.get("reservations", 0) + now.get("pins", 0) + now.get("in_flight", 0)
            start_held = max(start_held, held, 1)
            progress.update(task, total=start_held, completed=start_held - held if now["state"] == "draining"
                            else start_held, description=f"{now['state']}: {now.get('sessions', 0)} session(s), "
                                                         f"{held} held")
        progress.update(task, total=max(start_held, 1), completed=max(start_held, 1), description="stopped")
    if "error" in answer:
        fail(answer["error"], as_json)
    status = answer["status"]
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return
    report = status.get("report") or {}
    console.print(f"drained ({status.get('reason') or 'admin API'}) in {report.get('waited_s', status.get('elapsed_s'))} s"
                  + ("" if report.get("quiet", True) else
                     f"; grace over: {report.get('reservations_aborted', 0)} reservation(s) aborted, "
                     f"{report.get('pins_released', 0)} pin(s) released")
                  + (f"; {report['nvme_not_persisted']} block(s) not on nvme" if report.get("nvme_not_persisted")
                     else "") + "; the daemon stopped")


class _Quiet:
    """A progress bar that shows nothing (under --json)."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: Any, **kw: Any) -> int:
        return 0

    def update(self, *a: Any, **kw: Any) -> None:
        return None


def _progress(quiet: bool) -> Any:
    if quiet:
        return _Quiet()
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def register(app: typer.Typer) -> None:
    """Add the admin commands to the ``kvrack`` command."""
    app.command()(tiers)
    app.command()(namespaces)
    app.command()(evict)
    app.command()(drain)
    app.add_typer(blocks_app, name="blocks")
    app.add_typer(config_app, name="config")
    app.add_typer(quota_app, name="quota")
