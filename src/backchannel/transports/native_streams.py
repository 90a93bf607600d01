"""Server-opened byte streams on a native session, as awaitable objects.

The sans-I/O :class:`~backchannel.wire.native.NativeConnection` keeps the credit books; this
adapter waits for credit before sending, queues what the device sends (never more than the
receive window, which the device must respect) and returns credit only as the consumer
takes data, so a slow consumer slows the device down instead of filling memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from backchannel.wire.native import NativeConnection
from backchannel.wire.native.frames import HEADER_SIZE

# Frames on a stream carry at most this much data: well under any sane max_frame, and
# small enough that one stream does not hog the connection.
MAX_CHUNK = 64 * 1024


class StreamReset(Exception):
    """The stream ended abnormally: reset by the device, or its connection went away."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason or f"stream reset (code {code})")
        self.code = code
        self.reason = reason


class StreamHost(Protocol):
    """What a stream needs from its session."""

    @property
    def conn(self) -> NativeConnection:
        """The session's protocol state machine."""

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame for the device."""

    async def drain(self) -> None:
        """Wait while the connection to the device is congested."""

    def forget_stream(self, stream_id: int) -> None:
        """The stream is over in both directions."""


class ServerStream:
    """One server-opened stream."""

    __slots__ = (
        "_chunks",
        "_credit",
        "_error",
        "_host",
        "_local_fin",
        "_max_chunk",
        "_readable",
        "_remote_fin",
        "stream_id",
    )

    def __init__(self, host: StreamHost, stream_id: int, local_fin: bool) -> None:
        self._host = host
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._remote_fin = False
        self._local_fin = local_fin
        self._error: StreamReset | None = None
        # Never above the frame limit the device was told in HELLO (header included).
        limit = host.conn.max_frame - HEADER_SIZE if host.conn.max_frame else MAX_CHUNK
        self._max_chunk = max(1, min(MAX_CHUNK, limit))

    # -- from the session's receive loop ---------------------------------------------------

    def on_data(self, data: bytes, fin: bool) -> None:
        """Data from the device."""
        if data:
            self._chunks.append(data)
        if fin:
            self._remote_fin = True
            self._maybe_done()
        self._readable.set()

    def on_credit(self) -> None:
        """The device granted credit."""
        self._credit.set()

    def on_reset(self, code: int, reason: str) -> None:
        """The device reset the stream, or the connection ended."""
        if self._error is None:
            self._error = StreamReset(code, reason)
        self._readable.set()
        self._credit.set()

    def take_rest_if_complete(self) -> bytes | None:
        """Everything left, if the device already sent its FIN (else None, nothing taken)."""
        if self._error is not None or not self._remote_fin:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    @property
    def finished(self) -> bool:
        """True once both directions ended or the stream was reset."""
        return self._error is not None or (self._local_fin and self._remote_fin)

    # -- for the consumer ------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next chunk from the device; b"" after its FIN. Raises StreamReset."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                frame = self._host.conn.consumed(self.stream_id, len(data))
                if frame is not None:
                    self._host.send_frame(frame)
                return data
            if self._error is not None:
                raise self._error
            if self._remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def send(self, data: bytes, fin: bool = False) -> None:
        """Send ``data`` (and FIN) as credit allows. Raises StreamReset."""
        conn = self._host.conn
        view = memoryview(data)
        while True:
            if self._error is not None:
                raise self._error
            credit = conn.send_credit(self.stream_id)
            if view and not credit:
                self._credit.clear()
                await self._credit.wait()
                continue
            n = min(credit, len(view), self._max_chunk)
            last = n == len(view)
            self._host.send_frame(conn.send_data(self.stream_id, bytes(view[:n]), fin=fin and last))
            view = view[n:]
            await self._host.drain()
            if last:
                break
        if fin:
            self._local_fin = True
            self._maybe_done()

    def reset(self, code: int = 0, reason: str = "") -> None:
        """Abort both directions (the caller went away, or the answer was unusable)."""
        if self._error is None:
            self._error = StreamReset(code, reason)
            if self._host.conn.stream_open(self.stream_id):
                self._host.send_frame(self._host.conn.reset_stream(self.stream_id, code, reason))
        # Wake whoever waits on this stream: they must see the reset, not hang.
        self._readable.set()
        self._credit.set()
        self._host.forget_stream(self.stream_id)

    def _maybe_done(self) -> None:
        if self._local_fin and self._remote_fin:
            self._host.forget_stream(self.stream_id)
