"""A Cometa device written from COMPAT.md alone: raw TCP, the attach request, chunk frames.

It stands in for the original C and Python 2.7 clients (which cannot run here) and writes
exactly the bytes COMPAT.md documents for them, including both empty-reply framings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[bytes], Awaitable[bytes | None]]


class CometaDevice:
    """One raw Cometa device connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status_line = b""
        self.head = b""
        self.first_chunk = b""
        self.hello: dict[str, Any] = {}
        self.received: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def attach(
        cls,
        port: int,
        app_id: str,
        device_id: str,
        platform: bytes = b"Linux-device",
        *,
        no_space: bool = False,
        extra_headers: str = "",
    ) -> CometaDevice:
        """Connect, send the attach request, read the response head (and the first chunk)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sep = ":" if no_space else ": "
        request = (
            f"POST /v1/applications/{app_id}/devices/{device_id} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n{extra_headers}"
            f"Content-Length{sep}{len(platform)}\r\n\r\n"
        ).encode() + platform
        writer.write(request)
        await writer.drain()
        dev = cls(reader, writer)
        dev.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        dev.status_line = dev.head.split(b"\r\n", 1)[0]
        if dev.status_line.startswith(b"HTTP/1.1 200"):
            dev.first_chunk = await dev.read_message()
            dev.hello = json.loads(dev.first_chunk)
        return dev

    async def read_body(self) -> bytes:
        """After a refusal: the rest of the response."""
        return await asyncio.wait_for(self.reader.read(), 5)

    async def read_message(self, timeout: float = 5) -> bytes:
        """One chunk: hex size line, payload, CRLF."""
        size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        size = int(size_line.strip(), 16)
        payload = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        assert await self.reader.readexactly(2) == b"\r\n"
        return payload

    async def send_chunk(self, payload: bytes) -> None:
        """Write one chunk."""
        self.writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await self.writer.drain()

    async def reply(self, body: bytes, framing: str = "python") -> None:
        """Answer the pending message; empty replies in the Python or the C client's framing."""
        if body:
            await self.send_chunk(body)
        else:
            self.writer.write(b"0\r\n\r\n" if framing == "python" else b"2\r\n\r\n")
            await self.writer.drain()

    async def heartbeat(self) -> None:
        """The 60-second heartbeat."""
        self.writer.write(b"1\r\n\x06\r\n")
        await self.writer.drain()

    async def event(self, data: bytes) -> None:
        """An upstream event: 0x07 then the data."""
        await self.send_chunk(b"\x07" + data)

    def serve(self, handler: Handler) -> CometaDevice:
        """Answer every message with ``handler`` in the background."""
        self._task = asyncio.get_running_loop().create_task(self._loop(handler))
        return self

    async def _loop(self, handler: Handler) -> None:
        try:
            while True:
                message = await self.read_message(timeout=3600)
                self.received.append(message)
                answer = await handler(message)
                if answer is not None:
                    await self.reply(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()

    async def wait_closed(self, timeout: float = 5) -> None:
        """Wait until the server closes the socket."""
        if self._task is None:
            self.serve(echo)
        await asyncio.wait_for(self.closed.wait(), timeout)

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()


async def echo(message: bytes) -> bytes:
    """Answer with the message."""
    return message
