"""The native protocol connection as a sans-I/O state machine.

One :class:`NativeConnection` per WebSocket, on either end (``Role.SERVER`` in the relay,
``Role.CLIENT`` in the device SDK): one parser, tested once, for both ends. The adapter feeds
each received binary message to :meth:`receive_message` with the current time, writes what
the ``call``/``reply``/... methods return, and drains :meth:`data_to_send` for frames the
connection produces by itself (PONG, STREAM_CREDIT). It owns no timers and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from backchannel.wire.errors import FlowControlError, LocalProtocolError, RemoteProtocolError
from backchannel.wire.native.frames import (
    MAX_ID,
    Call,
    Cancel,
    Event,
    EventAck,
    Frame,
    FrameType,
    Hello,
    Ping,
    Pong,
    Push,
    Reply,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
    parse_frame,
)

DEFAULT_STREAM_WINDOW = 256 * 1024


class Role(Enum):
    """Which end of the connection this is."""

    SERVER = "server"
    CLIENT = "client"


# Frames each role may receive (docs/protocol.md, "Frame types"); anything else is an error.
_ACCEPTS: dict[Role, frozenset[int]] = {
    Role.SERVER: frozenset(
        {
            FrameType.PING,
            FrameType.PONG,
            FrameType.REPLY,
            FrameType.EVENT,
            FrameType.SUBSCRIBE,
            FrameType.UNSUBSCRIBE,
            FrameType.STREAM_OPEN,
            FrameType.STREAM_DATA,
            FrameType.STREAM_CREDIT,
            FrameType.STREAM_RESET,
        }
    ),
    Role.CLIENT: frozenset(
        {
            FrameType.HELLO,
            FrameType.PING,
            FrameType.PONG,
            FrameType.CALL,
            FrameType.CANCEL,
            FrameType.EVENT_ACK,
            FrameType.PUSH,
            FrameType.SUBSCRIBE_ACK,
            FrameType.STREAM_OPEN,
            FrameType.STREAM_DATA,
            FrameType.STREAM_CREDIT,
            FrameType.STREAM_RESET,
        }
    ),
}


@dataclass(slots=True)
class StreamState:
    """Flow-control bookkeeping of one byte stream."""

    send_credit: int
    recv_window: int
    recv_unacked: int = 0
    local_fin: bool = False
    remote_fin: bool = False


class NativeConnection:
    """State of one native protocol connection; see the module docstring for the contract."""

    __slots__ = (
        "_accepts",
        "_next_call",
        "_next_event",
        "_next_request",
        "_next_stream",
        "_outgoing",
        "_ping_nonce",
        "_ping_outstanding",
        "_ping_sent_at",
        "_streams",
        "heartbeat_interval",
        "last_received",
        "max_frame",
        "role",
        "rtt",
        "stream_window",
        "timeout",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = 0,
        heartbeat: float = 25.0,
        timeout: float = 75.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.max_frame = max_frame
        self.heartbeat_interval = heartbeat
        self.timeout = timeout
        self.stream_window = stream_window
        self.last_received = now
        self.rtt: float | None = None
        self._accepts = _ACCEPTS[role]
        self._outgoing: list[bytes] = []
        self._next_call = 0
        self._next_event = 0
        self._next_request = 0
        self._next_stream = 1 if role is Role.SERVER else 2
        self._streams: dict[int, StreamState] = {}
        self._ping_nonce = 0
        self._ping_sent_at = now
        self._ping_outstanding = False

    # -- receiving -----------------------------------------------------------------------

    def receive_message(self, data: bytes, now: float) -> Frame:
        """Parse one received binary message, update state, and return its frame.

        Raises:
            RemoteProtocolError: the message is malformed, too large, not allowed for this
                role, or breaks flow control.
        """
        frame = parse_frame(data, self.max_frame)
        self.last_received = now
        ftype = frame.type
        if ftype not in self._accepts:
            raise RemoteProtocolError(f"{ftype.name} is not allowed from the {self._peer} side")
        if ftype is FrameType.REPLY or ftype is FrameType.CALL:
            return frame
        if isinstance(frame, Ping):
            self._outgoing.append(Pong(frame.nonce).serialize())
        elif isinstance(frame, Pong):
            if self._ping_outstanding and frame.nonce == self._ping_nonce:
                self.rtt = now - self._ping_sent_at
                self._ping_outstanding = False
        elif isinstance(frame, Hello):
            self.heartbeat_interval = frame.heartbeat
            self.timeout = frame.timeout
            self.max_frame = frame.max_frame
        elif isinstance(frame, StreamOpen | StreamData | StreamCredit | StreamReset):
            self._receive_stream_frame(frame)
        return frame

    @property
    def _peer(self) -> str:
        return "device" if self.role is Role.SERVER else "server"

    def _receive_stream_frame(
        self, frame: StreamOpen | StreamData | StreamCredit | StreamReset
    ) -> None:
        sid = frame.stream_id
        if isinstance(frame, StreamOpen):
            if sid == 0:
                raise RemoteProtocolError("stream id 0 is reserved")
            if sid in self._streams:
                raise RemoteProtocolError(f"stream {sid} is already open")
            if (sid % 2 == 1) == (self.role is Role.SERVER):
                raise RemoteProtocolError(f"stream id {sid} has the wrong parity for the peer")
            self._streams[sid] = StreamState(
                send_credit=frame.window, recv_window=self.stream_window, remote_fin=frame.fin
            )
            if not frame.fin:
                # The opener starts with no credit: grant it our receive window.
                self._outgoing.append(StreamCredit(sid, self.stream_window).serialize())
            return
        state = self._streams.get(sid)
        if state is None:
            # A frame racing a RESET we sent is normal; the adapter drops it.
            return
        if isinstance(frame, StreamData):
            if state.remote_fin:
                raise RemoteProtocolError(f"data on stream {sid} after its FIN")
            if len(frame.data) > state.recv_window:
                raise FlowControlError(
                    f"stream {sid}: {len(frame.data)} bytes sent with {state.recv_window} credit"
                )
            state.recv_window -= len(frame.data)
            state.remote_fin = frame.fin
            self._maybe_forget(sid, state)
        elif isinstance(frame, StreamCredit):
            state.send_credit += frame.increment
        else:
            del self._streams[sid]

    def _maybe_forget(self, sid: int, state: StreamState) -> None:
        if state.local_fin and state.remote_fin:
            self._streams.pop(sid, None)

    def data_to_send(self) -> list[bytes]:
        """Return and clear the frames the connection produced by itself."""
        out = self._outgoing
        if out:
            self._outgoing = []
        return out

    # -- calls and events ----------------------------------------------------------------

    def call(self, body: bytes, method: str = "", timeout_ms: int = 0) -> tuple[int, bytes]:
        """Start a call (server side); return its id and the CALL frame."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the server sends CALL")
        self._next_call = self._next_call % MAX_ID + 1
        return self._next_call, Call(self._next_call, body, method, timeout_ms).serialize()

    def cancel(self, call_id: int) -> bytes:
        """Tell the device the caller gave up on ``call_id``."""
        return Cancel(call_id).serialize()

    def reply(self, call_id: int, body: bytes, *, error: bool = False) -> bytes:
        """Answer a call (device side)."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the device sends REPLY")
        return Reply(call_id, body, error).serialize()

    def event(self, name: str, data: bytes, *, ack: bool = False) -> tuple[int, bytes]:
        """Emit an upstream event (device side); with ``ack`` the server confirms it."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the device sends EVENT")
        event_id = 0
        if ack:
            self._next_event = self._next_event % MAX_ID + 1
            event_id = self._next_event
        return event_id, Event(name, data, event_id).serialize()

    def event_ack(self, event_id: int) -> bytes:
        """Confirm event ``event_id`` (server side)."""
        return EventAck(event_id).serialize()

    def push(self, topic: str, data: bytes) -> bytes:
        """Send a one-way message to the device (server side)."""
        return Push(topic, data).serialize()

    def hello(self, session_id: str, server: str, tunnel: dict[str, Any] | None = None) -> bytes:
        """The server's first frame, announcing the session's timers and limits."""
        return Hello(
            session_id,
            self.heartbeat_interval,
            self.timeout,
            self.max_frame,
            server,
            tunnel=tunnel,
        ).serialize()

    # -- topics (docs/protocol.md, "Topics") ---------------------------------------------

    def _request_id(self, what: str) -> int:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError(f"only the device sends {what}")
        self._next_request = self._next_request % MAX_ID + 1
        return self._next_request

    def subscribe(self, pattern: str) -> tuple[int, bytes]:
        """Ask for PUSH frames matching ``pattern`` (device side); return the request id."""
        request_id = self._request_id("SUBSCRIBE")
        return request_id, Subscribe(request_id, pattern).serialize()

    def unsubscribe(self, pattern: str) -> tuple[int, bytes]:
        """Drop a subscription (device side); return the request id and the frame."""
        request_id = self._request_id("UNSUBSCRIBE")
        return request_id, Unsubscribe(request_id, pattern).serialize()

    def subscribe_ack(self, request_id: int, error: str | None = None) -> bytes:
        """Answer (UN)SUBSCRIBE ``request_id`` (server side); ``error`` refuses it."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the server sends SUBSCRIBE_ACK")
        if error is None:
            return SubscribeAck(request_id).serialize()
        return SubscribeAck(request_id, True, error).serialize()

    # -- liveness -----------------------------------------------------------------------

    def heartbeat(self, now: float) -> bytes | None:
        """Return a PING when one is due at ``now``, else None."""
        if now - self._ping_sent_at < self.heartbeat_interval:
            return None
        self._ping_nonce = self._ping_nonce % MAX_ID + 1
        self._ping_sent_at = now
        self._ping_outstanding = True
        return Ping(self._ping_nonce).serialize()

    def is_dead(self, now: float) -> bool:
        """True when nothing arrived from the peer for longer than the timeout."""
        return now - self.last_received > self.timeout

    # -- byte streams -------------------------------------------------------------------

    def open_stream(self, meta: dict[str, Any], *, fin: bool = False) -> tuple[int, bytes]:
        """Open a stream, granting the peer our receive window; return its id and frame."""
        sid = self._next_stream
        nxt = sid + 2
        # Wrap within the role's parity (odd for the server, even for the device).
        self._next_stream = nxt if nxt <= MAX_ID else (1 if self.role is Role.SERVER else 2)
        self._streams[sid] = StreamState(send_credit=0, recv_window=self.stream_window)
        self._streams[sid].local_fin = fin
        return sid, StreamOpen(sid, self.stream_window, meta, fin).serialize()

    def send_credit(self, stream_id: int) -> int:
        """How many bytes may be sent on the stream now (0 when unknown or closed)."""
        state = self._streams.get(stream_id)
        return state.send_credit if state and not state.local_fin else 0

    def send_data(self, stream_id: int, data: bytes, *, fin: bool = False) -> bytes:
        """Frame ``data`` for the stream, spending credit.

        Raises:
            LocalProtocolError: the stream is unknown or closed, or ``data`` exceeds the credit.
        """
        state = self._streams.get(stream_id)
        if state is None or state.local_fin:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if len(data) > state.send_credit:
            raise LocalProtocolError(
                f"stream {stream_id}: {len(data)} bytes exceed the credit of {state.send_credit}"
            )
        state.send_credit -= len(data)
        state.local_fin = fin
        self._maybe_forget(stream_id, state)
        return StreamData(stream_id, data, fin).serialize()

    def consumed(self, stream_id: int, nbytes: int) -> bytes | None:
        """Record that the application consumed ``nbytes``; return a CREDIT frame when due.

        Credit is returned in batches of half a window, so a steady stream costs one
        small frame per half window instead of one per data frame.
        """
        state = self._streams.get(stream_id)
        if state is None:
            return None
        state.recv_unacked += nbytes
        if state.recv_unacked < self.stream_window // 2 or state.remote_fin:
            return None
        increment, state.recv_unacked = state.recv_unacked, 0
        state.recv_window += increment
        return StreamCredit(stream_id, increment).serialize()

    def reset_stream(self, stream_id: int, code: int = 0, reason: str = "") -> bytes:
        """Abort a stream in both directions."""
        self._streams.pop(stream_id, None)
        return StreamReset(stream_id, code, reason).serialize()

    def stream_open(self, stream_id: int) -> bool:
        """True while the stream is known to the connection."""
        return stream_id in self._streams
