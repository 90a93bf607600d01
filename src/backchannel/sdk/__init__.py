"""Python SDKs: :class:`Device` and :class:`Tunnel` (the device side), :class:`Client` /
:class:`AsyncClient` (the application side)."""

from backchannel.sdk._events import Event
from backchannel.sdk.client import AsyncClient, Client
from backchannel.sdk.device import Device
from backchannel.sdk.errors import (
    AuthenticationFailed,
    BackchannelError,
    BadRequest,
    BodyTooLarge,
    CallTimeout,
    DeviceBusy,
    DeviceConnectionError,
    DeviceDisconnected,
    DeviceError,
    DeviceOffline,
    NoReply,
    NotConnected,
    NotFound,
    Revoked,
    ServerUnavailable,
    SessionReplaced,
    TimedOutBeforeDelivery,
    TunnelRefused,
    Unauthorized,
    error_from_response,
)
from backchannel.sdk.tunnel import Tunnel
from backchannel.sdk.webhooks import signing_key, verify_webhook

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "BackchannelError",
    "BadRequest",
    "BodyTooLarge",
    "CallTimeout",
    "Client",
    "Device",
    "DeviceBusy",
    "DeviceConnectionError",
    "DeviceDisconnected",
    "DeviceError",
    "DeviceOffline",
    "Event",
    "NoReply",
    "NotConnected",
    "NotFound",
    "Revoked",
    "ServerUnavailable",
    "SessionReplaced",
    "TimedOutBeforeDelivery",
    "Tunnel",
    "TunnelRefused",
    "Unauthorized",
    "error_from_response",
    "signing_key",
    "verify_webhook",
]
