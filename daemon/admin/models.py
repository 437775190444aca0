"""Request and response bodies of the admin API: the OpenAPI schema (docs/openapi.json) is generated from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from kvrack.daemon.settings_table import SETTINGS, Setting

STRICT = ConfigDict(extra="forbid", strict=True)
MAX_INT = 2**53 - 1  # the largest integer a JSON number carries exactly


def _whole(value: Any) -> Any:
    """JSON Schema's integers include 1.0: take a whole float as an int (strict mode still refuses bools, strings)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(ge: float | None = 0, le: float | None = MAX_INT) -> Any:
    """An integer field's type with its bounds inside it (so the schema says minimum/maximum even in a union);
    the bounds before the validator, or the schema would carry them under names JSON Schema does not know."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_whole)]


# a byte or block count: 0 .. 2^53-1
Count = Annotated[int, Field(ge=0, le=MAX_INT), BeforeValidator(_whole)]
# what kvrack.sizes.parse_size reads: a number and an optional unit (IEC, SI; bare K/M/G/T are refused there)
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bB]|[kKmMgGtT][iI][bB]?|[kKmMgGtT][bB])?\s*$"


class ErrorBody(BaseModel):
    """Every error: kvrack's code (``kvrack.protocol.ErrorCode``), its name, and what went wrong."""

    code: int = Field(description="kvrack error code, e.g. 301")
    error: str = Field(description="the code's name, e.g. NOT_FOUND")
    message: str
    detail: Any = None


class Health(BaseModel):
    status: str = Field(description="ok, or stalled when the daemon's event loop has not run for a while")
    version: str
    pid: int
    uptime_s: float
    loop_lag_s: float = Field(description="seconds since the event loop last ran its heartbeat")


class Ready(BaseModel):
    status: str = Field(description="ready, draining or stopped")
    reason: str | None = None


class TierRow(BaseModel):
    tier: str
    present: bool
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int = Field(description="keys looked up that this tier served")
    misses: int = Field(description="keys looked up that this tier did not serve")
    evictions: dict[str, int] = Field(description="evicted blocks by reason")
    promotions: int = Field(description="blocks copied into this tier from a slower one")
    demotions: int = Field(description="blocks this tier took from a faster one as it evicted them")
    moved_bytes: dict[str, int] = Field(description="bytes copied in and out of this tier")
    degraded: str | None
    reason: str | None = None
    detail: dict[str, Any]


class NamespaceRow(BaseModel):
    name: str
    remote: bool = Field(description="TCP clients may use it (it has a token)")
    uids: list[int]
    gids: list[int]
    sessions: int
    blocks: int
    bytes: int
    entries: int
    dram_blocks: int
    dram_bytes: int
    nvme_blocks: int
    nvme_bytes: int
    quota: dict[str, int]
    lookup_keys: int
    lookup_hits: int


class Block(BaseModel):
    namespace: str
    key: str
    size_bytes: int | None
    state: str = Field(description="writing, committed or deleted (still pinned)")
    copies: list[dict[str, Any]]
    age_s: int | None = Field(description="seconds since its NVMe copy was written (null without one)")
    hits: int | None = Field(description="times it was acquired")
    pins: int
    parent: str | None
    children_in_dram: int


class BlockPage(BaseModel):
    namespace: str
    blocks: list[Block]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class Deleted(BaseModel):
    namespace: str
    key: str
    deleted: bool


class Cleared(BaseModel):
    namespace: str
    deleted: int
    remaining: int = Field(description="committed blocks left (more to clear when a limit was given)")
    writing: int = Field(description="blocks being written, left to their writers")


class QuotaIn(BaseModel):
    """A namespace's whole quota; a field left out or 0 means no limit of that kind."""

    model_config = STRICT
    dram_bytes: Count | None = None
    dram_blocks: Count | None = None
    nvme_bytes: Count | None = None
    nvme_blocks: Count | None = None
    leases: Count | None = None


class QuotaOut(BaseModel):
    namespace: str
    quota: dict[str, int]
    dram_bytes: int
    dram_blocks: int
    nvme_bytes: int
    nvme_blocks: int
    leases: int = 0  # reservations and pins its connections hold now
    evicted_blocks: int = 0


class SettingOut(BaseModel):
    value: Any
    source: str
    default: Any
    runtime: bool = Field(description="may change without a restart (PATCH /v1/config, SIGHUP)")


class NamespaceConfigOut(BaseModel):
    name: str
    uids: list[int]
    gids: list[int]
    remote: bool
    quota: dict[str, int]


class ConfigOut(BaseModel):
    path: str | None
    settings: dict[str, SettingOut]
    namespaces: list[NamespaceConfigOut]


class Changed(BaseModel):
    changed: dict[str, Any] = Field(description="the settings that changed, with their new values")


class DrainIn(BaseModel):
    model_config = STRICT
    grace_s: float | None = Field(None, ge=0.0, le=3600.0,
                                  description="how long to wait for work in flight (default server.drain_timeout_s)")


class DrainStatus(BaseModel):
    state: str = Field(description="serving, draining, flushing or stopped")
    reason: str | None = None
    elapsed_s: float | None = None
    grace_s: float | None = None
    sessions: int = 0
    reservations: int = 0
    pins: int = 0
    in_flight: int = 0
    pending_output_bytes: int = 0
    nvme_pending: int = 0
    report: dict[str, Any] | None = None


class EvictBytes(BaseModel):
    """Evict this many bytes."""

    model_config = STRICT
    bytes: Count


class EvictShare(BaseModel):
    """Evict this share of what the tier holds."""

    model_config = STRICT
    share: float = Field(ge=0.0, le=1.0)


class Evicted(BaseModel):
    tier: str
    requested_bytes: int
    evicted_blocks: int
    evicted_bytes: int
    used_bytes: int


def _patch_field(setting: Setting) -> tuple[Any, Any]:
    """A setting as an optional field of the PATCH body, typed and bounded as the settings table says."""
    kind: Any
    if setting.kind == "int":
        kind = integer(setting.min, setting.max)
    elif setting.kind == "float":
        kind = Annotated[float, Field(ge=setting.min, le=setting.max)]
    elif setting.kind == "bool":
        kind = bool
    elif setting.kind == "size":  # bounds checked by the table (a size may be a string)
        kind = integer() | Annotated[str, Field(pattern=SIZE_PATTERN)]
    elif setting.kind == "list":
        kind = list[str]
    elif setting.choices:
        kind = Literal[setting.choices]
    else:
        kind = str
    help_text = setting.help + (" (changeable at runtime)" if setting.runtime else " (needs a restart)")
    return kind | None, Field(None, alias=setting.name, description=help_text)


# PATCH /v1/config: setting name -> value; every setting is known to the schema (an unknown one is a 422), the
# ones not changeable at runtime are refused by the daemon with 409 and a message saying a restart is needed
ConfigPatch = create_model(  # type: ignore[call-overload]
    "ConfigPatch", __config__=ConfigDict(extra="forbid", strict=True, populate_by_name=False),
    **{s.name.replace(".", "__"): _patch_field(s) for s in SETTINGS})
