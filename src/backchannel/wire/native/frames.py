"""Frames of the native protocol: one frame per binary WebSocket message.

Every frame starts with the same 6-byte header (``docs/protocol.md`` section "Frame header")::

    +--------+--------+--------------------------------+
    | type   | flags  | id (uint32, big-endian)        |  payload ...
    +--------+--------+--------------------------------+

Payload bytes travel raw; only the rare control frames (HELLO, STREAM_OPEN metadata) use
msgpack. Each frame class has a ``parse`` classmethod and a ``serialize`` method.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from backchannel.wire.errors import FrameTooLarge, MalformedFrame, UnknownFrameType

#: WebSocket subprotocol; the number is the protocol version.
SUBPROTOCOL = "backchannel.v1"
PROTOCOL_VERSION = 1

HEADER = struct.Struct("!BBI")
HEADER_SIZE = HEADER.size
_CALL_HEAD = struct.Struct("!IB")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
MAX_ID = 0xFFFFFFFF
MAX_FRAME_LIMIT = 1 << 40  # far above any real limit; keeps msgpack round trips safe

FLAG_ERROR = 0x01  # REPLY, SUBSCRIBE_ACK: the payload is a UTF-8 error message
FLAG_FIN = 0x01  # STREAM_OPEN / STREAM_DATA: the sender will send no more data


class FrameType(IntEnum):
    """Frame type byte. Ranges: 0x0_ control, 0x1_ calls, 0x2_ events and topics, 0x3_ streams."""

    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    CALL = 0x10
    REPLY = 0x11
    CANCEL = 0x12
    EVENT = 0x20
    EVENT_ACK = 0x21
    PUSH = 0x22
    SUBSCRIBE = 0x23
    UNSUBSCRIBE = 0x24
    SUBSCRIBE_ACK = 0x25
    STREAM_OPEN = 0x30
    STREAM_DATA = 0x31
    STREAM_CREDIT = 0x32
    STREAM_RESET = 0x33


def _name(payload: bytes, what: str) -> tuple[str, int]:
    """Read a u8-length-prefixed UTF-8 name; return it and the offset after it."""
    if not payload:
        raise MalformedFrame(f"{what}: missing name length")
    n = payload[0]
    end = 1 + n
    if len(payload) < end:
        raise MalformedFrame(f"{what}: name truncated")
    try:
        return payload[1:end].decode(), end
    except UnicodeDecodeError as exc:
        raise MalformedFrame(f"{what}: name is not UTF-8") from exc


def _encode_name(name: str, what: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise ValueError(f"{what} name longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


def _no_payload(payload: bytes, what: str) -> None:
    if payload:
        raise MalformedFrame(f"{what} carries no payload")


@dataclass(frozen=True, slots=True)
class Hello:
    """Server to device, first frame after the upgrade: session facts and timers."""

    type: ClassVar[FrameType] = FrameType.HELLO
    session_id: str
    heartbeat: float
    timeout: float
    max_frame: int
    server: str = "backchannel"
    version: int = PROTOCOL_VERSION
    # Set when the device asked for an HTTP tunnel: name, token, path, host.
    tunnel: dict[str, Any] | None = None

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Hello:
        """Parse a HELLO payload (a msgpack map)."""
        try:
            data = msgpack.unpackb(payload)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedFrame("HELLO: payload is not msgpack") from exc
        if not isinstance(data, dict):
            raise MalformedFrame("HELLO: payload is not a map")
        try:
            hello = cls(
                session_id=str(data["session"]),
                heartbeat=float(data["heartbeat"]),
                timeout=float(data["timeout"]),
                max_frame=int(data["max_frame"]),
                server=str(data.get("server", "")),
                version=int(data.get("version", PROTOCOL_VERSION)),
                tunnel=data["tunnel"] if isinstance(data.get("tunnel"), dict) else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # OverflowError: int() of an infinite float, e.g. {"max_frame": inf}.
            raise MalformedFrame(f"HELLO: bad field {exc}") from exc
        # Timers drive the device's heartbeat loop: NaN or negative values would spin it.
        if not (0 < hello.heartbeat < 86400 and 0 < hello.timeout < 86400):
            raise MalformedFrame("HELLO: heartbeat and timeout must be positive and finite")
        if not 0 <= hello.max_frame <= MAX_FRAME_LIMIT:
            raise MalformedFrame("HELLO: max_frame out of range")
        return hello

    def serialize(self) -> bytes:
        """Encode the frame."""
        body: bytes = msgpack.packb(
            {
                "version": self.version,
                "session": self.session_id,
                "heartbeat": self.heartbeat,
                "timeout": self.timeout,
                "max_frame": self.max_frame,
                "server": self.server,
                **({"tunnel": self.tunnel} if self.tunnel is not None else {}),
            }
        )
        return HEADER.pack(self.type, 0, 0) + body


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; either side may send it. The id is a nonce echoed by PONG."""

    type: ClassVar[FrameType] = FrameType.PING
    nonce: int

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Ping:
        """Parse a PING."""
        _no_payload(payload, "PING")
        return cls(ident)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.nonce)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to PING with the same nonce; the round trip gives the device latency."""

    type: ClassVar[FrameType] = FrameType.PONG
    nonce: int

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Pong:
        """Parse a PONG."""
        _no_payload(payload, "PONG")
        return cls(ident)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.nonce)


@dataclass(frozen=True, slots=True)
class Call:
    """Server to device: a request the device must answer with REPLY of the same id."""

    type: ClassVar[FrameType] = FrameType.CALL
    call_id: int
    body: bytes
    method: str = ""
    timeout_ms: int = 0

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Call:
        """Parse a CALL: u32 timeout in ms, u8 method length, method, body."""
        if len(payload) < _CALL_HEAD.size:
            raise MalformedFrame("CALL: payload shorter than its fixed head")
        timeout_ms, mlen = _CALL_HEAD.unpack_from(payload)
        start = _CALL_HEAD.size
        end = start + mlen
        if len(payload) < end:
            raise MalformedFrame("CALL: method truncated")
        try:
            method = payload[start:end].decode()
        except UnicodeDecodeError as exc:
            raise MalformedFrame("CALL: method is not UTF-8") from exc
        return cls(ident, payload[end:], method, timeout_ms)

    def serialize(self) -> bytes:
        """Encode the frame (one copy of the body)."""
        method = self.method.encode()
        if len(method) > 255:
            raise ValueError("method name longer than 255 bytes")
        head = HEADER.pack(self.type, 0, self.call_id) + _CALL_HEAD.pack(
            self.timeout_ms, len(method)
        )
        return b"".join((head, method, self.body))


@dataclass(frozen=True, slots=True)
class Reply:
    """Device to server: the answer to CALL ``call_id``; with ``error`` the body is a message."""

    type: ClassVar[FrameType] = FrameType.REPLY
    call_id: int
    body: bytes
    error: bool = False

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Reply:
        """Parse a REPLY."""
        return cls(ident, payload, bool(flags & FLAG_ERROR))

    def serialize(self) -> bytes:
        """Encode the frame."""
        flags = FLAG_ERROR if self.error else 0
        return HEADER.pack(self.type, flags, self.call_id) + self.body


@dataclass(frozen=True, slots=True)
class Cancel:
    """Server to device: the caller stopped waiting for CALL ``call_id``; drop the work."""

    type: ClassVar[FrameType] = FrameType.CANCEL
    call_id: int

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Cancel:
        """Parse a CANCEL."""
        _no_payload(payload, "CANCEL")
        return cls(ident)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.call_id)


@dataclass(frozen=True, slots=True)
class Event:
    """Device to server: an upstream event. A non-zero id asks for an EVENT_ACK."""

    type: ClassVar[FrameType] = FrameType.EVENT
    name: str
    data: bytes
    event_id: int = 0

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Event:
        """Parse an EVENT: u8 name length, name, data."""
        name, end = _name(payload, "EVENT")
        return cls(name, payload[end:], ident)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return b"".join(
            (HEADER.pack(self.type, 0, self.event_id), _encode_name(self.name, "event"), self.data)
        )


@dataclass(frozen=True, slots=True)
class EventAck:
    """Server to device: event ``event_id`` is stored (docs/protocol.md, "Events")."""

    type: ClassVar[FrameType] = FrameType.EVENT_ACK
    event_id: int

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> EventAck:
        """Parse an EVENT_ACK."""
        _no_payload(payload, "EVENT_ACK")
        return cls(ident)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.event_id)


@dataclass(frozen=True, slots=True)
class Push:
    """Server to device: a one-way message on a topic (no reply expected)."""

    type: ClassVar[FrameType] = FrameType.PUSH
    topic: str
    data: bytes

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Push:
        """Parse a PUSH: u8 topic length, topic, data."""
        topic, end = _name(payload, "PUSH")
        return cls(topic, payload[end:])

    def serialize(self) -> bytes:
        """Encode the frame."""
        return b"".join(
            (HEADER.pack(self.type, 0, 0), _encode_name(self.topic, "topic"), self.data)
        )


def _pattern(ident: int, payload: bytes, what: str) -> str:
    """Read the request id and the pattern of a SUBSCRIBE or UNSUBSCRIBE."""
    if ident == 0:
        raise MalformedFrame(f"{what}: request id 0 is reserved")
    pattern, end = _name(payload, what)
    if end != len(payload):
        raise MalformedFrame(f"{what}: bytes after the pattern")
    return pattern


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Device to server: deliver PUSH frames whose topic matches ``pattern``."""

    type: ClassVar[FrameType] = FrameType.SUBSCRIBE
    request_id: int
    pattern: str

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Subscribe:
        """Parse a SUBSCRIBE: u8 pattern length, pattern; the id must not be 0."""
        return cls(ident, _pattern(ident, payload, "SUBSCRIBE"))

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.request_id) + _encode_name(self.pattern, "pattern")


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Device to server: stop delivering ``pattern`` (a pattern not held is no error)."""

    type: ClassVar[FrameType] = FrameType.UNSUBSCRIBE
    request_id: int
    pattern: str

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> Unsubscribe:
        """Parse an UNSUBSCRIBE: u8 pattern length, pattern; the id must not be 0."""
        return cls(ident, _pattern(ident, payload, "UNSUBSCRIBE"))

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.request_id) + _encode_name(self.pattern, "pattern")


@dataclass(frozen=True, slots=True)
class SubscribeAck:
    """Server to device: the answer to (UN)SUBSCRIBE ``request_id``; ``error`` means refused."""

    type: ClassVar[FrameType] = FrameType.SUBSCRIBE_ACK
    request_id: int
    error: bool = False
    reason: str = ""

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> SubscribeAck:
        """Parse a SUBSCRIBE_ACK: empty, or with FLAG_ERROR a UTF-8 reason."""
        if not flags & FLAG_ERROR:
            _no_payload(payload, "SUBSCRIBE_ACK without ERROR")
            return cls(ident)
        try:
            reason = payload.decode()
        except UnicodeDecodeError as exc:
            raise MalformedFrame("SUBSCRIBE_ACK: reason is not UTF-8") from exc
        return cls(ident, True, reason)

    def serialize(self) -> bytes:
        """Encode the frame."""
        if not self.error:
            return HEADER.pack(self.type, 0, self.request_id)
        return HEADER.pack(self.type, FLAG_ERROR, self.request_id) + self.reason.encode()


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """Open byte stream ``stream_id``: the opener grants ``window`` bytes of credit."""

    type: ClassVar[FrameType] = FrameType.STREAM_OPEN
    stream_id: int
    window: int
    meta: dict[str, Any] = field(default_factory=dict)
    fin: bool = False

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> StreamOpen:
        """Parse a STREAM_OPEN: u32 window, msgpack metadata map."""
        if len(payload) < _U32.size:
            raise MalformedFrame("STREAM_OPEN: missing window")
        (window,) = _U32.unpack_from(payload)
        meta: Any = {}
        if len(payload) > _U32.size:
            try:
                meta = msgpack.unpackb(payload[_U32.size :])
            except Exception as exc:  # msgpack raises several unrelated types
                raise MalformedFrame("STREAM_OPEN: metadata is not msgpack") from exc
            if not isinstance(meta, dict):
                raise MalformedFrame("STREAM_OPEN: metadata is not a map")
        return cls(ident, window, meta, bool(flags & FLAG_FIN))

    def serialize(self) -> bytes:
        """Encode the frame."""
        flags = FLAG_FIN if self.fin else 0
        meta = msgpack.packb(self.meta) if self.meta else b""
        return HEADER.pack(self.type, flags, self.stream_id) + _U32.pack(self.window) + meta


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes on stream ``stream_id``; ``fin`` half-closes the sender's direction."""

    type: ClassVar[FrameType] = FrameType.STREAM_DATA
    stream_id: int
    data: bytes
    fin: bool = False

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> StreamData:
        """Parse a STREAM_DATA."""
        return cls(ident, payload, bool(flags & FLAG_FIN))

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, FLAG_FIN if self.fin else 0, self.stream_id) + self.data


@dataclass(frozen=True, slots=True)
class StreamCredit:
    """The receiver consumed data: the sender may send ``increment`` more bytes."""

    type: ClassVar[FrameType] = FrameType.STREAM_CREDIT
    stream_id: int
    increment: int

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> StreamCredit:
        """Parse a STREAM_CREDIT: u32 increment."""
        if len(payload) != _U32.size:
            raise MalformedFrame("STREAM_CREDIT: payload must be 4 bytes")
        return cls(ident, _U32.unpack(payload)[0])

    def serialize(self) -> bytes:
        """Encode the frame."""
        return HEADER.pack(self.type, 0, self.stream_id) + _U32.pack(self.increment)


@dataclass(frozen=True, slots=True)
class StreamReset:
    """Abort stream ``stream_id`` in both directions, with a code and a reason."""

    type: ClassVar[FrameType] = FrameType.STREAM_RESET
    stream_id: int
    code: int = 0
    reason: str = ""

    @classmethod
    def parse(cls, ident: int, flags: int, payload: bytes) -> StreamReset:
        """Parse a STREAM_RESET: u16 code, UTF-8 reason."""
        if len(payload) < _U16.size:
            raise MalformedFrame("STREAM_RESET: missing code")
        try:
            reason = payload[_U16.size :].decode()
        except UnicodeDecodeError as exc:
            raise MalformedFrame("STREAM_RESET: reason is not UTF-8") from exc
        return cls(ident, _U16.unpack_from(payload)[0], reason)

    def serialize(self) -> bytes:
        """Encode the frame."""
        return (
            HEADER.pack(self.type, 0, self.stream_id) + _U16.pack(self.code) + self.reason.encode()
        )


Frame = (
    Hello
    | Ping
    | Pong
    | Call
    | Reply
    | Cancel
    | Event
    | EventAck
    | Push
    | Subscribe
    | Unsubscribe
    | SubscribeAck
    | StreamOpen
    | StreamData
    | StreamCredit
    | StreamReset
)

_PARSERS: dict[int, Any] = {
    cls.type: cls.parse
    for cls in (
        Hello,
        Ping,
        Pong,
        Call,
        Reply,
        Cancel,
        Event,
        EventAck,
        Push,
        Subscribe,
        Unsubscribe,
        SubscribeAck,
        StreamOpen,
        StreamData,
        StreamCredit,
        StreamReset,
    )
}


def parse_frame(data: bytes, max_size: int = 0) -> Frame:
    """Parse one frame from one WebSocket message.

    Raises:
        FrameTooLarge: ``max_size`` is set and the message is larger.
        UnknownFrameType: the type byte is not defined in this version.
        MalformedFrame: the frame is truncated or inconsistent.
    """
    if max_size and len(data) > max_size:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    if len(data) < HEADER_SIZE:
        raise MalformedFrame(f"frame of {len(data)} bytes is shorter than the 6-byte header")
    ftype, flags, ident = HEADER.unpack_from(data)
    parser = _PARSERS.get(ftype)
    if parser is None:
        raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
    frame: Frame = parser(ident, flags, data[HEADER_SIZE:])
    return frame
