"""The ``Session`` interface every transport implements, and what the core keeps per session.

The core owns this interface; transports (native WebSocket, Cometa raw chunks, Socket.IO)
adapt a live connection to it. A transport never decides routing or authorization: it asks
the :class:`~backchannel.core.relay.Relay` and reports to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class CloseReason(Enum):
    """Why a session ended. Transports map each to their own close code."""

    NORMAL = "normal"
    SHUTDOWN = "server_shutdown"
    TAKEOVER = "replaced"
    DETACHED = "detached"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    PROTOCOL_ERROR = "protocol_error"
    AUTH_FAILED = "auth_failed"
    REVOKED = "credential_revoked"
    PEER_CLOSED = "peer_closed"
    # A Cometa device still owed late replies after the grace: only a new connection can
    # guarantee that no late reply is taken for the answer to a later message.
    REPLY_ORDER_LOST = "reply_order_lost"
    # An operator released the device's tunnel name: the device must not reclaim it.
    TUNNEL_RELEASED = "tunnel_released"


@dataclass(slots=True)
class SessionStats:
    """Counters and facts shown in presence (Cometa's presence object and more)."""

    connected_at: float
    remote: str
    info: str = ""
    last_seen: float = 0.0
    rx_bytes: int = 0
    rx_messages: int = 0
    tx_bytes: int = 0
    tx_messages: int = 0
    latency_ms: float | None = None
    latency_samples: int = 0
    events: int = 0
    calls: int = 0
    errors: int = 0


def record_latency(stats: SessionStats, rtt_ms: float) -> None:
    """Fold one heartbeat round trip into the average shown as presence ``latency``."""
    stats.latency_samples += 1
    previous = stats.latency_ms or 0.0
    stats.latency_ms = previous + (rtt_ms - previous) / stats.latency_samples


class Session(Protocol):
    """One live device connection, as the core sees it."""

    app_id: str
    device_id: str
    session_id: str
    transport: str
    stats: SessionStats

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        """Deliver ``body`` and return the device's reply.

        Raises:
            CallFailed: a subclass from :mod:`backchannel.core.outcomes` naming the outcome.
        """

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        """End the session, failing calls in flight with ``DeviceDisconnected``."""

    def tick(self, now: float) -> None:
        """Housekeeping at monotonic time ``now``: send heartbeats, drop dead peers."""

    def in_flight(self) -> int:
        """Number of calls waiting for a reply."""
