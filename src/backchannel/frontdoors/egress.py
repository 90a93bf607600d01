"""Where the server's own HTTP requests (webhooks) may go: addresses it refuses to reach.

A webhook URL makes the server fetch an address someone else chose. The networks in
``webhook_deny_networks`` (by default ``core.networks.WEBHOOK_DENY_DEFAULT``: link-local,
which holds the cloud metadata services, "this network" and multicast) are refused both
for IP literals in the URL and for every address a host name resolves to, checked at
connect time, so a name that later resolves elsewhere (DNS rebinding) is caught too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from backchannel.core.networks import Network, in_networks


class DeniedAddress(OSError):
    """The target resolves only to addresses the server may not reach."""


def denied_literal(url: str, denied: Sequence[Network]) -> bool:
    """Whether ``url``'s host is an IP address in one of the denied networks."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: checked when it is resolved
    return in_networks(address, denied)


class GuardedResolver(AbstractResolver):
    """A resolver that drops denied addresses, and fails when nothing else is left."""

    def __init__(self, denied: Sequence[Network], inner: AbstractResolver | None = None) -> None:
        self._denied = tuple(denied)
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``, keeping only the addresses that may be reached."""
        results = await self._inner.resolve(host, port, family)
        kept = [
            r for r in results if not in_networks(ipaddress.ip_address(r["host"]), self._denied)
        ]
        if not kept:
            raise DeniedAddress(f"{host} resolves only to addresses webhooks may not reach")
        return kept

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()
