"""The presence object of a connected device: Cometa's fields plus backchannel's."""

from __future__ import annotations

from typing import Any

from backchannel.core.session import Session


def presence(session: Session, websockets: int = 0) -> dict[str, Any]:
    """Build the presence object (COMPAT.md, Cometa application side)."""
    s = session.stats
    return {
        "device_id": session.device_id,
        "ip_address": s.remote,
        "heartbeat": int(s.last_seen),
        "info": s.info,
        "connected_at": int(s.connected_at),
        "latency": round(s.latency_ms, 3) if s.latency_ms is not None else 0,
        "websockets": websockets,
        "net": {
            "received": {"bytes": s.rx_bytes, "messages": s.rx_messages},
            "sent": {"bytes": s.tx_bytes, "messages": s.tx_messages},
        },
        "online": True,
        "transport": session.transport,
        "session_id": session.session_id,
        "last_seen": s.last_seen,
        "calls": s.calls,
        "events": s.events,
        "errors": s.errors,
    }
