"""kvrack clients: keys and layouts, the sync and asyncio ``Client``, and what they raise.

This is what an inference engine imports; it pulls in msgspec, blake3 and numpy, nothing of the daemon.
"""

from kvrack.clients.aio import AsyncClient, AsyncLease
from kvrack.clients.client import Client, Lease
from kvrack.clients.errors import (
    AlreadyExists,
    AuthError,
    ClientClosed,
    ConnectionLost,
    DaemonUnreachable,
    InProgress,
    InvalidRequest,
    KvrackError,
    NoSpace,
    NotFound,
    RequestTimeout,
    SizeMismatch,
    TierUnavailable,
    TransportError,
)
from kvrack.clients.keys import BlockKey, KeyBuilder, as_key
from kvrack.clients.layout import Layout
from kvrack.clients.results import GetResult, LookupResult, PutResult
from kvrack.protocol import ErrorCode, TierId

__all__ = ["AlreadyExists", "AsyncClient", "AsyncLease", "AuthError", "BlockKey", "Client", "ClientClosed",
           "ConnectionLost", "DaemonUnreachable", "ErrorCode", "GetResult", "InProgress", "InvalidRequest",
           "KeyBuilder", "KvrackError", "Layout", "Lease", "LookupResult", "NoSpace", "NotFound", "PutResult",
           "RequestTimeout", "SizeMismatch", "TierId", "TierUnavailable", "TransportError", "as_key"]
