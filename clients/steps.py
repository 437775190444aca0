"""The steps a client operation asks its driver to perform.

Each operation in ``ClientCore`` is a generator: it yields steps and is sent what each step produced, so the
sync client performs them with blocking calls and the asyncio client with awaits, and the logic exists once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import msgspec

from kvrack import protocol as P

T = TypeVar("T")


class Call(msgspec.Struct, frozen=True):
    """Send ``request``; the driver sends back ``(reply, fds)``."""

    op: str
    request: msgspec.Struct


class Post(msgspec.Struct, frozen=True):
    """Send ``request`` without waiting for its reply (it is read and dropped before the next one)."""

    op: str
    request: msgspec.Struct


class Sleep(msgspec.Struct, frozen=True):
    seconds: float


class Transfer(msgspec.Struct, frozen=True):
    """A NIXL one-sided ``READ`` into or ``WRITE`` from ``views``, one per descriptor."""

    op: str
    descriptors: Sequence[P.Descriptor | None]
    views: Sequence[memoryview | None]


class ReadCall(msgspec.Struct, frozen=True):
    """TCP byte stream: send ``request``; the reply's block bytes go where ``sinks(reply)`` says."""

    request: P.Read
    sinks: Callable[[Any], list[memoryview]]


class WriteCall(msgspec.Struct, frozen=True):
    """TCP byte stream: send ``request`` and the block bytes of ``payload`` after it."""

    request: P.Write
    payload: list[memoryview]


Step = Call | Post | Sleep | Transfer | ReadCall | WriteCall
# an operation: yields steps, is sent each step's result, returns T
Op = Generator[Step, Any, T]
