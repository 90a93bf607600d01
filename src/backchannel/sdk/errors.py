"""Typed errors of the SDK: one class per stable ``error`` code of the API and close code.

App side: :func:`error_from_response` turns an HTTP error response into the matching
subclass, chosen by the body's ``error`` field (falling back on the status for bodies that
did not come from a backchannel server, e.g. a proxy's HTML page). Device side: the close
codes after which reconnecting cannot help end :meth:`Device.serve` with a subclass.
"""

from __future__ import annotations

from typing import Any

import orjson


class BackchannelError(Exception):
    """Base class of every SDK error: ``status`` (0 if not HTTP), ``error`` code, ``detail``."""

    status: int = 0
    error: str = "error"

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = None,
        error: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or error or self.error)
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        self.detail = detail
        #: The whole decoded error body (extra fields such as ``timeout`` or ``limit``).
        self.body: dict[str, Any] = body or {}

    def __str__(self) -> str:
        text = self.detail or self.error
        return f"{self.error} ({self.status}): {text}" if self.status else text


# -- app side (HTTP API) ---------------------------------------------------------------------


class DeviceOffline(BackchannelError):
    """The device is not connected; nothing was sent (HTTP 418)."""

    status = 418
    error = "device_offline"


class CallTimeout(BackchannelError):
    """The call's timeout ran out (HTTP 408); ``timeout`` is the limit in force, in seconds."""

    status = 408
    error = "timeout"

    @property
    def timeout(self) -> float | None:
        """The timeout in force, as the server reported it."""
        value = self.body.get("timeout")
        return float(value) if isinstance(value, int | float) else None


class TimedOutBeforeDelivery(CallTimeout):
    """The deadline passed before the call could be written to the device."""

    error = "timeout_before_delivery"


class NoReply(CallTimeout):
    """The call reached the device, which did not reply in time."""

    error = "timeout_no_reply"


class DeviceError(BackchannelError):
    """The device's handler failed; ``detail`` is the device's error message (HTTP 502)."""

    status = 502
    error = "device_error"


class DeviceDisconnected(BackchannelError):
    """The device disconnected while the call was in flight (HTTP 502)."""

    status = 502
    error = "device_disconnected"


class DeviceBusy(BackchannelError):
    """The device has too many calls in flight; retry later (HTTP 429)."""

    status = 429
    error = "device_busy"


class Unauthorized(BackchannelError):
    """The credential is missing, wrong, or does not grant this application (401/403)."""

    status = 401
    error = "unauthorized"


class NotFound(BackchannelError):
    """The application or route does not exist (HTTP 404)."""

    status = 404
    error = "not_found"


class BodyTooLarge(BackchannelError):
    """The request body exceeds the server's limit (HTTP 413)."""

    status = 413
    error = "body_too_large"


class BadRequest(BackchannelError):
    """The server rejected a parameter, e.g. an invalid timeout (HTTP 400)."""

    status = 400
    error = "bad_request"


class Conflict(BackchannelError):
    """The request conflicts with the resource's state (HTTP 409): e.g. cancelling a message
    that already left the queue, or an idempotency key whose first request still runs."""

    status = 409
    error = "conflict"


class IdempotencyKeyReused(BackchannelError):
    """The ``Idempotency-Key`` was used before for a different request (HTTP 422)."""

    status = 422
    error = "idempotency_key_reused"


class QueueFull(BackchannelError):
    """The device has as many queued messages as the server allows (HTTP 429)."""

    status = 429
    error = "queue_full"


class ServerUnavailable(BackchannelError):
    """The server is shutting down, unreachable, or answered with a gateway error."""

    status = 503
    error = "shutting_down"


# -- device side (close codes) ---------------------------------------------------------------


class DeviceConnectionError(BackchannelError):
    """Base class of the device-side errors; ``close_code`` is the WebSocket close code."""

    close_code: int = 0

    def __init__(self, detail: str = "", close_code: int | None = None) -> None:
        super().__init__(detail)
        if close_code is not None:
            self.close_code = close_code


class AuthenticationFailed(DeviceConnectionError):
    """The server refused the device's credentials (close 4001)."""

    error = "authentication_failed"
    close_code = 4001


class SessionReplaced(DeviceConnectionError):
    """A newer connection with the same device id took over the session (close 4002)."""

    error = "session_replaced"
    close_code = 4002


class Revoked(DeviceConnectionError):
    """The device's key was revoked or its application deleted (close 4005)."""

    error = "revoked"
    close_code = 4005


class TunnelRefused(DeviceConnectionError):
    """The server refused the tunnel: its name is reserved by another credential, or an
    option is invalid (close 4006); ``detail`` says which."""

    error = "tunnel_refused"
    close_code = 4006


class NotConnected(DeviceConnectionError):
    """The device has no live connection, or lost it before the operation finished."""

    error = "not_connected"


class SubscriptionRefused(BackchannelError):
    """The server refused a topic subscription: an invalid pattern or too many
    subscriptions on the connection; ``detail`` has the server's reason."""

    error = "subscription_refused"


_BY_CODE: dict[str, type[BackchannelError]] = {
    "device_offline": DeviceOffline,
    "timeout": CallTimeout,
    "timeout_before_delivery": TimedOutBeforeDelivery,
    "timeout_no_reply": NoReply,
    "device_error": DeviceError,
    "device_disconnected": DeviceDisconnected,
    "device_busy": DeviceBusy,
    "unauthorized": Unauthorized,
    "forbidden": Unauthorized,
    "unknown_app": NotFound,
    "not_found": NotFound,
    "body_too_large": BodyTooLarge,
    "invalid_timeout": BadRequest,
    "invalid_json": BadRequest,
    "invalid_topic": BadRequest,
    "shutting_down": ServerUnavailable,
    "invalid_offline": BadRequest,
    "invalid_ttl": BadRequest,
    "invalid_wait": BadRequest,
    "invalid_idempotency_key": BadRequest,
    "invalid_device_id": BadRequest,
    "invalid_state": BadRequest,
    "invalid_limit": BadRequest,
    "unknown_message": NotFound,
    "not_queued": Conflict,
    "idempotency_key_in_progress": Conflict,
    "idempotency_key_reused": IdempotencyKeyReused,
    "queue_full": QueueFull,
}

# For bodies without a known ``error`` code; 5xx other than a device error usually comes
# from a proxy in front of the server, so it means "the server is not reachable".
_BY_STATUS: dict[int, type[BackchannelError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    408: CallTimeout,
    409: Conflict,
    413: BodyTooLarge,
    418: DeviceOffline,
    429: DeviceBusy,
    502: ServerUnavailable,
    503: ServerUnavailable,
    504: ServerUnavailable,
}


def error_from_response(status: int, body: bytes) -> BackchannelError:
    """The typed error for an HTTP error response of the app API."""
    data: dict[str, Any] = {}
    try:
        decoded = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        decoded = None
    if isinstance(decoded, dict):
        data = decoded
    code = data.get("error")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, BackchannelError)
    detail = data.get("detail") or data.get("msg")
    if not isinstance(detail, str):
        detail = body[:200].decode(errors="replace").strip() if not data else ""
    return cls(
        detail,
        status=status,
        error=code if isinstance(code, str) else None,
        body=data,
    )
