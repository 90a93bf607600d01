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
    Conflict,
    DeviceBusy,
    DeviceConnectionError,
    DeviceDisconnected,
    DeviceError,
    DeviceOffline,
    IdempotencyKeyReused,
    NoReply,
    NotConnected,
    NotFound,
    QueueFull,
    Revoked,
    ServerUnavailable,
    SessionReplaced,
    SubscriptionRefused,
    TimedOutBeforeDelivery,
    TunnelRefused,
    Unauthorized,
    error_from_response,
)
from backchannel.sdk.fanout import FanoutReply, FanoutResult
from backchannel.sdk.messages import Message
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
    "Conflict",
    "Device",
    "DeviceBusy",
    "DeviceConnectionError",
    "DeviceDisconnected",
    "DeviceError",
    "DeviceOffline",
    "Event",
    "FanoutReply",
    "FanoutResult",
    "IdempotencyKeyReused",
    "Message",
    "NoReply",
    "NotConnected",
    "NotFound",
    "QueueFull",
    "Revoked",
    "ServerUnavailable",
    "SessionReplaced",
    "SubscriptionRefused",
    "TimedOutBeforeDelivery",
    "Tunnel",
    "TunnelRefused",
    "Unauthorized",
    "error_from_response",
    "signing_key",
    "verify_webhook",
]
