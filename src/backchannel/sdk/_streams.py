"""Byte streams of one connection, as awaitable channels (docs/protocol.md, "Streams").

The sans-I/O :class:`~backchannel.wire.native.NativeConnection` keeps the credit books; a
:class:`StreamChannel` waits for credit before sending and returns credit only as its
consumer takes data, so a slow consumer slows the peer down instead of filling memory: a
channel never holds more than the receive window it granted. :class:`StreamMux` routes a
connection's stream frames to their channels. Both work on either end of a connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from backchannel.wire.errors import LocalProtocolError
from backchannel.wire.native import NativeConnection
from backchannel.wire.native.frames import (
    HEADER_SIZE,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
)

log = logging.getLogger("backchannel.sdk.streams")

#: Writes one frame to the connection; raises ConnectionError (or aiohttp's errors) when lost.
SendFrame = Callable[[bytes], Awaitable[None]]

# A frame carries at most this much data, so one busy stream does not hog the connection.
MAX_CHUNK = 64 * 1024

# Codes of STREAM_RESET (docs/protocol.md); 2 and 3 are the tunnel's (local service failed).
RESET_CANCELLED = 0
RESET_REFUSED = 1
RESET_UNREACHABLE = 2
RESET_FAILED = 3
CONNECTION_LOST = -1  # not a wire code: the connection ended under the stream


class StreamResetError(Exception):
    """The stream ended abnormally: ``code`` from the peer's reset, or -1 if the connection
    was lost."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason or f"stream reset (code {code})")
        self.code = code
        self.reason = reason


class StreamChannel:
    """One byte stream, for one producer and one consumer at a time.

    :meth:`receive` returns the peer's data (b"" after its FIN) and returns credit as the
    data is taken; :meth:`send` waits for credit. Both raise :class:`StreamResetError` once
    the peer reset the stream or the connection was lost.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_credit",
        "_error",
        "_local_fin",
        "_on_close",
        "_readable",
        "_remote_fin",
        "_send_frame",
        "_send_lock",
        "meta",
        "stream_id",
    )

    def __init__(
        self,
        conn: NativeConnection,
        stream_id: int,
        send_frame: SendFrame,
        *,
        meta: dict[str, Any] | None = None,
        remote_fin: bool = False,
        local_fin: bool = False,
        on_close: Callable[[int], None] | None = None,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        #: The STREAM_OPEN metadata (a tunnel request's head).
        self.meta: dict[str, Any] = meta if meta is not None else {}
        self._send_frame = send_frame
        self._on_close = on_close
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._remote_fin = remote_fin
        self._local_fin = local_fin
        self._error: StreamResetError | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def remote_fin(self) -> bool:
        """True once the peer's FIN arrived (it sends no more data)."""
        return self._remote_fin

    @property
    def local_fin(self) -> bool:
        """True once this side sent its FIN."""
        return self._local_fin

    @property
    def error(self) -> StreamResetError | None:
        """Why the stream ended abnormally, or None."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by :meth:`receive` (at most the window)."""
        return self._buffered

    @property
    def finished(self) -> bool:
        """True once both directions ended, or the stream was reset."""
        return self._error is not None or (self._local_fin and self._remote_fin)

    # -- from the connection's receive loop (through StreamMux) ---------------------------

    def on_data(self, data: bytes, fin: bool) -> None:
        """STREAM_DATA from the peer (the connection already checked its credit)."""
        if self._error is not None:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        if fin:
            self._remote_fin = True
        self._readable.set()
        self._check_closed()

    def on_credit(self) -> None:
        """The peer granted credit."""
        self._credit.set()

    def on_reset(self, code: int, reason: str) -> None:
        """The peer reset the stream, or the connection was lost (code -1)."""
        if self._error is None:
            self._error = StreamResetError(code, reason)
        self._chunks.clear()
        self._buffered = 0
        self._readable.set()
        self._credit.set()
        self._closed()

    # -- for the consumer and the producer -----------------------------------------------

    async def receive(self) -> bytes:
        """The next chunk from the peer; b"" after its FIN.

        Taking a chunk counts it as consumed: credit goes back to the peer in batches of
        half a window.

        Raises:
            StreamResetError: the peer reset the stream, or the connection was lost.
        """
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                frame = self._conn.consumed(self.stream_id, len(data))
                if frame is not None:
                    try:
                        await self._send_frame(frame)
                    except Exception as exc:  # the connection dropped; the loop reports it
                        log.debug("stream %d: credit not sent: %s", self.stream_id, exc)
                return data
            if self._remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def send(self, data: bytes | bytearray | memoryview, fin: bool = False) -> None:
        """Send ``data`` (then FIN if ``fin``), waiting for credit as needed.

        The data is split by the credit available and by the connection's frame limit.

        Raises:
            StreamResetError: the peer reset the stream, or the connection was lost.
            LocalProtocolError: this side already sent its FIN.
        """
        async with self._send_lock:
            conn, sid = self._conn, self.stream_id
            view = memoryview(data).cast("B")
            if not view and not fin:
                return
            while True:
                if self._error is not None:
                    raise self._error
                if self._local_fin:
                    raise LocalProtocolError(f"stream {sid}: data after this side's FIN")
                credit = conn.send_credit(sid)
                if view and credit <= 0:
                    self._credit.clear()
                    await self._credit.wait()
                    continue
                n = min(len(view), credit, self._max_chunk())
                last = n == len(view)
                frame = conn.send_data(sid, bytes(view[:n]), fin=fin and last)
                if fin and last:
                    self._local_fin = True
                try:
                    await self._send_frame(frame)
                except Exception as exc:
                    self.on_reset(CONNECTION_LOST, f"connection lost: {exc}")
                    raise StreamResetError(CONNECTION_LOST, f"connection lost: {exc}") from exc
                if last:
                    break
                view = view[n:]
            self._check_closed()

    async def close(self) -> None:
        """Send FIN (no more data from this side), if not sent yet."""
        if not self._local_fin and self._error is None:
            await self.send(b"", fin=True)

    async def reset(self, code: int = RESET_CANCELLED, reason: str = "") -> None:
        """Abort both directions; pending and later operations raise StreamResetError."""
        if self._error is not None:
            return
        self._error = StreamResetError(code, reason or "reset by this side")
        self._chunks.clear()
        self._buffered = 0
        self._readable.set()
        self._credit.set()
        if self._conn.stream_open(self.stream_id):
            frame = self._conn.reset_stream(self.stream_id, code, _clip(reason))
            try:
                await self._send_frame(frame)
            except Exception as exc:
                log.debug("stream %d: reset not sent: %s", self.stream_id, exc)
        self._closed()

    # -- internals -----------------------------------------------------------------------

    def _max_chunk(self) -> int:
        limit = self._conn.max_frame
        return min(MAX_CHUNK, limit - HEADER_SIZE) if limit else MAX_CHUNK

    def _check_closed(self) -> None:
        if self._local_fin and self._remote_fin:
            self._closed()

    def _closed(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self.stream_id)

    def __repr__(self) -> str:
        state = (
            "reset" if self._error else f"local_fin={self._local_fin} remote_fin={self._remote_fin}"
        )
        return f"<StreamChannel {self.stream_id} {state}>"


def _clip(reason: str, limit: int = 1024) -> str:
    """A reset reason cut to ``limit`` bytes of UTF-8, on a character boundary."""
    return reason.encode()[:limit].decode(errors="ignore")


class StreamMux:
    """The live channels of one connection, fed with the stream frames it received."""

    def __init__(self, conn: NativeConnection, send_frame: SendFrame) -> None:
        self._conn = conn
        self._send_frame = send_frame
        self._channels: dict[int, StreamChannel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, stream_id: int) -> StreamChannel | None:
        """The live channel of ``stream_id``, or None."""
        return self._channels.get(stream_id)

    def _forget(self, stream_id: int) -> None:
        self._channels.pop(stream_id, None)

    async def open(self, meta: dict[str, Any], *, fin: bool = False) -> StreamChannel:
        """Open a stream to the peer (its data may flow once the peer granted credit)."""
        sid, frame = self._conn.open_stream(meta, fin=fin)
        channel = StreamChannel(
            self._conn, sid, self._send_frame, meta=meta, local_fin=fin, on_close=self._forget
        )
        self._channels[sid] = channel
        try:
            await self._send_frame(frame)
        except Exception as exc:
            channel.on_reset(CONNECTION_LOST, f"connection lost: {exc}")
            raise StreamResetError(CONNECTION_LOST, f"connection lost: {exc}") from exc
        return channel

    def accept(self, frame: StreamOpen) -> StreamChannel:
        """A channel for a STREAM_OPEN the connection accepted (it queued the credit)."""
        channel = StreamChannel(
            self._conn,
            frame.stream_id,
            self._send_frame,
            meta=frame.meta,
            remote_fin=frame.fin,
            on_close=self._forget,
        )
        self._channels[frame.stream_id] = channel
        return channel

    def refuse(self, frame: StreamOpen, code: int = RESET_REFUSED, reason: str = "") -> bytes:
        """The STREAM_RESET that refuses a stream the peer opened."""
        return self._conn.reset_stream(frame.stream_id, code, _clip(reason))

    def dispatch(self, frame: StreamData | StreamCredit | StreamReset) -> StreamChannel | None:
        """Deliver a stream frame the connection received; return its channel, if live.

        Frames for unknown streams (racing a reset) are dropped, as the protocol says.
        """
        channel = self._channels.get(frame.stream_id)
        if channel is None:
            return None
        if isinstance(frame, StreamData):
            channel.on_data(frame.data, frame.fin)
        elif isinstance(frame, StreamCredit):
            channel.on_credit()
        else:
            channel.on_reset(frame.code, frame.reason)
        return channel

    def connection_lost(self, reason: str) -> None:
        """Fail every channel: the connection ended."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.on_reset(CONNECTION_LOST, reason)
