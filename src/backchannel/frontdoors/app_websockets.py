"""Cometa's app WebSockets (COMPAT.md, "App WebSockets").

The app asks ``GET /v1/applications/{app_id}/devices/{device_id}/websocket`` for a one-time
key, then opens ``/websockets/{device_id}/{key}`` (or ``/v1/websockets/...``). Each text or
binary frame it sends is relayed to the device like a ``send``, and the reply comes back on
the socket; a failed call comes back as a text frame holding the JSON error body of the HTTP
API. Every upstream event of the device is pushed to all its open sockets as a binary frame
holding the event data only: a native event's name is dropped, because Cometa apps know
events as raw bytes. The sockets close when the device disconnects.

Keys and sockets live on this node, and events and disconnects come from this node's relay.
Cluster mode will move the keys to the store and route events through the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque

import orjson
from aiohttp import WSMsgType, web

from backchannel.core.apps import AppService
from backchannel.core.clock import Clock
from backchannel.core.outcomes import CallFailed
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason
from backchannel.frontdoors.app_api import AppApi
from backchannel.frontdoors.errors import ApiError, json_error, json_response, outcome_body
from backchannel.state.store import AppRecord

log = logging.getLogger(__name__)

KEY_TTL = 60.0
MAX_KEYS = 100_000  # outstanding keys on this node; the oldest go first beyond it
SLOW_LIMIT = 1024 * 1024  # bytes waiting for one app socket before it is dropped
CLOSE_TIMEOUT = 2.0  # for the close handshake; then the connection is cut
HEARTBEAT = 30.0  # pings find dead app connections; explicit because they add up at scale
NORMAL = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


class WebSocketKeys:
    """Single-use keys that open an app WebSocket, each valid ``ttl`` seconds."""

    def __init__(self, clock: Clock, ttl: float = KEY_TTL, max_keys: int = MAX_KEYS) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_keys
        # One ttl for all keys makes insertion order the expiry order: prune from the front.
        self._keys: dict[str, tuple[float, str, str]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def issue(self, app_id: str, device_id: str) -> str:
        """A new key (40 hex characters, 160 bits) for one socket to ``device_id``."""
        now = self._clock.monotonic()
        keys = self._keys
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][0] > now and len(keys) < self._max:
                break
            del keys[oldest]
        key = secrets.token_hex(20)
        keys[key] = (now + self._ttl, app_id, device_id)
        return key

    def take(self, key: str, device_id: str) -> str | None:
        """Consume ``key``; return its application id if it was valid for ``device_id``.

        Any presented key is spent, even for the wrong device, so it cannot be probed.
        """
        entry = self._keys.pop(key, None)
        if entry is None:
            return None
        expires, app_id, owner = entry
        if expires <= self._clock.monotonic() or owner != device_id:
            return None
        return app_id


class AppSocket:
    """One open app WebSocket; all frames to it go out in order through one writer task."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        app_id: str,
        device_id: str,
        limit: int,
    ) -> None:
        self.ws = ws
        self.app_id = app_id
        self.device_id = device_id
        self._transport = transport
        self._limit = limit
        self._queue: deque[tuple[WSMsgType, bytes]] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def backlog(self) -> int:
        """Bytes queued here or in the transport and not yet taken by the app."""
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._queued + buffered

    def send(self, data: bytes, kind: WSMsgType) -> None:
        """Queue one frame (nothing once the socket is closing)."""
        if self._closing:
            return
        self._queue.append((kind, data))
        self._queued += len(data)
        self._drained.clear()
        self._wake.set()

    def push_event(self, data: bytes) -> None:
        """Queue an event, or drop the socket when the app reads too slowly to take it.

        Dropping instead of waiting keeps the device's reader from ever blocking on an app,
        and instead of buffering keeps memory bounded.
        """
        if self._closing:
            return
        if self.backlog() > self._limit:
            log.info("app socket to %s/%s too slow: dropped", self.app_id, self.device_id)
            self.close(TRY_AGAIN_LATER, "too slow to take the device's events", flush=False)
            return
        self.send(data, WSMsgType.BINARY)

    async def wait_drained(self) -> None:
        """Wait while more than the limit is queued (an app that sends but does not read)."""
        if self._queued > self._limit:
            await self._drained.wait()

    async def _write(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._drained.set()
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                kind, data = self._queue.popleft()
                self._queued -= len(data)
                await self.ws.send_frame(data, kind)
        except (ConnectionError, RuntimeError):
            return  # the app went away; the handler's receive loop sees it too
        finally:
            self._queue.clear()
            self._queued = 0
            self._drained.set()

    def close(self, code: int, reason: str, *, flush: bool) -> asyncio.Task[None]:
        """Close once, after the queued frames (``flush``) or at once; return the closing task."""
        if self._closer is None:
            self._closing = True
            if flush:
                self._wake.set()
            else:
                self._writer.cancel()
            self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))
        return self._closer

    async def _close(self, code: int, reason: str) -> None:
        _, pending = await asyncio.wait([self._writer], timeout=CLOSE_TIMEOUT)
        for task in pending:
            task.cancel()
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        transport = self._transport
        if transport is not None:
            # A peer that stopped reading would keep a closing transport (and its buffer)
            # forever: give the close frame a moment to get out, then cut.
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, _abort_if_stuck, transport)


def _abort_if_stuck(transport: asyncio.Transport) -> None:
    if transport.get_write_buffer_size():
        transport.abort()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class AppWebSockets:
    """Key issuance, the socket endpoint, and event fan-out to a device's app sockets."""

    def __init__(
        self,
        relay: Relay,
        apps: AppService,
        api: AppApi,
        *,
        max_message: int,
        key_ttl: float = KEY_TTL,
        slow_limit: int = SLOW_LIMIT,
        heartbeat: float | None = HEARTBEAT,
    ) -> None:
        self._relay = relay
        self._apps = apps
        self._api = api
        self._max_message = max_message
        self._slow_limit = slow_limit
        self._heartbeat = heartbeat
        self.keys = WebSocketKeys(relay.clock, key_ttl)
        self._sockets: dict[tuple[str, str], set[AppSocket]] = {}
        self._per_app: dict[str, int] = {}
        # Every socket until its handler ends, closing or not: shutdown waits for them all.
        self._live: set[AppSocket] = set()

    def add_routes(self, app: web.Application) -> None:
        """Mount the key route and both spellings of the socket URL."""
        app.router.add_get(
            "/v1/applications/{app_id}/devices/{device_id}/websocket", self.issue_key
        )
        app.router.add_get("/websockets/{device_id}/{key}", self.connect)
        app.router.add_get("/v1/websockets/{device_id}/{key}", self.connect)

    def attach(self) -> None:
        """Listen to the relay's events and disconnects; feed presence and app info counts."""
        self._relay.on_event(self.on_event)
        self._relay.on_disconnect(self.on_disconnect)
        self._relay.websocket_counter = self.count
        self._api.websocket_total = self.total

    # -- counters --------------------------------------------------------------------------

    def count(self, app_id: str, device_id: str) -> int:
        """Open app sockets of one device on this node."""
        return len(self._sockets.get((app_id, device_id), ()))

    def total(self, app_id: str) -> int:
        """Open app sockets of an application on this node."""
        return self._per_app.get(app_id, 0)

    def _add(self, sock: AppSocket) -> None:
        self._sockets.setdefault((sock.app_id, sock.device_id), set()).add(sock)
        self._per_app[sock.app_id] = self._per_app.get(sock.app_id, 0) + 1

    def _remove(self, sock: AppSocket) -> None:
        key = (sock.app_id, sock.device_id)
        group = self._sockets.get(key)
        if group is None or sock not in group:
            return
        group.discard(sock)
        if not group:
            del self._sockets[key]
        left = self._per_app[sock.app_id] - 1
        if left:
            self._per_app[sock.app_id] = left
        else:
            del self._per_app[sock.app_id]

    # -- relay listeners -------------------------------------------------------------------

    def on_event(self, app_id: str, device_id: str, name: str, data: bytes) -> None:
        """Push an upstream event to every app socket of the device (never blocks)."""
        group = self._sockets.get((app_id, device_id))
        if group:
            for sock in list(group):
                sock.push_event(data)

    def on_disconnect(self, app_id: str, device_id: str, reason: CloseReason) -> None:
        """Close the device's app sockets once the frames already queued are out."""
        for sock in list(self._sockets.get((app_id, device_id), ())):
            self._remove(sock)
            sock.close(GOING_AWAY, "device disconnected", flush=True)

    async def close_all(self) -> None:
        """Close every app socket and wait for the close frames (server shutdown)."""
        socks = list(self._live)
        for sock in socks:
            self._remove(sock)
        # A socket already closing (its device left) returns its pending close to wait on.
        closing = [sock.close(GOING_AWAY, "server shutting down", flush=True) for sock in socks]
        await asyncio.gather(*closing, return_exceptions=True)

    # -- routes ----------------------------------------------------------------------------

    async def issue_key(self, request: web.Request) -> web.Response:
        """A one-time key for a socket to a connected device, else 418."""
        app = await self._api.authorize(request)
        device_id = request.match_info["device_id"]
        if await self._relay.presence(app.app_id, device_id) is None:
            return json_error(418, "device_offline", f"device {device_id} is not connected")
        key = self.keys.issue(app.app_id, device_id)
        return json_response(
            {"device_id": device_id, "device_key": key}, headers={"Cache-Control": "no-store"}
        )

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """Check the key, upgrade, then relay frames until either side goes away."""
        device_id = request.match_info["device_id"]
        ws = web.WebSocketResponse(
            compress=False,  # about 30 KB per connection (DESIGN.md, measured pitfalls)
            max_msg_size=self._max_message,
            heartbeat=self._heartbeat,
            timeout=CLOSE_TIMEOUT,
        )
        # Checked before the key, so a plain GET does not spend it.
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "websocket_required", "this URL takes a WebSocket upgrade")
        if self._relay.closing:
            raise ApiError(503, "shutting_down", "server shutting down; reconnect later")
        app_id = self.keys.take(request.match_info["key"], device_id)
        if app_id is None:
            raise ApiError(403, "invalid_websocket_key", "the key is wrong, expired or used")
        if await self._relay.presence(app_id, device_id) is None:
            raise ApiError(418, "device_offline", f"device {device_id} is not connected")
        await ws.prepare(request)
        sock = AppSocket(ws, request.transport, app_id, device_id, self._slow_limit)
        self._add(sock)
        self._live.add(sock)
        try:
            # The device may have left during the upgrade, unseen by on_disconnect.
            if await self._relay.presence(app_id, device_id) is None:
                sock.close(GOING_AWAY, "device disconnected", flush=False)
            else:
                await self._serve(sock)
        finally:
            self._remove(sock)
            await sock.close(NORMAL, "", flush=False)
            self._live.discard(sock)
        return ws

    async def _serve(self, sock: AppSocket) -> None:
        # One frame at a time: replies keep request order, as Cometa devices answer one
        # request at a time anyway; an app that does not read its replies stops being read.
        async for msg in sock.ws:
            if msg.type is WSMsgType.TEXT:
                body, text = msg.data.encode(), True
            elif msg.type is WSMsgType.BINARY:
                body, text = msg.data, False
            else:
                return  # ERROR (e.g. a frame over the limit): aiohttp closed the socket
            app = await self._apps.get(sock.app_id)
            if app is None:
                sock.close(POLICY_VIOLATION, "application deleted", flush=True)
                return
            kind, reply = await self._call(app, sock.device_id, body, text)
            sock.send(reply, kind)
            await sock.wait_drained()

    async def _call(
        self, app: AppRecord, device_id: str, body: bytes, text: bool
    ) -> tuple[WSMsgType, bytes]:
        timeout = self._api.call_timeout(app)
        try:
            reply = await self._relay.call(app.app_id, device_id, body, "", timeout)
        except CallFailed as exc:
            _, error = outcome_body(exc)
            return WSMsgType.TEXT, orjson.dumps(error)
        if text and _is_utf8(reply):
            return WSMsgType.TEXT, reply
        return WSMsgType.BINARY, reply
