"""A wake-up for coroutines waiting on background copies (NVMe writes, CXL copies) to make progress."""

from __future__ import annotations

import asyncio


class ProgressSignal:
    """``wait`` returns True at the next ``fire`` (or False at the timeout); event-loop thread only."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def fire(self) -> None:
        if self._future is not None:
            self._future.set_result(None)
            self._future = None

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> bool:
        if self._future is None:
            self._future = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return False
        return True
