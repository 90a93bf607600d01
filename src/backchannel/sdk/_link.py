"""One device connection: handshake, receive loop, handler tasks, heartbeats.

A :class:`Link` lives from HELLO to the drop; :class:`~backchannel.sdk.device.Device` makes a
new one per reconnection, so replies, event ids and acks never cross connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl as ssl_module
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import WSMsgType

from backchannel.sdk._streams import (
    RESET_CANCELLED,
    RESET_FAILED,
    RESET_REFUSED,
    StreamChannel,
    StreamMux,
    StreamResetError,
)
from backchannel.sdk._topics import PushQueue, Subscriptions
from backchannel.sdk.errors import NotConnected, SubscriptionRefused
from backchannel.wire.errors import ProtocolError
from backchannel.wire.native import SUBPROTOCOL, NativeConnection, Role
from backchannel.wire.native.frames import (
    Call,
    Cancel,
    EventAck,
    Frame,
    Hello,
    Push,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
    SubscribeAck,
)
from backchannel.wire.native.tunnel import KIND_HTTP

log = logging.getLogger("backchannel.sdk.device")

Handler = Callable[[bytes], Any]  # returns bytes | str | None, or an awaitable of one
PushHook = Callable[[str, bytes], Any]
WebSocket = aiohttp.ClientWebSocketResponse[bool]

STREAM_CLEANUP_TIMEOUT = 2.0  # stream handlers' own cleanup when the connection ends
HANDSHAKE_TIMEOUT = 15.0  # upgrade plus HELLO; the server sends HELLO right after auth
CLOSE_TIMEOUT = 2.0  # waiting for the peer's close frame; a dead peer never sends one
_SEND_ERRORS = (ConnectionError, aiohttp.ClientError)


@dataclass(slots=True)
class Route:
    """A handler and whether to await it on the loop (async) or run it in a thread."""

    fn: Handler
    is_async: bool

    @classmethod
    def of(cls, fn: Handler) -> Route:
        """Classify ``fn`` once, at registration, so the per-call path does not."""
        call = getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
        return cls(fn, inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call))


class TunnelService(Protocol):
    """Answers the server-opened streams of tunnel requests (``t == "http"``)."""

    async def handle(self, stream: StreamChannel) -> None:
        """Answer one request stream; the task is cancelled if the server resets it."""

    async def close(self) -> None:
        """Release what the service holds (local connections) when serving ends."""


@dataclass(slots=True)
class Routes:
    """The device's handlers by method, the catch-all, and the tunnel; shared by every link."""

    by_method: dict[str, Route] = field(default_factory=dict)
    fallback: Route | None = None
    tunnel: TunnelService | None = None
    topics: Subscriptions = field(default_factory=Subscriptions)


def as_bytes(result: object) -> bytes:
    """A handler's result as a reply body: bytes as is, str as UTF-8, None as empty."""
    if type(result) is bytes:
        return result
    if result is None:
        return b""
    if isinstance(result, str):
        return result.encode()
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise TypeError(f"handler returned {type(result).__name__}; expected bytes, str or None")


async def call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    """Call a user callback, sync or async; its failure is logged, never raised."""
    if hook is None:
        return
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("device callback %r failed", hook)


async def connect(
    http: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    ssl: ssl_module.SSLContext | bool,
    routes: Routes,
    on_push: PushHook | None,
) -> Link | tuple[int | None, str]:
    """Dial and wait for HELLO: a :class:`Link`, or (close code, reason) when that failed."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            ws = await http.ws_connect(
                url,
                protocols=(SUBPROTOCOL,),
                headers=headers,
                compress=0,  # about 30 KB per connection, for nothing on small frames
                autoping=True,
                heartbeat=None,  # liveness is our PING frames, which the server counts
                max_msg_size=0,  # NativeConnection enforces HELLO's max_frame instead
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                ssl=ssl,
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return None, f"cannot connect: {exc or type(exc).__name__}"
    try:
        msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT)
        if msg.type is not WSMsgType.BINARY:
            # Closed before HELLO: how the server reports failed authentication (4001).
            if not ws.closed:
                await ws.close()
            reason = str(msg.extra or "") if msg.type is WSMsgType.CLOSE else msg.type.name
            return ws.close_code, reason
        now = time.monotonic()
        conn = NativeConnection(Role.CLIENT, now=now)
        frame = conn.receive_message(msg.data, now)
        if not isinstance(frame, Hello):
            raise ProtocolError(f"expected HELLO first, got {frame.type.name}")
    except (ProtocolError, TimeoutError) as exc:
        code = exc.close_code if isinstance(exc, ProtocolError) else 1000
        detail = str(exc) or "no HELLO in time"
        await ws.close(code=code, message=detail.encode()[:120])
        return code, detail
    return Link(ws, conn, frame, now, routes, on_push)


class Link:
    """One live connection: its socket, its protocol state, and the work started on it."""

    def __init__(
        self,
        ws: WebSocket,
        conn: NativeConnection,
        hello: Hello,
        connected_at: float,
        routes: Routes,
        on_push: PushHook | None,
    ) -> None:
        self.ws = ws
        self.conn = conn
        self.hello = hello
        self.connected_at = connected_at
        self._routes = routes
        self._on_push = on_push
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._requests: dict[int, asyncio.Future[SubscribeAck]] = {}
        self._pushes = PushQueue(routes.topics)
        self.streams = StreamMux(conn, self._send_stream_frame)
        self._stream_tasks: dict[int, asyncio.Task[None]] = {}
        # Set when we close: the code to send, whoever ends up sending the close frame.
        self._close_code: int | None = None
        self._close_message = b""

    async def run(self) -> str:
        """Answer calls until the connection ends; return the close reason."""
        beat = asyncio.get_running_loop().create_task(self._heartbeat())
        reason = ""
        try:
            reason = await self._receive_loop()
        except _SEND_ERRORS as exc:
            reason = f"connection lost: {exc}"
        except Exception:
            # A device should stay reachable: log the bug and reconnect rather than die.
            log.exception("unexpected error on the device connection")
            self._close_code, self._close_message, reason = 1011, b"internal error", "bug"
        finally:
            beat.cancel()
            for task in self._calls.values():
                task.cancel()  # their replies would mean nothing on another connection
            self._calls.clear()
            self.streams.connection_lost(f"connection closed: {reason or 'lost'}")
            stream_tasks = list(self._stream_tasks.values())
            self._stream_tasks.clear()
            for task in stream_tasks:
                task.cancel()
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(NotConnected("connection lost before the event's ack"))
            for request in self._requests.values():
                if not request.done():
                    request.set_exception(NotConnected("connection lost before the server's ack"))
            self._pushes.close()
            if not self.ws.closed:
                await self.ws.close(code=self._close_code or 1000, message=self._close_message)
            if stream_tasks:
                # Let them close their local connections; a stuck one is left behind.
                await asyncio.wait(stream_tasks, timeout=STREAM_CLEANUP_TIMEOUT)
        return reason

    @property
    def close_code(self) -> int | None:
        """Why the connection ended: our close code if we closed it, else the server's."""
        return self._close_code if self._close_code is not None else self.ws.close_code

    async def close(self, code: int, message: bytes) -> None:
        """Close the connection; :meth:`run` then returns."""
        self._close_code, self._close_message = code, message
        await self.ws.close(code=code, message=message)

    async def _receive_loop(self) -> str:
        ws, conn, routes, calls = self.ws, self.conn, self._routes, self._calls
        receive, feed, monotonic = ws.receive, conn.receive_message, time.monotonic
        create_task = asyncio.get_running_loop().create_task
        while True:
            msg = await receive()
            if msg.type is not WSMsgType.BINARY:
                if msg.type is WSMsgType.TEXT:
                    self._close_code, self._close_message = 4000, b"text message"
                elif msg.type is WSMsgType.ERROR:
                    log.warning("WebSocket error: %s", msg.data)
                return str(msg.extra or "") if msg.type is WSMsgType.CLOSE else msg.type.name
            try:
                frame = feed(msg.data, monotonic())
            except ProtocolError as exc:
                log.warning("protocol error from the server: %s", exc)
                self._close_code, self._close_message = exc.close_code, str(exc).encode()[:120]
                return str(exc)
            if type(frame) is Call:  # the hot path: one task per call, nothing else
                route = routes.by_method.get(frame.method) or routes.fallback
                if route is None:
                    error = f"no handler for method {frame.method!r}".encode()
                    await ws.send_bytes(conn.reply(frame.call_id, error, error=True))
                else:
                    calls[frame.call_id] = create_task(
                        self._answer(frame.call_id, route, frame.body)
                    )
                continue
            await self._control(frame)

    async def _answer(self, call_id: int, route: Route, body: bytes) -> None:
        """Run one handler and send its REPLY on the connection the CALL came from."""
        conn = self.conn
        try:
            try:
                if route.is_async:
                    result = await route.fn(body)
                else:
                    # A thread, so a blocking handler cannot stall the connection.
                    result = await asyncio.to_thread(route.fn, body)
                    if inspect.isawaitable(result):
                        result = await result
                frame = conn.reply(call_id, as_bytes(result))
                if conn.max_frame and len(frame) > conn.max_frame:
                    raise ValueError(
                        f"reply of {len(frame)} bytes exceeds the frame limit of {conn.max_frame}"
                    )
            except Exception as exc:
                log.debug("handler for call %d failed", call_id, exc_info=True)
                message = f"{type(exc).__name__}: {exc}".encode()[:4096]
                frame = conn.reply(call_id, message, error=True)
            if not self.ws.closed:
                await self.ws.send_bytes(frame)
        except _SEND_ERRORS:
            pass  # the connection dropped; the server has failed this call already
        finally:
            self._calls.pop(call_id, None)

    async def _control(self, frame: Frame) -> None:
        if isinstance(frame, Cancel):
            task = self._calls.pop(frame.call_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(frame, EventAck):
            future = self._acks.pop(frame.event_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(frame, Push):
            await call_hook(self._on_push, frame.topic, frame.data)
            self._pushes.put(frame.topic, frame.data)
        elif isinstance(frame, SubscribeAck):
            request = self._requests.pop(frame.request_id, None)
            if request is not None and not request.done():
                request.set_result(frame)
        elif isinstance(frame, StreamData | StreamCredit | StreamReset):
            self.streams.dispatch(frame)
            if isinstance(frame, StreamReset):
                # The caller went away: abort the local request.
                task = self._stream_tasks.pop(frame.stream_id, None)
                if task is not None:
                    task.cancel()
        elif isinstance(frame, StreamOpen):
            await self._open_stream(frame)
        for out in self.conn.data_to_send():  # PONGs, stream credit
            await self.ws.send_bytes(out)

    async def _open_stream(self, frame: StreamOpen) -> None:
        """Hand a tunnel request to the tunnel; refuse any other stream with code 1."""
        service = self._routes.tunnel
        if service is None or frame.meta.get("t") != KIND_HTTP:
            why = "no tunnel on this device" if service is None else "unknown stream kind"
            # The STREAM_CREDIT the connection queued follows; the server ignores it.
            await self.ws.send_bytes(self.streams.refuse(frame, RESET_REFUSED, why))
            return
        channel = self.streams.accept(frame)
        task = asyncio.get_running_loop().create_task(self._serve_stream(service, channel))
        self._stream_tasks[frame.stream_id] = task

    async def _serve_stream(self, service: TunnelService, channel: StreamChannel) -> None:
        """Run the tunnel's handler on one stream; whatever happens, the stream ends."""
        sid = channel.stream_id
        try:
            await service.handle(channel)
        except StreamResetError:
            pass  # reset by the server, or the connection dropped: nothing left to end
        except Exception as exc:
            log.exception("tunnel handler failed on stream %d", sid)
            await channel.reset(RESET_FAILED, f"device error: {type(exc).__name__}: {exc}")
        else:
            if not channel.local_fin and channel.error is None:
                await channel.reset(RESET_CANCELLED, "the handler ended without answering")
        finally:
            if self._stream_tasks.get(sid) is asyncio.current_task():
                del self._stream_tasks[sid]

    async def _send_stream_frame(self, frame: bytes) -> None:
        if self.ws.closed:
            raise ConnectionResetError("the connection is closed")
        await self.ws.send_bytes(frame)

    async def _heartbeat(self) -> None:
        """Send PINGs on HELLO's schedule; close the connection when the server went silent."""
        ws, conn = self.ws, self.conn
        last_ping = self.connected_at
        while not ws.closed:
            now = time.monotonic()
            if conn.is_dead(now):
                log.warning("nothing from the server for %g s; reconnecting", conn.timeout)
                await self.close(4004, b"heartbeat timeout")
                return
            ping = conn.heartbeat(now)
            if ping is not None:
                last_ping = now
                with contextlib.suppress(*_SEND_ERRORS):
                    await ws.send_bytes(ping)
            next_ping = last_ping + conn.heartbeat_interval
            deadline = conn.last_received + conn.timeout
            # A little late rather than early: the loop may fire timers a tick ahead.
            await asyncio.sleep(max(min(next_ping, deadline) - now, 0.0) + 0.01)

    async def emit(self, name: str, payload: bytes, ack: bool, timeout: float) -> None:
        """Send an EVENT; with ``ack``, wait for its EVENT_ACK on this connection."""
        event_id, frame = self.conn.event(name, payload, ack=ack)
        future: asyncio.Future[None] | None = None
        if ack:
            future = self._acks[event_id] = asyncio.get_running_loop().create_future()
        try:
            try:
                await self.ws.send_bytes(frame)
            except _SEND_ERRORS as exc:
                raise NotConnected(f"the connection dropped: {exc}") from None
            if future is not None:
                async with asyncio.timeout(timeout):
                    await future
        finally:
            if ack:
                self._acks.pop(event_id, None)

    async def subscription(self, pattern: str, subscribe: bool, timeout: float) -> None:
        """Send SUBSCRIBE (or UNSUBSCRIBE) and wait for its SUBSCRIBE_ACK on this connection.

        Raises:
            SubscriptionRefused: the server refused it; the reason is the detail.
            NotConnected: the connection dropped first.
            TimeoutError: no answer within ``timeout`` seconds.
        """
        if self.ws.closed:
            raise NotConnected("the connection is closed")
        conn = self.conn
        request_id, frame = conn.subscribe(pattern) if subscribe else conn.unsubscribe(pattern)
        future = self._requests[request_id] = asyncio.get_running_loop().create_future()
        try:
            try:
                await self.ws.send_bytes(frame)
            except _SEND_ERRORS as exc:
                raise NotConnected(f"the connection dropped: {exc}") from None
            async with asyncio.timeout(timeout):
                ack = await future
        finally:
            self._requests.pop(request_id, None)
        if ack.error:
            raise SubscriptionRefused(f"pattern {pattern!r}: {ack.reason}")
