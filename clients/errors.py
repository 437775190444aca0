"""The one exception type clients raise for daemon-side failures."""

from __future__ import annotations

from collections.abc import Sequence

from kvrack.daemon.protocol import ErrorCode


class KvrackError(Exception):
    """A daemon-side failure: ``code`` is an ``ErrorCode``, ``message`` the daemon's words.

    ``codes`` holds the per-key codes when the failure came from a batched op.
    """

    def __init__(self, code: int, message: str, codes: Sequence[int] | None = None) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"{name}: {message}" if message else name)
        self.code = code
        self.message = message
        self.codes = list(codes) if codes is not None else None
