"""Public tunnels: which client answers for which token, and what crosses between them.

A tunnel is a public URL (``/go/{token}/...``) whose requests are answered by one client
connected from behind NAT: a Socket2me client over Socket.IO today, the native ``expose``
agent later. The ingress front door turns an HTTP request into a :class:`PublicRequest`,
asks the registered :class:`TunnelClient` to answer it, and writes the
:class:`PublicResponse` back. Tokens are keyed by their hash, as everywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PublicRequest:
    """One request from the public side, already read in full."""

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
    """The client's answer."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class TunnelClient(Protocol):
    """What the ingress needs from a connected client, whatever its protocol."""

    kind: str
    remote: str
    connected_at: float

    @property
    def in_flight(self) -> int:
        """Requests sent to the client and not answered yet."""

    async def forward(self, request: PublicRequest, timeout: float) -> PublicResponse:
        """Have the client answer ``request``; raise a ``ForwardFailed`` subclass otherwise."""

    def close(self, reason: str) -> None:
        """Disconnect the client; requests in flight fail with ``TunnelDisconnected``."""


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
            old.close("replaced by a new connection for the same token")
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

    def close_all(self, reason: str) -> None:
        """Disconnect every client (shutdown)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close(reason)

    def __len__(self) -> int:
        return len(self._clients)
