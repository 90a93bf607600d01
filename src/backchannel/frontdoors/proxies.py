"""Requests through a trusted reverse proxy: the real client address and scheme.

Behind nginx or a load balancer every connection comes from the proxy, so per-client limits
(tunnel rate limit, ``GET /new``) would put every caller in one bucket, tunnel IP rules
would see only the proxy, and presence would show the proxy as every device's address.
With ``trusted_proxies`` set, a request whose peer is in one of those networks is taken to be
from the address its ``X-Forwarded-For`` names (the right-most entry that is not itself a
trusted proxy), over the scheme of its ``X-Forwarded-Proto``. A peer outside them is taken
at its word and its headers are ignored, so a client cannot choose its own address.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from backchannel.core.networks import Network, client_address, in_networks, parse_address

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxy_middleware(trusted: Sequence[Network]) -> Middleware:
    """An aiohttp middleware that applies ``client_address`` and the forwarded scheme."""

    @web.middleware
    async def trusted_proxies(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or ""
        peer_ip = parse_address(peer)
        if peer_ip is None or not in_networks(peer_ip, trusted):
            return await handler(request)
        remote = client_address(peer, request.headers.get("X-Forwarded-For"), trusted)
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        scheme = proto if proto in ("http", "https") else request.scheme
        if remote == peer and scheme == request.scheme:
            return await handler(request)
        return await handler(request.clone(remote=remote, scheme=scheme))

    return trusted_proxies
