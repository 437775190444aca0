"""What the daemon's copying tiers (CXL, HBM) share: one worker thread, results handed back to the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from kvrack.daemon.movement import CopyingTier


class CopyWorker(CopyingTier):
    """One worker thread, so copies and removals run in the order they were queued."""

    def __init__(self, name: str) -> None:
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def _on_loop(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (from the worker's done callbacks)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is gone (shutdown): pins no longer matter
            pass

    def stop_worker(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown(wait=True)
