"""Socket2me's token REST: ``GET /new`` and ``GET /refresh/{token}`` (COMPAT.md).

``/new`` answers the token as a JSON string, with the quotes, as the original did;
``/refresh`` answers ``OK``. Who may take tokens is the server's ``socket2me`` setting:
anyone (the original's behaviour), holders of the admin token, or nobody. Token creation is
rate-limited per client IP on its own, stricter bucket, because every token is a store row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web

from backchannel.core.apps import AppService
from backchannel.core.ratelimit import RateLimiter
from backchannel.core.tokens import TunnelTokens
from backchannel.frontdoors.errors import json_error, json_response

Access = Literal["open", "admin", "off"]


class Socket2meTokens:
    """The two token routes."""

    def __init__(
        self, tokens: TunnelTokens, apps: AppService, limiter: RateLimiter, access: Access
    ) -> None:
        self._tokens = tokens
        self._apps = apps
        self._limiter = limiter
        self._access = access

    def add_routes(self, app: web.Application) -> None:
        """Register ``/new`` and ``/refresh/{token}`` unless Socket2me is off."""
        if self._access == "off":
            return
        app.router.add_get("/new", self._guarded(self.new, admin_only=True))
        # Refreshing needs only the token: a client must keep its URL without the admin token.
        app.router.add_get("/refresh/{token}", self._guarded(self.refresh, admin_only=False))

    def _guarded(
        self, handler: Callable[[web.Request], Awaitable[web.Response]], *, admin_only: bool
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            wait = self._limiter.check(request.remote or "")
            if wait:
                return json_error(
                    429,
                    "rate_limited",
                    "too many token requests from this address",
                    headers={"Retry-After": str(RateLimiter.retry_after(wait))},
                    Error="too many requests",
                )
            if admin_only and self._access == "admin" and not await self._is_admin(request):
                return json_error(
                    401,
                    "unauthorized",
                    "this server issues tunnel tokens to its admin token only",
                    headers={"WWW-Authenticate": "Bearer"},
                    Error="unauthorized",
                )
            return await handler(request)

        return guarded

    async def _is_admin(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._apps.is_admin(token.strip())

    async def new(self, request: web.Request) -> web.Response:
        """A new token, as a JSON string."""
        return json_response(await self._tokens.issue())

    async def refresh(self, request: web.Request) -> web.Response:
        """Give the token a full lifetime again."""
        if await self._tokens.refresh(request.match_info["token"]) is None:
            return json_error(
                404, "token_not_found", "no such token, or it expired", Error="invalid token"
            )
        return web.Response(text="OK", content_type="text/html")
