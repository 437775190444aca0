"""What client calls raise: one tree under ``KvrackError``, caught by meaning.

A daemon reply's code picks the class (its group of codes, as ``ErrorCode``'s ranges say), so callers write
``except NoSpace`` rather than compare numbers; the code and the daemon's message stay on the exception.
Failures of the connection itself are ``TransportError`` subclasses that are also the builtin
``ConnectionError`` / ``TimeoutError``, with the ``OSError`` they came from chained as the cause.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from kvrack.protocol import ErrorCode


class ClientCode(enum.IntEnum):
    """Codes of failures on the client's side of the connection (6xx): never on the wire."""

    UNREACHABLE = 600
    CONNECTION_LOST = 601
    TIMEOUT = 602
    CLIENT_CLOSED = 603


class KvrackError(Exception):
    """A kvrack failure: ``code`` is an ``ErrorCode``, ``message`` the daemon's (or client's) words.

    ``codes`` holds the per-key codes when the failure came from a batched op.
    """

    default_code: int = ErrorCode.INTERNAL

    def __init__(self, code: int | None = None, message: str = "", codes: Sequence[int] | None = None) -> None:
        code = int(self.default_code if code is None else code)
        super().__init__(f"{code_name(code)}: {message}" if message else code_name(code))
        self.code = code
        self.message = message
        self.codes = list(codes) if codes is not None else None


class InvalidRequest(KvrackError):
    """The request or one of its keys is malformed: bad frame, wrong key length, size, parent (1xx, 300, 305-309)."""

    default_code = ErrorCode.BAD_REQUEST


class SizeMismatch(InvalidRequest, ValueError):
    """A block's size differs from its buffer's, from the layout's, or from the stored block's of that key."""

    default_code = ErrorCode.INVALID_SIZE


class NotFound(KvrackError):
    """No such block, reservation or pin."""

    default_code = ErrorCode.NOT_FOUND


class AlreadyExists(KvrackError):
    """The block is stored already (a put of it is a no-op, reported per key, not raised)."""

    default_code = ErrorCode.ALREADY_EXISTS


class InProgress(KvrackError):
    """Another client is writing the block now."""

    default_code = ErrorCode.IN_PROGRESS


class NoSpace(KvrackError):
    """The tier (or the namespace's quota) has no room: nothing evictable was found."""

    default_code = ErrorCode.NO_SPACE


class AuthError(KvrackError):
    """Who is asking is not allowed: unknown namespace, bad or missing token, wrong Unix user (2xx)."""

    default_code = ErrorCode.PERMISSION_DENIED


class TierUnavailable(KvrackError):
    """A tier or transport cannot be used now, or the daemon is shutting down."""

    default_code = ErrorCode.TIER_UNAVAILABLE


class TransportError(KvrackError):
    """The connection to the daemon failed, timed out, or carried something unreadable (6xx)."""

    default_code = ClientCode.CONNECTION_LOST


class DaemonUnreachable(TransportError, ConnectionError):
    """No daemon answered at the address (or at any place the default search looked)."""

    default_code = ClientCode.UNREACHABLE


class ConnectionLost(TransportError, ConnectionError):
    """The daemon closed the connection, or the socket failed mid-request."""

    default_code = ClientCode.CONNECTION_LOST


class RequestTimeout(TransportError, TimeoutError):
    """The daemon did not answer (or take the request) within the client's timeout."""

    default_code = ClientCode.TIMEOUT


class ClientClosed(TransportError):
    """The client was closed; connect a new one."""

    default_code = ClientCode.CLIENT_CLOSED


_BY_CODE: dict[int, type[KvrackError]] = {}
for _code in ErrorCode:
    if _code in (ErrorCode.NOT_FOUND, ErrorCode.NOT_RESERVED, ErrorCode.NOT_PINNED, ErrorCode.UNKNOWN_SEGMENT):
        _BY_CODE[_code] = NotFound
    elif _code == ErrorCode.INVALID_SIZE:
        _BY_CODE[_code] = SizeMismatch
    elif _code == ErrorCode.ALREADY_EXISTS:
        _BY_CODE[_code] = AlreadyExists
    elif _code == ErrorCode.IN_PROGRESS:
        _BY_CODE[_code] = InProgress
    elif _code in (ErrorCode.NO_SPACE, ErrorCode.QUOTA_EXCEEDED):
        _BY_CODE[_code] = NoSpace
    elif 200 <= _code < 300:
        _BY_CODE[_code] = AuthError
    elif _code in (ErrorCode.TIER_UNAVAILABLE, ErrorCode.SHUTTING_DOWN, ErrorCode.BUSY):
        _BY_CODE[_code] = TierUnavailable
    elif 100 <= _code < 400:
        _BY_CODE[_code] = InvalidRequest
    else:
        _BY_CODE[_code] = KvrackError
_BY_CODE.update({ClientCode.UNREACHABLE: DaemonUnreachable, ClientCode.CONNECTION_LOST: ConnectionLost,
                 ClientCode.TIMEOUT: RequestTimeout, ClientCode.CLIENT_CLOSED: ClientClosed})


def code_name(code: int) -> str:
    """``ErrorCode``'s name for ``code``, or the number when this client does not know it."""
    for enum_type in (ErrorCode, ClientCode):
        try:
            return enum_type(code).name
        except ValueError:
            pass
    return str(code)


def error_for(code: int, message: str = "", codes: Sequence[int] | None = None) -> KvrackError:
    """The exception of the class that ``code`` belongs to."""
    return _BY_CODE.get(code, KvrackError)(code, message, codes)


__all__ = ["AlreadyExists", "AuthError", "ClientClosed", "ClientCode", "ConnectionLost", "DaemonUnreachable", "InProgress",
           "InvalidRequest", "KvrackError", "NoSpace", "NotFound", "RequestTimeout", "SizeMismatch", "TierUnavailable",
           "TransportError", "code_name", "error_for"]
