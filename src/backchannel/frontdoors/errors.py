"""Every error leaves as JSON: Cometa's ``msg`` plus a stable ``error`` code and a ``detail``.

Call outcomes from the core map to statuses here, in one table, so each front door
answers the same way (COMPAT.md keeps Cometa's 408 and 418).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from backchannel.core.outcomes import (
    CallFailed,
    CallTimedOut,
    DeviceBusy,
    DeviceDisconnected,
    DeviceError,
    DeviceOffline,
    InvalidMessage,
    ShuttingDown,
)

log = logging.getLogger(__name__)

# Cometa's own wording where it had one (COMPAT.md); the standard phrase otherwise.
_MSG = {408: "Request Time-out", 418: "Device not attached", 413: "Payload Too Large"}

OUTCOME_STATUS: dict[type[CallFailed], int] = {
    DeviceOffline: 418,
    CallTimedOut: 408,
    DeviceError: 502,
    DeviceDisconnected: 502,
    DeviceBusy: 429,
    InvalidMessage: 400,
    ShuttingDown: 503,
}


#: The request body limit of the application, for 413 bodies.
MAX_BODY = web.AppKey("backchannel.max_body", int)


class ApiError(Exception):
    """Raised by handlers; the middleware turns it into a JSON error response."""

    def __init__(self, status: int, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or error)
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def json_error(
    status: int,
    error: str,
    detail: str = "",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A JSON error response: ``{"msg": "<code> <reason>", "error": ..., "detail": ...}``."""
    return json_response(error_body(status, error, detail, **extra), status, headers)


def error_body(status: int, error: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    """The body of an error response, for channels that carry it without HTTP (WebSockets)."""
    reason = _MSG.get(status) or HTTPStatus(status).phrase
    body: dict[str, Any] = {"msg": f"{status} {reason}", "error": error}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def outcome_body(exc: CallFailed) -> tuple[int, dict[str, Any]]:
    """Map a failed call to its HTTP status and error body."""
    status = 502
    for cls in type(exc).__mro__:
        if cls in OUTCOME_STATUS:
            status = OUTCOME_STATUS[cls]
            break
    extra: dict[str, Any] = {}
    if isinstance(exc, CallTimedOut):
        extra["timeout"] = exc.timeout
    return status, error_body(status, exc.code, str(exc), **extra)


def outcome_response(exc: CallFailed, headers: dict[str, str] | None = None) -> web.Response:
    """Map a failed call to its status and body."""
    status, body = outcome_body(exc)
    if status in (429, 503):
        headers = {**(headers or {}), "Retry-After": "1"}
    return json_response(body, status, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors, ``ApiError`` and crashes into JSON error bodies."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.error, exc.detail, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal_error", "the server failed; see its log")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    if exc.status == 404:
        return json_error(404, "not_found", f"no route for {request.method} {request.path}")
    if exc.status == 405:
        allowed = headers.get("Allow", "")
        return json_error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
            headers=headers,
        )
    if exc.status == 413:
        limit = request.app.get(MAX_BODY, 0)
        return json_error(
            413, "body_too_large", f"the body exceeds the limit of {limit} bytes", limit=limit
        )
    return json_error(
        exc.status, exc.reason.lower().replace(" ", "_"), exc.text or "", headers=headers
    )


def check_broadcast(size: int, copies: int, limit: int) -> None:
    """Refuse a message whose copies for the connected targets would exceed ``limit`` bytes.

    Raises:
        ApiError: 413 ``broadcast_too_large``.
    """
    if size * copies > limit:
        raise ApiError(
            413,
            "broadcast_too_large",
            f"{size} bytes to {copies} connected devices is over the limit of {limit} bytes; "
            "send less, to fewer devices, or queue it",
            limit=limit,
        )


async def read_json(request: web.Request, limit: int = 64 * 1024) -> dict[str, Any]:
    """Read a JSON object body; an empty body is ``{}``.

    Raises:
        ApiError: 413 over ``limit``, 400 when it is not a JSON object.
    """
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes", limit=limit)
    raw = await request.read()
    if len(raw) > limit:
        raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes", limit=limit)
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return data
