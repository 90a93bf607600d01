"""How a call to a device can fail. Front doors map these to HTTP; SDKs map them back.

The ``code`` of each class is the stable, machine-readable ``error`` field of API bodies.
"""

from __future__ import annotations


class CallFailed(Exception):
    """Base class: the call produced no reply."""

    code = "call_failed"


class DeviceOffline(CallFailed):
    """The device has no live session on any node; nothing was sent."""

    code = "device_offline"


class CallTimedOut(CallFailed):
    """The timeout in force ran out."""

    code = "timeout"

    def __init__(self, timeout: float, detail: str = "") -> None:
        super().__init__(detail or f"no reply within {timeout:g} s")
        self.timeout = timeout


class TimedOutBeforeDelivery(CallTimedOut):
    """The deadline passed while the call was still waiting to be written to the device."""

    code = "timeout_before_delivery"


class NoReply(CallTimedOut):
    """The call was delivered to the device, which did not reply in time."""

    code = "timeout_no_reply"


class DeviceError(CallFailed):
    """The device answered with an error instead of a reply."""

    code = "device_error"


class DeviceDisconnected(CallFailed):
    """The device's session ended while the call was in flight."""

    code = "device_disconnected"


class DeviceBusy(CallFailed):
    """The device has too many calls in flight; the caller should retry later."""

    code = "device_busy"


class InvalidMessage(CallFailed):
    """The message cannot be delivered over the device's protocol (e.g. empty for Cometa)."""

    code = "invalid_message"


class ShuttingDown(CallFailed):
    """The server is shutting down and takes no new calls."""

    code = "shutting_down"


def call_failure(code: str, detail: str, timeout: float = 0.0) -> CallFailed:
    """Rebuild a recorded call outcome from its code (idempotent replays); unknown: base."""
    for cls in _CALL_FAILURES:
        if cls.code == code:
            if issubclass(cls, CallTimedOut):
                return cls(timeout, detail)
            return cls(detail)
    return CallFailed(detail)


_CALL_FAILURES: tuple[type[CallFailed], ...] = (
    DeviceOffline,
    TimedOutBeforeDelivery,
    NoReply,
    CallTimedOut,
    DeviceError,
    DeviceDisconnected,
    DeviceBusy,
    InvalidMessage,
    ShuttingDown,
)


class ForwardFailed(Exception):
    """Base class: a public request through a tunnel got no answer from its client."""

    code = "forward_failed"


class TunnelOffline(ForwardFailed):
    """The token is valid but no client is connected for it."""

    code = "tunnel_offline"


class TunnelDisconnected(ForwardFailed):
    """The client went away while the request was in flight."""

    code = "tunnel_disconnected"


class TunnelTimedOut(ForwardFailed):
    """The client did not answer within the tunnel timeout."""

    code = "tunnel_timeout"

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the tunnel client did not answer within {timeout:g} s")
        self.timeout = timeout


class TunnelBusy(ForwardFailed):
    """The client has too many requests in flight."""

    code = "tunnel_busy"


class BadTunnelResponse(ForwardFailed):
    """The client's answer cannot be turned into an HTTP response."""

    code = "bad_tunnel_response"


class TunnelResponseTooLarge(ForwardFailed):
    """The client's answer is larger than the configured limit."""

    code = "response_too_large"


class RequestTooLarge(ForwardFailed):
    """The public request's body is larger than the tunnel's limit."""

    code = "request_too_large"


class LocalServiceFailed(ForwardFailed):
    """The agent could not reach the local service, or it failed while answering."""

    code = "local_service_failed"


class TunnelRefused(Exception):
    """A tunnel cannot be opened: the name is taken or the options are invalid."""
