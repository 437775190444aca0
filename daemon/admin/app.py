"""The admin API (FastAPI): health, stats, tiers, namespaces, blocks, quotas, settings, eviction, drain, and
``/metrics`` for Prometheus.

Every handler asks the data loop for what it needs through the bridge and shapes the answer here, on the
admin thread. Mutations need the bearer token (``admin.token_file``); reads need it too when
``admin.read_auth`` is set; ``/healthz`` and ``/readyz`` never do. Every error has one shape
(``ErrorBody``): kvrack's code, its name and a message.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import hmac
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kvrack import __version__
from kvrack.daemon.admin import models as M
from kvrack.daemon.admin.bridge import LoopBridge
from kvrack.daemon.admin.errors import AdminError, error_body
from kvrack.daemon.admin.ops import AdminOps, parse_key
from kvrack.daemon.metrics import render
from kvrack.protocol import KEY_BYTES, ErrorCode

if TYPE_CHECKING:
    from kvrack.daemon.daemon import Daemon

log = logging.getLogger("kvrack.admin")
STALLED_AFTER_S = 10.0  # /healthz fails when the event loop's heartbeat is older than this
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": M.ErrorBody, "description": text} for status, text in (
        (400, "bad request"), (401, "no or wrong admin token"), (404, "no such namespace, block, tier or route"),
        (409, "conflict (a block being written)"), (422, "invalid body or parameters; nothing was changed"),
        (503, "the daemon is stopping or its event loop is stalled"))}
bearer = HTTPBearer(auto_error=False, description="the admin token (admin.token_file)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
NamespaceName = Annotated[str, Path(description="namespace name", max_length=256, examples=["default"])]
HEX_KEY = f"^[0-9a-fA-F]{{{2 * KEY_BYTES}}}$"
KeyHex = Annotated[str, Path(pattern=HEX_KEY, description="the block's key, 64 hex digits", examples=["00" * KEY_BYTES])]
# reads need the token only with admin.read_auth: in the schema, a bearer token is optional on them
OPTIONAL_AUTH: dict[str, Any] = {"security": [{}, {"HTTPBearer": []}]}


def _hex_prefix(prefix: str) -> tuple[bytes, int | None]:
    """A key prefix in hex (any number of digits): its whole bytes and the odd trailing nibble."""
    if len(prefix) > 2 * KEY_BYTES or any(c not in "0123456789abcdefABCDEF" for c in prefix):
        raise AdminError(400, ErrorCode.INVALID_KEY, f"prefix must be up to {2 * KEY_BYTES} hex digits")
    whole = bytes.fromhex(prefix[: len(prefix) & ~1])
    return whole, int(prefix[-1], 16) if len(prefix) % 2 else None


def _page(keys: list[bytes], prefix: str, cursor: str | None, limit: int) -> tuple[list[bytes], bool]:
    """The ``limit`` smallest keys matching ``prefix`` after ``cursor``, and whether more follow (a thread)."""
    whole, nibble = _hex_prefix(prefix)
    after = parse_key(cursor) if cursor else b""
    n = len(whole)

    def match(k: bytes) -> bool:
        return k > after and k.startswith(whole) and (nibble is None or (len(k) > n and k[n] >> 4 == nibble))

    found = heapq.nsmallest(limit + 1, filter(match, keys))
    return found[:limit], len(found) > limit


def build_app(daemon: Daemon, bridge: LoopBridge) -> FastAPI:
    """The admin application of one running daemon."""
    ops = AdminOps(daemon)
    app = FastAPI(title="kvrack admin API", version=__version__,
                  description="Operate a kvrackd: health, stats, blocks, quotas, settings, eviction and drain. "
                              "See docs/operations.md.", docs_url=None, redoc_url=None)
    router = APIRouter(responses=ERRORS)

    def token_ok(creds: HTTPAuthorizationCredentials | None) -> bool:
        token = daemon.admin_token
        return bool(token) and creds is not None and hmac.compare_digest(creds.credentials.encode(), token)

    def need_token(creds: Credentials) -> None:
        if not token_ok(creds):
            raise AdminError(401, ErrorCode.UNAUTHENTICATED, "this needs the admin token: send 'Authorization: "
                             "Bearer <token>' (the first line of admin.token_file)")

    def need_read(request: Request) -> None:
        if daemon.config.admin.read_auth:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" else None
            need_token(given)

    write = [Depends(need_token)]
    read = [Depends(need_read)]
    get = functools.partial(router.get, dependencies=read, openapi_extra=OPTIONAL_AUTH)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await bridge.call(fn, *args)

    @app.exception_handler(AdminError)
    async def _admin_error(_request: Request, exc: AdminError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse(error_body(ErrorCode.BAD_REQUEST, f"invalid request: {where}", errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.BAD_REQUEST
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method the path has, not only those of the first route matched
            methods: set[str] = set()
            for route in app.routes:
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= route.methods or set()
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("admin API: unexpected error")
        return JSONResponse(error_body(ErrorCode.INTERNAL, "internal error; see the daemon log"), status_code=500)

    # ------------------------------------------------------------------ probes
    @router.get("/healthz", response_model=M.Health, tags=["probes"])
    async def healthz() -> Any:
        """The process is alive and its event loop runs (503 when the loop has stalled)."""
        lag = max(0.0, time.monotonic() - daemon.heartbeat)
        body = {"status": "ok" if lag < STALLED_AFTER_S else "stalled", "version": __version__,
                "pid": daemon.pid, "uptime_s": round(time.time() - daemon.started, 1), "loop_lag_s": round(lag, 3)}
        return body if lag < STALLED_AFTER_S else JSONResponse(body, status_code=503)

    @router.get("/readyz", response_model=M.Ready, tags=["probes"])
    async def readyz() -> Any:
        """The tiers are open and the daemon takes new clients (503 while it drains or before it serves)."""
        state = daemon.drain_state.state
        if state == "serving" and daemon.serving:
            return {"status": "ready"}
        reason = daemon.drain_state.reason if state != "serving" else "starting"
        return JSONResponse({"status": state if state != "serving" else "starting", "reason": reason},
                            status_code=503)

    @get("/metrics", tags=["stats"], response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition"}})
    async def metrics() -> Response:
        """Prometheus metrics, from the same view as /v1/stats."""
        view = await call(ops.view)
        body = render(view, daemon.config.admin.metrics_max_namespaces)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ stats
    @get("/v1/stats", response_model=dict[str, Any], tags=["stats"])
    async def stats() -> Any:
        """Per tier (capacity, use, blocks, hits, misses, evictions, promotions, demotions, bytes moved,
        degraded), per namespace, per op (counts, errors, latency), transfers, leases, sessions, errors."""
        return await call(ops.view)

    @get("/v1/tiers", response_model=list[M.TierRow], tags=["stats"])
    async def tiers() -> Any:
        return (await call(ops.view))["tiers"]

    @get("/v1/namespaces", response_model=list[M.NamespaceRow], tags=["namespaces"])
    async def namespaces() -> Any:
        return await call(ops.namespaces)

    # ------------------------------------------------------------------ blocks
    @get("/v1/namespaces/{ns}/blocks", response_model=M.BlockPage, tags=["blocks"])
    async def blocks(ns: NamespaceName,
                     prefix: Annotated[str, Query(pattern=f"^[0-9a-fA-F]{{0,{2 * KEY_BYTES}}}$",
                                                  description="key prefix, hex")] = "",
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     cursor: Annotated[str | None, Query(pattern=HEX_KEY,
                                                         description="next_cursor of the previous page")] = None
                     ) -> Any:
        """Block metadata, in key order, a page at a time (no block bytes)."""
        _hex_prefix(prefix)
        if cursor:
            parse_key(cursor)
        keys = await call(ops.keys, ns)
        page, more = await asyncio.get_running_loop().run_in_executor(None, _page, keys, prefix, cursor, limit)
        found = await call(ops.blocks, ns, page)
        return {"namespace": ns, "blocks": found, "next_cursor": page[-1].hex() if more and page else None}

    @get("/v1/blocks/{ns}/{key_hex}", response_model=M.Block, tags=["blocks"])
    async def block(ns: NamespaceName, key_hex: KeyHex) -> Any:
        """One block: its copies per tier, size, age, hits, pins."""
        return await call(ops.block, ns, parse_key(key_hex))

    @router.delete("/v1/blocks/{ns}/{key_hex}", response_model=M.Deleted, tags=["blocks"], dependencies=write)
    async def delete_block(ns: NamespaceName, key_hex: KeyHex) -> Any:
        """Delete one block from every tier (bytes a reader has pinned stay valid until it releases them)."""
        return await call(ops.delete, ns, parse_key(key_hex))

    @router.post("/v1/namespaces/{ns}/clear", response_model=M.Cleared, tags=["blocks"], dependencies=write)
    async def clear(ns: NamespaceName,
                    limit: Annotated[int | None, Query(ge=1, le=1 << 40,
                                                       description="delete at most this many")] = None) -> Any:
        """Delete the namespace's committed blocks (all, or up to limit)."""
        return await call(ops.clear, ns, limit)

    # ------------------------------------------------------------------ quotas
    @get("/v1/namespaces/{ns}/quota", response_model=M.QuotaOut, tags=["namespaces"])
    async def get_quota(ns: NamespaceName) -> Any:
        return await call(ops.quota, ns)

    @router.put("/v1/namespaces/{ns}/quota", response_model=M.QuotaOut, tags=["namespaces"], dependencies=write)
    async def put_quota(ns: NamespaceName, quota: M.QuotaIn) -> Any:
        """Replace the namespace's quota; over it, its own blocks are evicted now (never another tenant's)."""
        return await call(ops.set_quota, ns, quota.model_dump(exclude_none=True))

    # ------------------------------------------------------------------ settings
    @get("/v1/config", response_model=M.ConfigOut, tags=["settings"])
    async def config() -> Any:
        """Effective settings, each with its source; namespaces without their secrets."""
        return await call(ops.config)

    @router.patch("/v1/config", response_model=M.Changed, tags=["settings"], dependencies=write)
    async def patch_config(values: M.ConfigPatch) -> Any:
        """Change settings marked changeable at runtime, all or none: a value the settings table refuses is a
        422, a setting that needs a restart a 409; either way nothing changed."""
        return await call(ops.patch_config, values.model_dump(by_alias=True, exclude_none=True))

    # ------------------------------------------------------------------ tiers
    @router.post("/v1/tiers/{tier}/evict", response_model=M.Evicted, tags=["tiers"], dependencies=write)
    async def evict(tier: Annotated[str, Path(max_length=16, examples=["dram"])],
                    body: M.EvictBytes | M.EvictShare) -> Any:
        """Evict bytes (or a share of what the tier holds) by the tier's policy; pinned blocks stay."""
        if isinstance(body, M.EvictBytes):
            return await call(ops.evict, tier, body.bytes, None)
        return await call(ops.evict, tier, None, body.share)

    # ------------------------------------------------------------------ drain
    @get("/v1/drain", response_model=M.DrainStatus, tags=["drain"])
    async def drain_status() -> Any:
        return daemon.drain_status()

    @router.post("/v1/drain", response_model=M.DrainStatus, tags=["drain"], dependencies=write, status_code=202)
    async def drain(body: Annotated[M.DrainIn | None, Body()] = None,
                    wait: Annotated[bool, Query(description="answer once stopped (with the report), not at once")] = False) -> Any:
        """Stop admitting new puts and clients, let readers and writers in flight finish (up to the grace
        period), make the persistent tiers durable, then exit 0: the path SIGTERM takes."""
        status = await call(ops.drain, body.grace_s if body else None)
        if wait:
            while daemon.drain_state.state in ("draining", "flushing"):
                await asyncio.sleep(0.05)
            status = daemon.drain_status()
        return status

    app.include_router(router)
    return app


def openapi_schema() -> dict[str, Any]:
    """The admin API's OpenAPI schema, as served at /openapi.json (``make openapi`` writes docs/openapi.json)."""
    return build_app(None, None).openapi()  # type: ignore[arg-type]


if __name__ == "__main__":
    import json
    import sys

    sys.stdout.write(json.dumps(openapi_schema(), indent=2) + "\n")
