"""Run a function on the daemon's event loop from the admin thread, and await its result there.

The index, the tiers and the stats belong to the data loop's thread; the admin API never touches them from
its own. Each admin call is one short task on the data loop (a snapshot, a page of keys, a chunk of an
eviction), so a busy admin client costs the data plane slices of a millisecond, never a long stall.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from kvrack.daemon.admin.errors import AdminError
from kvrack.protocol import ErrorCode

T = TypeVar("T")


class LoopBridge:
    """Calls into the data loop from another thread's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0) -> None:
        self.loop = loop
        self.timeout_s = timeout_s

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the data loop (awaited there if it returns a coroutine)."""
        async def run() -> Any:
            out = fn(*args)
            if inspect.isawaitable(out):
                out = await out
            return out

        if self.loop.is_closed() or not self.loop.is_running():
            raise AdminError(503, ErrorCode.SHUTTING_DOWN, "the daemon has stopped serving")
        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise AdminError(503, ErrorCode.INTERNAL, f"the daemon's event loop did not answer within "
                                                      f"{self.timeout_s:.0f} s") from None
