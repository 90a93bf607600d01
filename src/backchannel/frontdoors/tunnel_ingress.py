"""The public side of tunnels: ``/go/{token}`` and ``/go/{token}/...``, every method.

A request is checked (rate limit per client IP, token, body size), turned into a
:class:`~backchannel.core.tunnels.PublicRequest` with ``X-Forwarded-*`` headers added, and
handed to the token's client. The answer, or an honest error, goes back to the caller:
404 for an unknown token, 502 when no client is connected or it went away, 504 on timeout.
Error bodies keep Socket2me's ``{"Error": ...}`` field beside the usual JSON error fields.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from backchannel.core import metrics
from backchannel.core.outcomes import (
    BadTunnelResponse,
    ForwardFailed,
    TunnelBusy,
    TunnelDisconnected,
    TunnelOffline,
    TunnelResponseTooLarge,
    TunnelTimedOut,
)
from backchannel.core.ratelimit import RateLimiter
from backchannel.core.tokens import TunnelTokens
from backchannel.core.tunnels import PublicRequest, TunnelRegistry
from backchannel.frontdoors.errors import json_error

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

# Socket2me's error strings, kept in the "Error" field for its clients.
_ORIGINAL_ERROR: dict[type[ForwardFailed], str] = {
    TunnelOffline: "client not connected",
    TunnelDisconnected: "client disconnected",
    TunnelTimedOut: "client timeout",
    TunnelBusy: "client busy",
    BadTunnelResponse: "bad client response",
    TunnelResponseTooLarge: "response too large",
}
_STATUS: dict[type[ForwardFailed], int] = {
    TunnelOffline: 502,
    TunnelDisconnected: 502,
    TunnelTimedOut: 504,
    TunnelBusy: 503,
    BadTunnelResponse: 502,
    TunnelResponseTooLarge: 413,
}


def _outcome_response(exc: ForwardFailed) -> web.Response:
    status = _STATUS.get(type(exc), 502)
    headers = {"Retry-After": "1"} if isinstance(exc, TunnelBusy) else None
    metrics.TUNNEL_REQUESTS.labels(exc.code).inc()
    return json_error(
        status,
        exc.code,
        str(exc),
        headers=headers,
        Error=_ORIGINAL_ERROR.get(type(exc), "tunnel error"),
    )


class TunnelIngress:
    """Routes public requests to tunnel clients."""

    def __init__(
        self,
        tokens: TunnelTokens,
        registry: TunnelRegistry,
        limiter: RateLimiter,
        *,
        timeout: float,
        max_body: int,
    ) -> None:
        self._tokens = tokens
        self._registry = registry
        self._limiter = limiter
        self._timeout = timeout
        self._max_body = max_body

    def add_routes(self, app: web.Application) -> None:
        """Register ``/go/{token}`` and ``/go/{token}/{path}`` for every method."""
        for method in METHODS:
            app.router.add_route(method, "/go/{token}", self.handle)
            app.router.add_route(method, "/go/{token}/{path:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward one public request and return the client's answer."""
        remote = request.remote or ""
        wait = self._limiter.check(remote)
        if wait:
            metrics.TUNNEL_REQUESTS.labels("rate_limited").inc()
            return json_error(
                429,
                "rate_limited",
                f"more than {self._limiter.rate:g} requests per second from {remote}",
                headers={"Retry-After": str(RateLimiter.retry_after(wait))},
                Error="too many requests",
            )
        record = await self._tokens.lookup(request.match_info["token"])
        if record is None:
            metrics.TUNNEL_REQUESTS.labels("tunnel_not_found").inc()
            return json_error(
                404, "tunnel_not_found", "no such token, or it expired", Error="invalid token"
            )
        client = self._registry.get(record.token_hash)
        if client is None:
            return _outcome_response(TunnelOffline("no client is connected for this token"))
        body = await self._read_body(request)
        if body is None:
            metrics.TUNNEL_REQUESTS.labels("request_too_large").inc()
            return json_error(
                413,
                "request_too_large",
                f"the request body is larger than the limit of {self._max_body} bytes",
                Error="request too large",
            )
        public = PublicRequest(
            method=request.method,
            path=request.match_info.get("path", "").removeprefix("/"),
            query_string=request.raw_path.partition("?")[2],
            headers=forwarded_headers(request),
            body=body,
            remote=remote,
        )
        try:
            answer = await client.forward(public, self._timeout)
        except ForwardFailed as exc:
            return _outcome_response(exc)
        metrics.TUNNEL_REQUESTS.labels("ok").inc()
        return web.Response(
            status=answer.status, body=answer.body, headers=CIMultiDict(answer.headers)
        )

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The whole body, or None when it is over the limit (checked before buffering)."""
        length = request.content_length
        if length is not None and length > self._max_body:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def forwarded_headers(request: web.Request) -> list[tuple[str, str]]:
    """The request's headers as received, plus ``X-Forwarded-For/-Proto/-Host``."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    remote = request.remote or ""
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
