"""A minimal native-protocol device for server tests, independent of the SDK.

It drives the same sans-I/O ``NativeConnection`` as the SDK but lets a test control every
frame: answer calls, stay silent, send garbage, emit events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from backchannel.wire.native import SUBPROTOCOL, NativeConnection, Role
from backchannel.wire.native.frames import Call, Cancel, EventAck, Frame, Hello

Handler = Callable[[Call], Awaitable[bytes | None]]


async def echo(call: Call) -> bytes:
    """Answer with the body."""
    return call.body


class RawDevice:
    """One device connection; ``handler`` answers each CALL (None: no reply)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, hello: Hello) -> None:
        self.ws = ws
        self.hello = hello
        self.conn = NativeConnection(Role.CLIENT, now=time.monotonic())
        self.conn.receive_message(hello.serialize(), time.monotonic())
        self.frames: list[Frame] = []
        self.cancelled: list[int] = []
        self.acks: list[int] = []
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def serve(self, handler: Handler = echo) -> RawDevice:
        """Start answering calls in the background."""
        self._task = asyncio.get_running_loop().create_task(self._loop(handler))
        return self

    async def _loop(self, handler: Handler) -> None:
        tasks: set[asyncio.Task[Any]] = set()
        msg: aiohttp.WSMessage | None = None
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    break
                frame = self.conn.receive_message(msg.data, time.monotonic())
                self.frames.append(frame)
                for out in self.conn.data_to_send():
                    await self.ws.send_bytes(out)
                if isinstance(frame, Call):
                    t = asyncio.get_running_loop().create_task(self._answer(handler, frame))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif isinstance(frame, Cancel):
                    self.cancelled.append(frame.call_id)
                elif isinstance(frame, EventAck):
                    self.acks.append(frame.event_id)
        finally:
            self.close_code = self.ws.close_code
            closing = msg is not None and msg.type is aiohttp.WSMsgType.CLOSE
            self.close_reason = str(msg.extra) if msg is not None and closing else ""
            self.closed.set()

    async def _answer(self, handler: Handler, call: Call) -> None:
        reply = await handler(call)
        if reply is not None and not self.ws.closed:
            await self.ws.send_bytes(self.conn.reply(call.call_id, reply))

    async def error_reply(self, call_id: int, message: str) -> None:
        """Send an error REPLY."""
        await self.ws.send_bytes(self.conn.reply(call_id, message.encode(), error=True))

    async def emit(self, name: str, data: bytes, ack: bool = False) -> int:
        """Send an EVENT."""
        event_id, frame = self.conn.event(name, data, ack=ack)
        await self.ws.send_bytes(frame)
        return event_id

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close the connection; return the close code."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        """Close from the device side."""
        await self.ws.close()
        if self._task:
            await asyncio.wait_for(self._task, 5)


async def connect(
    session: aiohttp.ClientSession,
    url: str,
    app_id: str,
    device_id: str,
    key: str | None,
    extra_headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> RawDevice:
    """Open a device connection and read its HELLO."""
    headers = {"X-Backchannel-App": app_id, "X-Backchannel-Device": device_id}
    headers.update(extra_headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    ws = await session.ws_connect(
        url, protocols=[SUBPROTOCOL], headers=headers, autoping=True, max_msg_size=0, **kwargs
    )
    msg = await ws.receive(timeout=5)
    if msg.type is not aiohttp.WSMsgType.BINARY:
        raise ConnectionError(f"closed before HELLO: {ws.close_code} {msg.extra}")
    hello = Hello.parse(0, 0, msg.data[6:])
    return RawDevice(ws, hello)
