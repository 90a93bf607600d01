"""Socket2me clients over Socket.IO: one namespace per token, ``request`` events with acks.

python-socketio's AsyncServer is mounted on the same aiohttp application (``/socket.io/``).
A client connects to the namespace ``/{token}``; an unknown or expired token is refused. The
client becomes the token's :class:`~backchannel.core.tunnels.TunnelClient`, replacing any
previous one at once. Each public request is emitted as a ``request`` event whose payload is
built by :mod:`backchannel.wire.socket2me`, and the acknowledgement ``respond(status, body,
headers)`` is parsed there too. This file only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web

from backchannel.core import metrics
from backchannel.core.clock import Clock
from backchannel.core.outcomes import (
    BadTunnelResponse,
    RequestTooLarge,
    TunnelBusy,
    TunnelDisconnected,
    TunnelResponseTooLarge,
    TunnelTimedOut,
)
from backchannel.core.tokens import TunnelTokens
from backchannel.core.tunnel_access import TunnelAccess
from backchannel.core.tunnels import (
    BodySource,
    PublicRequest,
    PublicResponse,
    ResponseSink,
    TunnelRegistry,
    TunnelRequest,
)
from backchannel.wire.socket2me import REQUEST_EVENT, MalformedRespond, build_request, parse_respond

log = logging.getLogger(__name__)

KIND = "socket2me"
PATH = "/socket.io/"
CLOSE_WAIT = 2.0  # seconds shutdown waits for clients to close their WebSockets


@dataclass(frozen=True, slots=True)
class Socket2meSettings:
    """Limits and timers of Socket2me clients."""

    max_body: int
    max_inflight: int
    ping_interval: float
    ping_timeout: float


class Socket2meClient:
    """One connected Socket.IO client answering for one token."""

    kind = KIND
    access: TunnelAccess | None = None  # no rules: the token is the capability

    def __init__(
        self,
        server: socketio.AsyncServer,
        sid: str,
        namespace: str,
        key: str,
        remote: str,
        settings: Socket2meSettings,
        connected_at: float,
    ) -> None:
        self._server = server
        self.sid = sid
        self.namespace = namespace
        self.key = key
        self.remote = remote
        self.connected_at = connected_at
        self._settings = settings
        self._pending: set[asyncio.Future[tuple[Any, ...]]] = set()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def body_limit(self) -> int:
        """Socket2me carries whole bodies: always a limit."""
        return self._settings.max_body

    @property
    def in_flight(self) -> int:
        """Requests emitted and not acknowledged yet."""
        return len(self._pending)

    async def forward(self, request: PublicRequest, timeout: float) -> PublicResponse:
        """Emit ``request`` and wait for the client's ``respond(...)``."""
        if self._closed:
            raise TunnelDisconnected("the tunnel client disconnected")
        if len(self._pending) >= self._settings.max_inflight:
            raise TunnelBusy(f"the tunnel client has {len(self._pending)} requests in flight")
        payload = build_request(
            request.method, request.path, request.query_string, request.headers, request.body
        )
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()

        def acknowledged(*args: Any) -> None:
            if not future.done():
                future.set_result(args)

        self._pending.add(future)
        try:
            await self._server.emit(
                REQUEST_EVENT, payload, to=self.sid, namespace=self.namespace, callback=acknowledged
            )
            try:
                async with asyncio.timeout(timeout):
                    args = await future
            except TimeoutError:
                raise TunnelTimedOut(timeout) from None
        finally:
            self._pending.discard(future)
        try:
            answer = parse_respond(args)
        except MalformedRespond as exc:
            raise BadTunnelResponse(f"the tunnel client's answer is unusable: {exc}") from None
        if len(answer.body) > self._settings.max_body:
            raise TunnelResponseTooLarge(
                f"the tunnel client's answer has {len(answer.body)} bytes, "
                f"more than the limit of {self._settings.max_body}"
            )
        return PublicResponse(answer.status, answer.headers, answer.body)

    async def exchange(
        self, request: TunnelRequest, body: BodySource, sink: ResponseSink, timeout: float
    ) -> None:
        """Buffer the body, emit the request, and write the whole answer to ``sink``."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await body.read():
            size += len(chunk)
            if size > self._settings.max_body:
                raise RequestTooLarge(
                    f"the request body is larger than the limit of {self._settings.max_body} bytes"
                )
            chunks.append(chunk)
        answer = await self.forward(
            PublicRequest(
                request.method,
                request.path,
                request.query_string,
                request.headers,
                b"".join(chunks),
                request.remote,
            ),
            timeout,
        )
        await sink.whole(answer.status, answer.headers, answer.body)

    def describe(self) -> dict[str, Any]:
        """Facts for the admin API."""
        return {
            "kind": self.kind,
            "remote": self.remote,
            "connected_at": self.connected_at,
            "in_flight": len(self._pending),
        }

    def lost(self, reason: str) -> None:
        """The connection is gone: fail every request in flight."""
        self._closed = True
        pending, self._pending = self._pending, set()
        for future in pending:
            if not future.done():
                future.set_exception(TunnelDisconnected(f"the tunnel client {reason}"))

    def close(self, reason: str, *, takeover: bool = False) -> None:
        """Disconnect the client (takeover, expiry, shutdown)."""
        if self._closed:
            return
        self.lost(f"was disconnected: {reason}")
        task = asyncio.get_running_loop().create_task(
            self._server.disconnect(self.sid, namespace=self.namespace)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Socket2meTransport:
    """The Socket.IO server and its namespace-per-token handlers."""

    def __init__(
        self,
        tokens: TunnelTokens,
        registry: TunnelRegistry,
        settings: Socket2meSettings,
        clock: Clock,
    ) -> None:
        self._tokens = tokens
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self._clients: dict[tuple[str, str], Socket2meClient] = {}
        self._requests: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._closing = False
        self.server = socketio.AsyncServer(
            async_mode="aiohttp",
            namespaces="*",
            # The token is the capability; the original accepted every origin too.
            cors_allowed_origins="*",
            # Room for a maximal body in JSON string form; the body limit itself is
            # checked after decoding, so the caller gets a clear 413 instead of a drop.
            max_http_buffer_size=2 * settings.max_body + 65536,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            logger=False,
            engineio_logger=False,
        )
        self.server.on("connect", self._connect, namespace="*")
        self.server.on("disconnect", self._disconnect, namespace="*")

    def add_routes(self, app: web.Application) -> None:
        """Mount the Socket.IO endpoint (``/socket.io/``) on the application."""
        # As python-engineio's attach() does, but through _handle, which keeps count of
        # the requests in progress so that shutdown can wait for the WebSockets to end.
        for method in ("GET", "POST", "OPTIONS"):
            app.router.add_route(method, PATH, self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            # Clients reconnect at once when shutdown disconnects them; taking them back
            # would keep aiohttp waiting for their requests until its shutdown timeout.
            return web.json_response(
                {"error": "shutting_down", "detail": "server shutting down; reconnect later"},
                status=503,
                headers={"Retry-After": "5"},
            )
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            response: web.StreamResponse = await self.server.handle_request(request)
            return response
        finally:
            self._requests.discard(task)
            if not self._requests:
                self._idle.set()

    async def close_all(self, reason: str) -> None:
        """Disconnect every client now and take no new ones (shutdown)."""
        self._closing = True
        for client in list(self._clients.values()):
            client.close(reason)
        # Both steps are bounded: Engine.IO's close of a socket caught mid-handshake can
        # wait forever, and the WebSocket requests end only when the clients answer the
        # close (aiohttp's own shutdown would stop reading those answers).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                if self.server.eio.sockets:  # engineio's disconnect-all fails on an empty set
                    await self.server.eio.disconnect()
                if self._requests:
                    self._idle.clear()
                    await self._idle.wait()
        # What is left are long-polls of clients already gone (Engine.IO holds them for a
        # ping period): end them rather than have aiohttp wait out its shutdown timeout.
        for task in list(self._requests):
            task.cancel()

    async def _connect(
        self, namespace: str, sid: str, environ: dict[str, Any], auth: Any = None
    ) -> None:
        record = await self._tokens.lookup(namespace.lstrip("/"))
        if record is None:
            raise socketio.exceptions.ConnectionRefusedError("invalid token")
        request = environ.get("aiohttp.request")
        remote = (request.remote if request is not None else None) or ""
        client = Socket2meClient(
            self.server,
            sid,
            namespace,
            record.token_hash,
            remote,
            self._settings,
            self._clock.time(),
        )
        self._clients[(namespace, sid)] = client
        self._registry.attach(record.token_hash, client)
        metrics.TUNNEL_CLIENTS.labels(KIND).inc()
        log.info("socket2me client connected from %s", remote)

    async def _disconnect(self, namespace: str, sid: str, reason: Any = None) -> None:
        client = self._clients.pop((namespace, sid), None)
        if client is None:
            return
        client.lost("disconnected")
        self._registry.detach(client.key, client)
        metrics.TUNNEL_CLIENTS.labels(KIND).dec()
        log.info("socket2me client from %s disconnected (%s)", client.remote, reason)
