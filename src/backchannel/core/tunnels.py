"""Public tunnels: which client answers for which token, and what crosses between them.

A tunnel is a public URL (``/go/{token}/...``, or ``{name}.{domain}``) whose requests are
answered by one client connected from behind NAT: a Socket2me client over Socket.IO, or a
native agent (``backchannel expose``) over its device connection. The ingress front door
describes each request as a :class:`TunnelRequest`, gives the client a :class:`BodySource`
for the request body and a :class:`ResponseSink` for the answer, and the client streams
between them. Tokens are keyed by their hash, as everywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from backchannel.core.tunnel_access import TunnelAccess

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TunnelRequest:
    """The head of one public request."""

    method: str
    # Path and query relative to the tunnel's root, byte for byte as received ("/a?b=1").
    target: str
    # As received, in order, repeated names kept, plus the X-Forwarded-* headers.
    headers: list[tuple[str, str]]
    remote: str
    has_body: bool = True
    websocket: bool = False

    @property
    def path(self) -> str:
        """The decoded path without its leading slash ("" at the root)."""
        return unquote(self.target.partition("?")[0]).removeprefix("/")

    @property
    def query_string(self) -> str:
        """The raw query string, without the "?"."""
        return self.target.partition("?")[2]


@dataclass(slots=True)
class PublicRequest:
    """One request from the public side, read in full (for clients that take whole bodies)."""

    method: str
    # The decoded path after /go/{token}/, without the leading slash; "" at the root.
    path: str
    # The raw query string, byte for byte as received (percent-escapes kept).
    query_string: str
    # As received, in order, repeated names kept, plus the X-Forwarded-* headers.
    headers: list[tuple[str, str]]
    body: bytes
    remote: str


@dataclass(slots=True)
class PublicResponse:
    """A whole answer."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class BodySource(Protocol):
    """The public request's body, read as it arrives."""

    async def read(self) -> bytes:
        """The next chunk; b"" at the end. Raises ``RequestTooLarge`` past the limit."""


class PublicSocket(Protocol):
    """The caller's side of a WebSocket passed through a tunnel."""

    async def receive(self) -> tuple[int, bytes]:
        """The next message from the caller as (kind, data); kind WS_CLOSE at the end."""

    async def send(self, kind: int, data: bytes) -> None:
        """Send a message to the caller (WS_CLOSE data: u16 code then the reason)."""


class ResponseSink(Protocol):
    """Where the client's answer goes: a head once, then body chunks, then the end."""

    @property
    def started(self) -> bool:
        """True once the head was sent (errors can then only cut the response)."""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the response head."""

    async def write(self, data: bytes) -> None:
        """Send a body chunk; returns when the caller's connection took it."""

    async def finish(self) -> None:
        """End the body."""

    async def whole(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send a complete answer at once (instead of start, write and finish)."""

    async def accept_websocket(self, protocol: str | None) -> PublicSocket:
        """Complete the caller's WebSocket upgrade (after the client's 101)."""


class TunnelClient(Protocol):
    """What the ingress needs from a connected client, whatever its protocol."""

    kind: str
    remote: str
    connected_at: float

    @property
    def body_limit(self) -> int:
        """The largest request body this client takes, in bytes (0: none, it streams)."""

    @property
    def access(self) -> TunnelAccess | None:
        """The public side's rules (native tunnels); None lets everyone through."""

    @property
    def in_flight(self) -> int:
        """Requests sent to the client and not answered yet."""

    async def exchange(
        self, request: TunnelRequest, body: BodySource, sink: ResponseSink, timeout: float
    ) -> None:
        """Have the client answer ``request`` into ``sink``.

        ``timeout`` bounds the wait for the response head; a streaming body has no limit.
        Raises a ``ForwardFailed`` subclass when no head could be sent.
        """

    def close(self, reason: str, *, takeover: bool = False) -> None:
        """Disconnect the client; requests in flight fail with ``TunnelDisconnected``.

        ``takeover`` says a newer connection replaced it (else: released or shut down).
        """

    def describe(self) -> dict[str, Any]:
        """Facts for the admin API (never the token)."""


class TunnelRegistry:
    """The one live client per token hash on this node; a new client takes over at once."""

    def __init__(self) -> None:
        self._clients: dict[str, TunnelClient] = {}

    def attach(self, token_hash: str, client: TunnelClient) -> TunnelClient | None:
        """Make ``client`` the token's client; close and return the one it replaces."""
        old = self._clients.get(token_hash)
        self._clients[token_hash] = client
        if old is not None and old is not client:
            log.info("tunnel client replaced by a new connection from %s", client.remote)
            old.close("replaced by a new connection for the same token", takeover=True)
            return old
        return None

    def detach(self, token_hash: str, client: TunnelClient) -> bool:
        """Forget ``client`` if it is still the token's client (a replaced one is not)."""
        # The identity check is the fix for Socket2me's bug: the old socket's disconnect
        # handler must never unregister the client that replaced it.
        if self._clients.get(token_hash) is client:
            del self._clients[token_hash]
            return True
        return False

    def get(self, token_hash: str) -> TunnelClient | None:
        """The token's live client, or None."""
        return self._clients.get(token_hash)

    def drop(self, token_hash: str, reason: str) -> bool:
        """Disconnect and forget the token's client, if any."""
        client = self._clients.pop(token_hash, None)
        if client is None:
            return False
        client.close(reason)
        return True

    def clients(self) -> list[TunnelClient]:
        """Every live client on this node."""
        return list(self._clients.values())

    def __len__(self) -> int:
        return len(self._clients)
