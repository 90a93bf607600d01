"""Batched writes of binary WebSocket messages on a server-side connection.

Many calls in flight to one device each produce a small frame. Writing each with its own
``send_bytes`` costs one ``send()`` system call and one wake-up of the device per frame;
the benchmark measured that at about a quarter of the relay's server CPU. The outbox
queues frames and writes everything queued in one go on the next loop iteration, so a
burst of N calls costs one system call. Every frame to the device must go through the
outbox (CALL, CANCEL, PING, EVENT_ACK...), so they keep their order.

Server frames are never masked and compression is off for devices, so the WebSocket header
(RFC 6455 section 5.2) is two to ten bytes in front of the payload.
"""

from __future__ import annotations

import asyncio
import struct

from aiohttp.abc import AbstractStreamWriter

_OP_BINARY_FIN = 0x82
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
LARGE = 64 * 1024  # frames this big are written at once, without waiting for the batch


def ws_header(length: int) -> bytes:
    """The header of an unmasked, uncompressed, final binary frame of ``length`` bytes."""
    if length < 126:
        return bytes((_OP_BINARY_FIN, length))
    if length < 65536:
        return _LEN16.pack(_OP_BINARY_FIN, 126, length)
    return _LEN64.pack(_OP_BINARY_FIN, 127, length)


class WsOutbox:
    """Queue of outgoing binary messages for one connection, flushed once per loop turn."""

    __slots__ = ("_loop", "_queue", "_scheduled", "_transport", "_writer", "closed")

    def __init__(
        self,
        transport: asyncio.Transport,
        writer: AbstractStreamWriter,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._transport = transport
        self._writer = writer
        self._loop = loop
        self._queue: list[bytes] = []
        self._scheduled = False
        self.closed = False

    def write(self, frame: bytes) -> None:
        """Queue one binary message; large ones are written at once (after the queue)."""
        if self.closed:
            raise ConnectionResetError("the connection is closed")
        self._queue.append(ws_header(len(frame)))
        self._queue.append(frame)
        if len(frame) >= LARGE:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued now."""
        self._scheduled = False
        queue = self._queue
        if not queue:
            return
        self._queue = []
        if self.closed or self._transport.is_closing():
            return  # the receive loop sees the broken connection and cleans up
        self._transport.writelines(queue)

    def congested(self) -> bool:
        """True while the transport holds more than its high-water mark of unsent bytes."""
        return (
            self._transport.get_write_buffer_size() > self._transport.get_write_buffer_limits()[1]
        )

    async def drain(self) -> None:
        """Wait while the transport is over its high-water mark (the device reads slowly)."""
        await self._writer.drain()

    def close(self) -> None:
        """Flush what is queued; refuse further writes."""
        self.flush()
        self.closed = True
