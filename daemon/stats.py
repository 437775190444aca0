"""The one source of every figure the daemon reports.

Each part of the daemon registers the sections it owns (the store: tiers, ops, namespaces, moves; the
server: sessions and requests; the daemon: version and uptime); the ``stats`` request, ``kvrack status``,
the admin API and the Prometheus metrics all read ``snapshot``. With a namespace, a snapshot shows that
namespace's own figures only (what one tenant's client may see).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Source = Callable[[str | None], Any]


class StatsRegistry:
    """Named sections, each read from its owner when a snapshot is taken."""

    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}

    def register(self, section: str, source: Source) -> None:
        if section in self._sources:
            raise ValueError(f"stats section {section!r} is registered twice")
        self._sources[section] = source

    def snapshot(self, namespace: str | None = None) -> dict[str, Any]:
        """Every section's figures now (``namespace``: as one tenant may see them)."""
        return {name: source(namespace) for name, source in self._sources.items()}

    def sections(self) -> list[str]:
        return list(self._sources)
