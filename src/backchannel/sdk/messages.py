"""Messages as the app side sees them: queued ones (``send(..., offline="queue")``) and
calls recorded under an idempotency key."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

#: States after which a message never changes again.
FINAL_STATES = frozenset({"replied", "failed", "delivered", "expired"})


@dataclass(frozen=True, slots=True)
class Message:
    """One message to a device and where it stands (``GET .../messages/{id}``).

    ``state`` is ``queued``, ``sent``, ``replied`` (``reply`` holds the device's answer),
    ``failed`` (the device answered with an error, or the app cancelled it), ``delivered``
    (handed to the device but no reply came; ``error`` says why; it is never re-sent) or
    ``expired`` (its TTL passed before the device took it).
    """

    id: str
    device_id: str
    state: str
    mode: str
    method: str
    created_at: float
    updated_at: float
    expires_at: float | None
    timeout: float
    attempts: int
    reply: bytes | None = None
    error: str | None = None
    detail: str | None = None

    @property
    def final(self) -> bool:
        """True once the message will not change any more."""
        return self.state in FINAL_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        """Build from the API's JSON view of a message."""
        reply: bytes | None = None
        if isinstance(data.get("reply"), str):
            reply = data["reply"].encode()
        elif isinstance(data.get("reply_base64"), str):
            reply = base64.b64decode(data["reply_base64"])
        expires = data.get("expires_at")
        return cls(
            id=str(data["message_id"]),
            device_id=str(data["device_id"]),
            state=str(data["state"]),
            mode=str(data.get("mode", "")),
            method=str(data.get("method", "")),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            expires_at=None if expires is None else float(expires),
            timeout=float(data.get("timeout", 0.0)),
            attempts=int(data.get("attempts", 0)),
            reply=reply,
            error=data.get("error"),
            detail=data.get("detail"),
        )
