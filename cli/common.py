"""What the ``kvrack`` commands share: the console, common options, JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kvrack.sizes import format_size

console = Console()

AddressOpt = Annotated[str | None, typer.Option(
    "--address", "--socket", "-a", "-s",
    help="the daemon: unix:///path, a socket path, tcp://HOST:PORT or tls://HOST:PORT (token from $KVRACK_TOKEN); "
         "default: $KVRACK_ADDRESS, else /run/kvrack/kvrack.sock if it exists, else the per-user socket")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="write the results as JSON to this path")]


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """The convention every bench and sim command follows for ``--json PATH``."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {path}")


def size_names(sizes: str, known: dict[str, int]) -> list[str]:
    """The comma-separated ``--sizes`` of a bench, each one it knows."""
    names = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise typer.BadParameter(f"unknown size(s) {unknown}; choose from {', '.join(known)}")
    return names


def fmt_bytes(n: Any) -> str:
    return format_size(int(n)) if isinstance(n, int) and n and n % 1024 == 0 else str(n)
