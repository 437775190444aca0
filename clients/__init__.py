"""kvrack clients: keys and layouts, the sync and asyncio ``Client``, and the ``kvrack`` CLI."""

from kvrack.clients.aio import AsyncClient, AsyncLease
from kvrack.clients.client import Client, Lease
from kvrack.clients.core import LookupResult, PutResult
from kvrack.clients.errors import KvrackError
from kvrack.clients.keys import BlockKey, KeyBuilder, as_key
from kvrack.clients.layout import Layout
from kvrack.daemon.protocol import ErrorCode, TierId

__all__ = ["AsyncClient", "AsyncLease", "BlockKey", "Client", "ErrorCode", "KeyBuilder", "KvrackError", "Layout", "Lease",
           "LookupResult", "PutResult", "TierId", "as_key"]
