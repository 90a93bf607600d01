"""Reading the event stream: the :class:`Event` object and a sans-I/O Server-Sent Events parser.

The parser follows the HTML Living Standard's event stream interpretation (section 9.2.6) for
what a backchannel server sends: lines ending in LF or CRLF, comments, ``id``, ``event``,
``data`` and ``retry`` fields. A lone CR as a line end is not supported (the server never
writes one).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from backchannel.sdk.errors import BackchannelError


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event: a device's upstream event, or a presence change (type ``presence``).

    ``data`` is the event's bytes, unchanged. For a presence change they hold a JSON object
    (``online``, ``reason``, ``remote``, ``transport``, ...); use :meth:`json`.
    """

    id: int
    device_id: str
    type: str
    ts: float
    data: bytes

    @property
    def text(self) -> str:
        """``data`` decoded as UTF-8."""
        return self.data.decode()

    def json(self) -> Any:
        """``data`` parsed as JSON."""
        return orjson.loads(self.data)

    @classmethod
    def from_object(cls, obj: Any) -> Event:
        """Build from the JSON object of the stream's ``data:`` line (or of a JSON page).

        Raises:
            BackchannelError: ``bad_response`` when the object is not an event.
        """
        try:
            text = obj["data"]
            raw = text.encode() if text is not None else base64.b64decode(obj["data_b64"])
            return cls(
                int(obj["id"]), str(obj["device_id"]), str(obj["type"]), float(obj["ts"]), raw
            )
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise BackchannelError(
                f"the server sent a malformed event: {exc!r}", error="bad_response"
            ) from exc


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched message: its type, its data, and the last event id at that point."""

    event: str
    data: str
    last_id: str


class SseParser:
    """Feed bytes in; get the dispatched messages out."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        #: The last event id buffer as of the last dispatch point (blank line), also for a
        #: block without data: a server states its position with an ``id:`` line alone.
        self.last_id = ""
        #: The reconnection time the server asked for (ms), if it did.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SseMessage]:
        """Parse ``chunk``; return every message it completed."""
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        messages: list[SseMessage] = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                self._dispatch(messages)
            elif not line.startswith(b":"):
                self._field(line.decode(errors="replace"))
        return messages

    def _field(self, line: str) -> None:
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)

    def _dispatch(self, messages: list[SseMessage]) -> None:
        self.last_id = self._last_id
        if self._data:
            messages.append(
                SseMessage(self._event or "message", "\n".join(self._data), self.last_id)
            )
        self._data = []
        self._event = ""
