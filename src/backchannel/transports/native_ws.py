"""The native protocol over an aiohttp WebSocket: ``GET /v1/connect``.

Feeds each binary message to :class:`~backchannel.wire.native.NativeConnection`, resolves
replies, and reports sessions and events to the :class:`~backchannel.core.relay.Relay`.
Authentication is decided by the core's :class:`~backchannel.core.apps.AppService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from backchannel.core import metrics
from backchannel.core.apps import AppService
from backchannel.core.outcomes import (
    DeviceBusy,
    DeviceDisconnected,
    DeviceError,
    DeviceOffline,
    NoReply,
    ShuttingDown,
    TimedOutBeforeDelivery,
    TunnelRefused,
)
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason, SessionStats, record_latency
from backchannel.core.topics import MAX_SUBSCRIPTIONS
from backchannel.core.tunnel_access import TunnelAccess
from backchannel.state.store import TunnelName
from backchannel.transports.native_streams import ServerStream
from backchannel.transports.native_tunnel import NativeTunnelClient, NativeTunnels
from backchannel.transports.ws_outbox import WsOutbox
from backchannel.wire.errors import ProtocolError
from backchannel.wire.native import SUBPROTOCOL, Frame, NativeConnection, Role
from backchannel.wire.native.frames import (
    Event,
    Pong,
    Reply,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
    Subscribe,
    Unsubscribe,
)

log = logging.getLogger(__name__)

PATH = "/v1/connect"
TUNNEL_HEADER = "X-Backchannel-Tunnel"  # the device asks for an HTTP tunnel (protocol.md)

#: WebSocket close codes of the native protocol (docs/protocol.md, "Close codes").
CLOSE_CODES: dict[CloseReason, int] = {
    CloseReason.NORMAL: 1000,
    CloseReason.PEER_CLOSED: 1000,
    CloseReason.SHUTDOWN: 1001,
    CloseReason.PROTOCOL_ERROR: 4000,
    CloseReason.AUTH_FAILED: 4001,
    CloseReason.TAKEOVER: 4002,
    CloseReason.DETACHED: 4003,
    CloseReason.HEARTBEAT_TIMEOUT: 4004,
    CloseReason.REVOKED: 4005,
    CloseReason.REPLY_ORDER_LOST: 4000,  # Cometa only; never used on native sessions
    CloseReason.TUNNEL_RELEASED: 4006,
}


@dataclass(frozen=True, slots=True)
class NativeSettings:
    """Per-connection limits and timers announced to the device in HELLO."""

    max_frame: int
    heartbeat: float
    timeout: float
    max_inflight: int
    server_name: str


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _remote(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        if request.remote and request.remote != peer[0]:
            return request.remote  # the client behind a trusted proxy (frontdoors/proxies.py)
        return f"{peer[0]}:{peer[1]}"
    return request.remote or ""


class NativeSession:
    """A device session on the native protocol; implements ``core.session.Session``."""

    __slots__ = (
        "_close_reason",
        "_closed",
        "_conn",
        "_loop",
        "_max_inflight",
        "_outbox",
        "_pending",
        "_relay",
        "_streams",
        "_ws",
        "app_id",
        "device_id",
        "session_id",
        "stats",
    )
    transport = "native"

    def __init__(
        self,
        ws: web.WebSocketResponse,
        conn: NativeConnection,
        relay: Relay,
        app_id: str,
        device_id: str,
        stats: SessionStats,
        max_inflight: int,
        outbox: WsOutbox,
    ) -> None:
        self._ws = ws
        self._conn = conn
        self._relay = relay
        self._outbox = outbox
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._closed = False
        self._close_reason = CloseReason.PEER_CLOSED
        self._max_inflight = max_inflight
        self._streams: dict[int, ServerStream] = {}
        self.app_id = app_id
        self.device_id = device_id
        self.session_id = secrets.token_hex(8)
        self.stats = stats

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        """Send a CALL frame and wait for its REPLY (docs/protocol.md, "Calls")."""
        if self._closed:
            raise DeviceOffline(f"device {self.device_id} is not connected")
        if len(self._pending) >= self._max_inflight:
            raise DeviceBusy(f"device {self.device_id} has {len(self._pending)} calls in flight")
        call_id, frame = self._conn.call(body, method, int(timeout * 1000))
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[call_id] = future
        self.stats.calls += 1
        loop = self._loop
        deadline = loop.time() + timeout
        timer: asyncio.TimerHandle | None = None
        delivered = False
        try:
            self._send(frame)
            if self._outbox.congested():
                # The device reads too slowly to take more bytes: wait, within the deadline.
                async with asyncio.timeout_at(deadline):
                    await self._outbox.drain()
            delivered = True
            # A plain timer on the future is cheaper than a timeout context per call.
            timer = loop.call_at(deadline, _expire, future)
            return await future
        except TimeoutError:
            self.stats.errors += 1
            if delivered:
                self._send(self._conn.cancel(call_id))
                raise NoReply(timeout) from None
            raise TimedOutBeforeDelivery(timeout) from None
        except (ConnectionError, RuntimeError) as exc:
            self.stats.errors += 1
            raise DeviceDisconnected(f"device disconnected: {exc}") from None
        finally:
            del self._pending[call_id]
            if timer is not None:
                timer.cancel()

    def in_flight(self) -> int:
        """Calls waiting for a reply."""
        return len(self._pending)

    # -- streams (HTTP tunnels) ------------------------------------------------------------

    @property
    def conn(self) -> NativeConnection:
        """The protocol state machine (for streams)."""
        return self._conn

    @property
    def closed(self) -> bool:
        """True once the session ended."""
        return self._closed

    def open_stream(self, meta: dict[str, Any], *, fin: bool) -> ServerStream:
        """Open a server-side stream to the device."""
        sid, frame = self._conn.open_stream(meta, fin=fin)
        stream = ServerStream(self, sid, local_fin=fin)
        self._streams[sid] = stream
        self._send(frame)
        return stream

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame for the device (streams)."""
        self._send(frame)

    async def drain(self) -> None:
        """Wait while the device's connection is congested."""
        if self._outbox.congested():
            await self._outbox.drain()

    def forget_stream(self, stream_id: int) -> None:
        """A stream is over."""
        self._streams.pop(stream_id, None)

    # -- topics ------------------------------------------------------------------------------

    def push(self, topic: str, data: bytes) -> None:
        """Queue a PUSH frame; never blocks (docs/protocol.md, "Topics").

        Raises:
            ConnectionResetError: the device reads too slowly to take more bytes; the
                message is dropped (topics deliver at most once), and the publisher's count
                leaves this device out.
        """
        if self._closed:
            return
        if self._outbox.congested():
            raise ConnectionResetError("the device's connection is congested")
        self._send(self._conn.push(topic, data))

    def _subscription(self, frame: Subscribe | Unsubscribe) -> None:
        if self._closed:
            return  # a frame read after close(): adding it now would outlive the session
        topics = self._relay.topics
        error: str | None = None
        try:
            if isinstance(frame, Unsubscribe):
                topics.remove(self.app_id, frame.pattern, self)
            elif not topics.add(self.app_id, frame.pattern, self):
                error = f"limit of {MAX_SUBSCRIPTIONS} subscriptions per connection reached"
        except ValueError as exc:
            error = str(exc)
        self._send(self._conn.subscribe_ack(frame.request_id, error))

    def _end_topics(self) -> None:
        # Subscriptions belong to the connection: a reconnecting device subscribes again.
        self._relay.topics.drop(self)

    def close_soon(self, detail: str, *, takeover: bool = False) -> None:
        """Close the session from synchronous code (tunnel takeover: 4002; released: 4006)."""
        reason = CloseReason.TAKEOVER if takeover else CloseReason.TUNNEL_RELEASED
        self._relay.spawn(self.close(reason, detail))

    def _fail_streams(self, reason: str) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.on_reset(-1, reason)

    def tick(self, now: float) -> None:
        """Send a PING when due; close the session when the device went silent."""
        if self._closed:
            return
        if self._conn.is_dead(now):
            self._relay.spawn(
                self.close(CloseReason.HEARTBEAT_TIMEOUT, "no heartbeat from the device")
            )
            return
        ping = self._conn.heartbeat(now)
        if ping is not None:
            self._send(ping)

    def _send(self, frame: bytes) -> None:
        """Queue a frame for the device; all frames go through the outbox, in order."""
        self._outbox.write(frame)
        self.stats.tx_bytes += len(frame)
        self.stats.tx_messages += 1

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        """Fail calls in flight and close the WebSocket with the reason's close code."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._end_topics()
        self._fail_pending(reason)
        self._fail_streams(f"the device's connection closed ({reason.value})")
        self._outbox.close()
        message = (detail or reason.value).encode()[:120]
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.close(code=CLOSE_CODES[reason], message=message)

    def _fail_pending(self, reason: CloseReason) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DeviceDisconnected(f"device disconnected ({reason.value})"))

    async def run(self) -> CloseReason:
        """Read frames until the connection ends; return why it ended."""
        ws, conn, stats = self._ws, self._conn, self.stats
        monotonic, wall = time.monotonic, time.time
        pending = self._pending
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                data: bytes = msg.data
                stats.rx_bytes += len(data)
                stats.rx_messages += 1
                stats.last_seen = wall()
                try:
                    frame = conn.receive_message(data, monotonic())
                except ProtocolError as exc:
                    return await self._protocol_error(str(exc), exc.close_code)
                if isinstance(frame, Reply):
                    future = pending.get(frame.call_id)
                    if future is None or future.done():
                        metrics.LATE_REPLIES.inc()
                    elif frame.error:
                        stats.errors += 1
                        future.set_exception(DeviceError(frame.body.decode(errors="replace")))
                    else:
                        future.set_result(frame.body)
                    continue
                self._control_frame(frame)
                backlog = self._relay.event_backlog
                if backlog is not None and backlog.congested and isinstance(frame, Event):
                    # Stop reading this device until the event log caught up: TCP pushes
                    # back on it, rather than its events being dropped.
                    await backlog.room()
            elif msg.type is WSMsgType.TEXT:
                return await self._protocol_error("text messages are not part of backchannel.v1")
            else:
                # CLOSE, CLOSING, CLOSED or ERROR (for example a frame above max_msg_size).
                # After our own close() the reason is ours; otherwise the peer went away.
                self._closed = True
                self._outbox.closed = True
                self._end_topics()
                self._fail_pending(self._close_reason)
                self._fail_streams("the device's connection closed")
                return self._close_reason

    def _ack_event(self, event_id: int) -> None:
        if not self._closed:
            self._send(self._conn.event_ack(event_id))

    def _control_frame(self, frame: Frame) -> None:
        if isinstance(frame, Event):
            if frame.event_id:
                # EVENT_ACK means "stored": it goes out once the event log wrote the event.
                ack = functools.partial(self._ack_event, frame.event_id)
                self._relay.device_event(self, frame.name, frame.data, ack)
            else:
                self._relay.device_event(self, frame.name, frame.data)
        elif isinstance(frame, Subscribe | Unsubscribe):
            self._subscription(frame)
        elif isinstance(frame, Pong):
            if self._conn.rtt is not None:
                record_latency(self.stats, self._conn.rtt * 1000.0)
        elif isinstance(frame, StreamData):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.on_data(frame.data, frame.fin)
        elif isinstance(frame, StreamCredit):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.on_credit()
        elif isinstance(frame, StreamReset):
            stream = self._streams.pop(frame.stream_id, None)
            if stream is not None:
                stream.on_reset(frame.code, frame.reason)
        elif isinstance(frame, StreamOpen):
            # Only the server opens streams (tunnel requests); refuse the device's.
            reset = self._conn.reset_stream(frame.stream_id, 1, "device-opened streams are refused")
            self._send(reset)
        for out in self._conn.data_to_send():
            self._send(out)

    async def _protocol_error(self, detail: str, code: int = 4000) -> CloseReason:
        metrics.PROTOCOL_ERRORS.labels(self.transport).inc()
        log.warning("protocol error from %s/%s: %s", self.app_id, self.device_id, detail)
        self._closed = True
        self._end_topics()
        self._fail_pending(CloseReason.PROTOCOL_ERROR)
        self._fail_streams("protocol error")
        self._outbox.close()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.close(code=code, message=detail.encode()[:120])
        return CloseReason.PROTOCOL_ERROR


class NativeTransport:
    """The ``/v1/connect`` endpoint."""

    def __init__(
        self,
        relay: Relay,
        apps: AppService,
        settings: NativeSettings,
        tunnels: NativeTunnels | None = None,
    ) -> None:
        self._relay = relay
        self._apps = apps
        self._settings = settings
        self._tunnels = tunnels

    def add_routes(self, app: web.Application) -> None:
        """Mount the endpoint."""
        app.router.add_get(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade, authenticate, announce the session and run it to its end."""
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            return web.Response(
                status=400,
                content_type="application/json",
                body=orjson.dumps(
                    {
                        "error": "unsupported_protocol",
                        "detail": f"offer the WebSocket subprotocol {SUBPROTOCOL!r}",
                    }
                ),
            )
        if self._relay.closing:
            return web.Response(
                status=503,
                content_type="application/json",
                headers={"Retry-After": "5"},
                body=orjson.dumps(
                    {"error": "shutting_down", "detail": "server shutting down; reconnect later"}
                ),
            )
        s = self._settings
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            compress=False,  # about 30 KB per connection; devices rarely benefit
            # aiohttp refuses a message of exactly max_msg_size; the protocol allows max_frame.
            max_msg_size=s.max_frame + 1,
            autoping=True,
            heartbeat=None,  # our own PING frames, swept by one timer for all sessions
            timeout=2.0,
        )
        await ws.prepare(request)
        app_id = request.headers.get("X-Backchannel-App") or request.query.get("app", "")
        device_id = request.headers.get("X-Backchannel-Device") or request.query.get("device", "")
        key = _bearer(request.headers.get("Authorization")) or request.query.get("key")
        verdict = await self._apps.authenticate_device(app_id, device_id, key)
        if not verdict.accepted:
            log.info("device auth failed: %s/%s (%s)", app_id, device_id, verdict.value)
            await ws.close(code=4001, message=f"authentication failed: {verdict.value}".encode())
            return ws
        tunnel_header = request.headers.get(TUNNEL_HEADER)
        tunnel: tuple[TunnelName, TunnelAccess, dict[str, Any]] | None = None
        if tunnel_header is not None:
            if self._tunnels is None:
                await ws.close(code=4006, message=b"tunnels are not enabled on this server")
                return ws
            try:
                tunnel = await self._tunnels.prepare(app_id, device_id, tunnel_header)
            except TunnelRefused as exc:
                log.info("tunnel refused for %s/%s: %s", app_id, device_id, exc)
                await ws.close(code=4006, message=f"tunnel refused: {exc}".encode()[:120])
                return ws
        now = time.monotonic()
        conn = NativeConnection(
            Role.SERVER,
            max_frame=s.max_frame,
            heartbeat=s.heartbeat,
            timeout=s.timeout,
            now=now,
        )
        wall = time.time()
        stats = SessionStats(connected_at=wall, remote=_remote(request), last_seen=wall)
        stats.info = request.headers.get("User-Agent", "")[:200]
        transport = request.transport
        if transport is None:  # the peer left during the handshake
            return ws
        outbox = WsOutbox(transport, request.writer, asyncio.get_running_loop())
        session = NativeSession(
            ws, conn, self._relay, app_id, device_id, stats, s.max_inflight, outbox
        )
        # The tunnel is routed to this session before HELLO announces it, so a request made
        # as soon as the device knows its URL never reaches the connection it replaces.
        client: NativeTunnelClient | None = None
        if tunnel is not None and self._tunnels is not None:
            client = self._tunnels.attach(session, tunnel[0], tunnel[1])
        outbox.write(conn.hello(session.session_id, s.server_name, tunnel and tunnel[2]))
        try:
            await self._relay.register(session)
        except ShuttingDown:
            if client is not None and self._tunnels is not None:
                self._tunnels.detach(client)
            await session.close(CloseReason.SHUTDOWN, "server shutting down")
            return ws
        reason = CloseReason.PEER_CLOSED
        try:
            reason = await session.run()
        finally:
            if client is not None and self._tunnels is not None:
                self._tunnels.detach(client)
            await self._relay.unregister(session, reason)
        return ws


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
