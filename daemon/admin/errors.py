"""The admin API's one error shape: an HTTP status, kvrack's error code (its name too) and a message."""

from __future__ import annotations

from typing import Any

from kvrack.protocol import ErrorCode


class AdminError(Exception):
    """A request the admin API answers with an error body."""

    def __init__(self, status: int, code: ErrorCode, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.detail)


def error_body(code: ErrorCode, message: str, detail: Any = None) -> dict[str, Any]:
    """``{"code": 301, "error": "NOT_FOUND", "message": "...", "detail": ...}``."""
    out: dict[str, Any] = {"code": int(code), "error": code.name, "message": message}
    if detail is not None:
        out["detail"] = detail
    return out


def not_found(message: str) -> AdminError:
    return AdminError(404, ErrorCode.NOT_FOUND, message)


def unknown_namespace(name: str) -> AdminError:
    return AdminError(404, ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {name!r} is configured")


def bad_request(message: str, detail: Any = None) -> AdminError:
    return AdminError(400, ErrorCode.BAD_REQUEST, message, detail)
