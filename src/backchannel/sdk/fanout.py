"""The result of a fan-out call (``POST .../fanout``): one outcome per device.

A fan-out never raises for a device that failed: each device's outcome is a
:class:`FanoutReply` whose ``status`` is ``replied``, ``offline``, ``queued`` (offline, and
queued when the fan-out asked for it), ``timeout`` or ``error``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from backchannel.sdk.errors import BackchannelError

REPLIED = "replied"
OFFLINE = "offline"
QUEUED = "queued"
TIMEOUT = "timeout"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class FanoutReply:
    """One device's outcome: its ``reply`` bytes, or the ``error`` code and ``detail``."""

    device: str
    status: str
    ms: float
    reply: bytes | None = None
    error: str | None = None
    detail: str = ""
    #: The id of the message queued for an offline device (status ``queued``).
    message_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when the device replied."""
        return self.status == REPLIED

    @classmethod
    def from_object(cls, item: dict[str, Any]) -> FanoutReply:
        """Build from one entry of the response's ``results``."""
        reply: bytes | None = None
        if isinstance(item.get("reply"), str):
            reply = item["reply"].encode()
        elif isinstance(item.get("reply_base64"), str):
            reply = base64.b64decode(item["reply_base64"], validate=True)
        error = item.get("error")
        return cls(
            device=str(item["device"]),
            status=str(item["status"]),
            ms=float(item["ms"]),
            reply=reply,
            error=str(error) if error is not None else None,
            detail=str(item.get("detail") or ""),
            message_id=str(item["message_id"]) if item.get("message_id") else None,
        )


@dataclass(frozen=True, slots=True)
class FanoutResult:
    """Every device's outcome in target order, the counts per status and the timeout used."""

    timeout: float
    total: int
    replied: int
    offline: int
    timed_out: int
    failed: int
    results: list[FanoutReply]
    queued: int = 0

    @property
    def replies(self) -> dict[str, bytes]:
        """The replies of the devices that answered, by device id."""
        return {r.device: r.reply for r in self.results if r.reply is not None}

    @classmethod
    def from_object(cls, data: dict[str, Any]) -> FanoutResult:
        """Build from the decoded response body.

        Raises:
            BackchannelError: the body does not have the fan-out shape (``bad_response``).
        """
        try:
            return cls(
                timeout=float(data["timeout"]),
                total=int(data["total"]),
                replied=int(data["replied"]),
                offline=int(data["offline"]),
                timed_out=int(data["timed_out"]),
                failed=int(data["failed"]),
                results=[FanoutReply.from_object(item) for item in data["results"]],
                queued=int(data.get("queued", 0)),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise BackchannelError(
                f"the server's fan-out answer is malformed: {exc!r}", error="bad_response"
            ) from exc
