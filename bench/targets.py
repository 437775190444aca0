"""Each benchmark figure against its target: the same verdict in the table and in the JSON."""

from __future__ import annotations

from typing import Any

OPS = {">=": lambda value, bound: value >= bound, "<=": lambda value, bound: value <= bound}


def check_targets(result: dict[str, Any], targets: dict[str, tuple[str, float]]) -> dict[str, dict[str, Any]]:
    """``{figure: {"value", "target", "pass"}}`` for each target whose figure the result holds."""
    checks = {}
    for name, (op, bound) in targets.items():
        value = result.get(name)
        if value is None:
            continue
        checks[name] = {"value": value, "target": f"{op} {bound:,}", "pass": bool(OPS[op](value, bound))}
    return checks


def verdict(checks: dict[str, dict[str, Any]], name: str) -> str:
    """The target column of a table row: ``≥ 0.8 pass`` / ``≤ 50 FAIL``; empty without a target."""
    check = checks.get(name)
    if check is None:
        return ""
    shown = check["target"].replace(">=", "≥").replace("<=", "≤")
    return f"{shown} [green]pass[/]" if check["pass"] else f"{shown} [red]FAIL[/]"
