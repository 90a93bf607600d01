"""One attached Cometa device as a sans-I/O state machine.

The transport parses the attach with ``handshake.py``, writes ``accept_head``, then creates a
:class:`CometaConnection` and feeds it every byte after ``AttachRequest.consumed`` with the
current time. The connection turns chunks into events (COMPAT.md, Cometa, "Device side",
point 4) and frames server messages (point 3). It owns no timers and no clock: the transport
asks :meth:`CometaConnection.is_dead` on its own schedule.

Matching a :class:`Reply` to the pending message is the transport's job: the devices carry no
request id, so a reply belongs to the single message in flight, and a reply with none in
flight is dropped there.
"""

from __future__ import annotations

from dataclasses import dataclass

from backchannel.wire.cometa.chunks import ChunkReader, encode_chunk

# Payload markers (COMPAT.md, Cometa, "Device side", point 4).
_HEARTBEAT = b"\x06"
_UPSTREAM = 0x07


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The device's keep-alive: a chunk whose payload is exactly the byte 0x06."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """A device-initiated event: a payload starting with 0x07; ``data`` is the rest."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """The device's answer to the pending message: any other payload, possibly empty."""

    body: bytes


CometaEvent = Heartbeat | Upstream | Reply
"""What :meth:`CometaConnection.receive_data` returns."""

_HEARTBEAT_EVENT = Heartbeat()  # one instance serves every heartbeat: it carries no data


class CometaConnection:
    """The chunk stream of one attached Cometa device; see the module docstring."""

    __slots__ = ("_reader", "last_heartbeat", "last_received")

    def __init__(self, *, max_chunk: int, now: float) -> None:
        self._reader = ChunkReader(max_chunk)
        # The attach itself is the first sign of life: both clocks start there.
        self.last_heartbeat = now
        self.last_received = now

    @property
    def max_chunk(self) -> int:
        """The largest chunk the device may send, in bytes."""
        return self._reader.max_chunk

    def receive_data(self, data: bytes, now: float) -> list[CometaEvent]:
        """Feed bytes received from the device; return the events they complete, in order.

        Raises:
            MalformedChunk: the device broke the chunk framing (``ChunkTooLarge`` for a chunk
                over ``max_chunk``); close the connection.
        """
        if data:
            self.last_received = now
        events: list[CometaEvent] = []
        for payload in self._reader.feed(data):
            if payload == _HEARTBEAT:
                self.last_heartbeat = now
                events.append(_HEARTBEAT_EVENT)
            elif payload and payload[0] == _UPSTREAM:
                events.append(Upstream(payload[1:]))
            else:
                events.append(Reply(payload))
        return events

    def message(self, body: bytes) -> bytes:
        """The chunk to write, in one write, for a server-to-device message.

        Raises:
            LocalProtocolError: ``body`` is empty (a zero-length chunk ends the response).
        """
        return encode_chunk(body)

    def is_dead(self, now: float, liveness: float) -> bool:
        """True when no byte at all arrived from the device for ``liveness`` seconds.

        Any traffic shows the device is alive, not only heartbeats: a device busy replying is
        not dead because its heartbeat is late. Heartbeats come every 60 s and the liveness
        default is 120 s, so one lost heartbeat is tolerated (COMPAT.md, Cometa, "Device side",
        point 5).
        """
        return now - self.last_received >= liveness
