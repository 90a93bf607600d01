"""The public side of tunnels: ``/go/{token}[/...]`` and ``{name}.{domain}``, every method.

A request is checked (rate limit per client IP, token or name, the tunnel's own access
rules, body size) and described as a :class:`~backchannel.core.tunnels.TunnelRequest` with
``X-Forwarded-*`` headers added. The tunnel's client then streams the answer through a
:class:`HttpSink`; bodies are never held whole here. Honest errors: 404 for an unknown
tunnel, 502 when no client is connected, it went away or the local service failed, 504
when no response head came in time. Error bodies are JSON (with Socket2me's ``Error`` field
kept), or a small HTML page for callers that accept HTML.
"""

from __future__ import annotations

import asyncio
import html
import struct
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from backchannel.core import metrics
from backchannel.core.credentials import hash_secret
from backchannel.core.outcomes import (
    BadTunnelResponse,
    ForwardFailed,
    LocalServiceFailed,
    RequestTooLarge,
    TunnelBusy,
    TunnelDisconnected,
    TunnelOffline,
    TunnelResponseTooLarge,
    TunnelTimedOut,
)
from backchannel.core.ratelimit import RateLimiter
from backchannel.core.tokens import TunnelTokens
from backchannel.core.tunnel_names import TunnelNames
from backchannel.core.tunnels import TunnelRegistry, TunnelRequest
from backchannel.frontdoors.errors import error_body, json_response
from backchannel.wire.native.tunnel import WS_BINARY, WS_CLOSE, WS_TEXT

CALLER_CHECK_INTERVAL = 0.5  # seconds between checks that a waiting caller is still there
_CLOSE_CODE = struct.Struct("!H")

# Socket2me's error strings, kept in the "Error" field for its clients.
_ORIGINAL_ERROR: dict[type[ForwardFailed], str] = {
    TunnelOffline: "client not connected",
    TunnelDisconnected: "client disconnected",
    TunnelTimedOut: "client timeout",
    TunnelBusy: "client busy",
    BadTunnelResponse: "bad client response",
    TunnelResponseTooLarge: "response too large",
    RequestTooLarge: "request too large",
    LocalServiceFailed: "local service failed",
}
_STATUS: dict[type[ForwardFailed], int] = {
    TunnelOffline: 502,
    TunnelDisconnected: 502,
    TunnelTimedOut: 504,
    TunnelBusy: 503,
    BadTunnelResponse: 502,
    TunnelResponseTooLarge: 413,
    RequestTooLarge: 413,
    LocalServiceFailed: 502,
}


def error_response(
    request: web.BaseRequest,
    status: int,
    error: str,
    detail: str,
    original: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A tunnel error: JSON, or a small HTML page when the caller prefers HTML."""
    metrics.TUNNEL_REQUESTS.labels(error).inc()
    body = error_body(status, error, detail, Error=original)
    if "text/html" in request.headers.get("Accept", ""):
        page = (
            f"<!doctype html><title>{html.escape(body['msg'])}</title>"
            f"<h1>{html.escape(body['msg'])}</h1><p>{html.escape(detail)}</p>"
            f"<p><code>{html.escape(error)}</code> &middot; backchannel</p>\n"
        )
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    return json_response(body, status, headers)


def _outcome_response(request: web.BaseRequest, exc: ForwardFailed) -> web.Response:
    headers = {"Retry-After": "1"} if isinstance(exc, TunnelBusy) else None
    return error_response(
        request,
        _STATUS.get(type(exc), 502),
        exc.code,
        str(exc),
        _ORIGINAL_ERROR.get(type(exc), "tunnel error"),
        headers,
    )


class RequestBody:
    """The caller's body as a ``BodySource``, with the size limit (0: none)."""

    def __init__(self, request: web.BaseRequest, limit: int) -> None:
        self._content = request.content
        self._limit = limit
        self._size = 0

    async def read(self) -> bytes:
        """The next chunk; b"" at the end."""
        chunk = await self._content.readany()
        self._size += len(chunk)
        if self._limit and self._size > self._limit:
            raise RequestTooLarge(
                f"the request body is larger than the limit of {self._limit} bytes"
            )
        return chunk


class PublicWebSocket:
    """The caller's WebSocket as a ``PublicSocket``."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def receive(self) -> tuple[int, bytes]:
        """The next message from the caller."""
        msg = await self._ws.receive()
        if msg.type is WSMsgType.TEXT:
            return WS_TEXT, msg.data.encode()
        if msg.type is WSMsgType.BINARY:
            return WS_BINARY, msg.data
        code = self._ws.close_code or 1000
        return WS_CLOSE, _CLOSE_CODE.pack(code)

    async def send(self, kind: int, data: bytes) -> None:
        """Send one message to the caller."""
        if self._ws.closed:
            return
        if kind == WS_TEXT:
            await self._ws.send_str(data.decode(errors="replace"))
        elif kind == WS_BINARY:
            await self._ws.send_bytes(data)
        else:
            code = _CLOSE_CODE.unpack_from(data)[0] if len(data) >= 2 else 1000
            await self._ws.close(code=code, message=data[2:])


class HttpSink:
    """The caller's response as a ``ResponseSink``: streamed, with backpressure."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None
        self._bodyless = request.method == "HEAD"

    @property
    def started(self) -> bool:
        """True once the head went out."""
        return self.response is not None

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the head."""
        response = web.StreamResponse(status=status)
        for name, value in headers:
            response.headers.add(name, value)
        self.response = response
        # HEAD answers and these statuses have no body on the wire, whatever the client sent.
        self._bodyless = self._bodyless or status in (204, 304) or status < 200
        await response.prepare(self._request)

    async def write(self, data: bytes) -> None:
        """Send a body chunk (waits while the caller's socket is full)."""
        assert self.response is not None
        if not self._bodyless:
            await self.response.write(data)

    async def finish(self) -> None:
        """End the body."""
        assert self.response is not None
        await self.response.write_eof()

    async def whole(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A complete answer: head and body leave in one write."""
        response = web.Response(status=status, body=body if not self._bodyless else None)
        for name, value in headers:
            if name.lower() != "content-length":  # web.Response sets it from the body
                response.headers.add(name, value)
        if self._bodyless or status in (204, 304) or status < 200:
            # A HEAD answer keeps the local service's Content-Length; no body is sent.
            for name, value in headers:
                if name.lower() == "content-length":
                    response.headers[name] = value
        self.response = response
        await response.prepare(self._request)
        await response.write_eof()

    async def accept_websocket(self, protocol: str | None) -> PublicWebSocket:
        """Complete the caller's WebSocket handshake."""
        ws = web.WebSocketResponse(protocols=(protocol,) if protocol else (), autoping=True)
        self.response = ws
        await ws.prepare(self._request)
        return PublicWebSocket(ws)


class TunnelIngress:
    """Routes public requests to tunnel clients."""

    def __init__(
        self,
        tokens: TunnelTokens,
        names: TunnelNames,
        registry: TunnelRegistry,
        limiter: RateLimiter,
        *,
        timeout: float,
        domain: str | None = None,
    ) -> None:
        self._tokens = tokens
        self._names = names
        self._registry = registry
        self._limiter = limiter
        self._timeout = timeout
        self._domain = domain.lower().strip(".") if domain else None

    def add_routes(self, app: web.Application) -> None:
        """Register ``/go/{token}`` and ``/go/{token}/{path}``, and host routing."""
        # Every method, WebDAV's and custom ones included, as the issue says.
        app.router.add_route("*", "/go/{token}", self.handle)
        app.router.add_route("*", "/go/{token}/{path:.*}", self.handle)
        if self._domain:
            app.middlewares.insert(0, self.host_routing)

    @web.middleware
    async def host_routing(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Send ``{name}.{domain}`` requests to the named tunnel, whatever their path."""
        host = (request.host or "").rsplit(":", 1)[0].lower().rstrip(".")
        suffix = f".{self._domain}"
        if not host.endswith(suffix) or host == self._domain:
            return await handler(request)
        name = host[: -len(suffix)]
        record = await self._names.by_name(name)
        key = record.token_hash if record is not None else None
        return await self._serve(request, key, request.raw_path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A request to ``/go/{token}[/...]``."""
        token = request.match_info["token"]
        raw = request.raw_path
        # The target is what follows /go/{token}, byte for byte; "/" at the tunnel's root.
        prefix = f"/go/{token}"
        rest = raw[len(prefix) :] if raw.startswith(prefix) else "/" + raw.split("/", 3)[-1]
        target = rest if rest.startswith("/") else "/" + rest
        return await self._serve(request, await self._resolve(token), target)

    async def _resolve(self, token: str) -> str | None:
        key = hash_secret(token)
        if self._registry.get(key) is not None:
            # A connected client proves the token valid (expired ones are dropped on time):
            # the hot path needs no store lookup.
            return key
        record = await self._tokens.lookup(token)
        if record is not None:
            return record.token_hash
        named = await self._names.by_token_hash(key)
        return named.token_hash if named is not None else None

    async def _serve(
        self, request: web.Request, key: str | None, target: str
    ) -> web.StreamResponse:
        remote = request.remote or ""
        wait = self._limiter.check(remote)
        if wait:
            return error_response(
                request,
                429,
                "rate_limited",
                f"more than {self._limiter.rate:g} requests per second from {remote}",
                "too many requests",
                {"Retry-After": str(RateLimiter.retry_after(wait))},
            )
        if key is None:
            return error_response(
                request, 404, "tunnel_not_found", "no such tunnel, or it expired", "invalid token"
            )
        client = self._registry.get(key)
        if client is None:
            return _outcome_response(
                request, TunnelOffline("no client is connected for this tunnel")
            )
        if client.access is not None:
            refusal = client.access.check(remote, request.headers.get("Authorization"))
            if refusal is not None:
                return error_response(
                    request,
                    refusal.status,
                    refusal.error,
                    refusal.detail,
                    "access denied",
                    refusal.headers,
                )
        limit = client.body_limit
        length = request.content_length
        if limit and length is not None and length > limit:
            return _outcome_response(
                request,
                RequestTooLarge(f"the request body is larger than the limit of {limit} bytes"),
            )
        headers = forwarded_headers(request)
        if client.access is not None and client.access.needs_credentials:
            # The credentials were the tunnel's, not the local service's: keep them here.
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        tunnel_request = TunnelRequest(
            method=request.method,
            target=target,
            headers=headers,
            remote=remote,
            has_body=request.body_exists,
            websocket=upgrade and request.method == "GET",
        )
        sink = HttpSink(request)
        watch = _CallerWatch(request)
        try:
            await client.exchange(tunnel_request, RequestBody(request, limit), sink, self._timeout)
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            # The caller went away; cancelling the exchange reset the stream, so the agent
            # aborts its local request. Nobody is left to read an answer.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            metrics.TUNNEL_REQUESTS.labels("caller_gone").inc()
            return sink.response or web.Response(status=499)
        except ForwardFailed as exc:
            if sink.response is None:
                return _outcome_response(request, exc)
            _cut(request)
            metrics.TUNNEL_REQUESTS.labels(exc.code).inc()
            return sink.response
        except Exception:
            if sink.response is None:
                raise
            # The answer broke off midway (agent gone, local service failed): the caller
            # sees a truncated response, never a hang or a made-up ending.
            _cut(request)
            metrics.TUNNEL_REQUESTS.labels("cut_off").inc()
            return sink.response
        finally:
            watch.stop()
        metrics.TUNNEL_REQUESTS.labels("ok").inc()
        assert sink.response is not None
        return sink.response


class _CallerWatch:
    """Cancels the handler's task when the caller's connection closes.

    aiohttp does not cancel handlers when a caller disconnects (handler_cancellation is
    off, deliberately: device calls must not be cut by an impatient app server). A tunnel
    request waiting for its head would otherwise keep the local request running. A plain
    timer, re-armed every CALLER_CHECK_INTERVAL, costs far less than a task per request.
    """

    __slots__ = ("_handle", "_request", "_task", "fired")

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self._task = asyncio.current_task()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            CALLER_CHECK_INTERVAL, self._check
        )

    def _check(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self.fired = True
            self._handle = None
            if self._task is not None:
                self._task.cancel()
            return
        self._handle = asyncio.get_running_loop().call_later(CALLER_CHECK_INTERVAL, self._check)

    def stop(self) -> None:
        """The request is over."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _cut(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def forwarded_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    """The request's headers as received, plus ``X-Forwarded-For/-Proto/-Host``."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    # The hop we saw: behind a trusted proxy ``request.remote`` is already the client, who is
    # in the chain the proxy sent; this hop appends the proxy itself.
    peer = request.transport.get_extra_info("peername") if request.transport else None
    remote = str(peer[0]) if isinstance(peer, tuple) and peer else (request.remote or "")
    # Append to a chain set by a proxy in front; Proto and Host describe this hop.
    prior = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    headers = [
        (k, v)
        for k, v in headers
        if k.lower() not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
    ]
    chain = ", ".join([*prior, remote]) if prior else remote
    headers.append(("X-Forwarded-For", chain))
    headers.append(("X-Forwarded-Proto", request.scheme))
    headers.append(("X-Forwarded-Host", request.host))
    return headers
