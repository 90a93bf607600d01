"""IP networks: parsing operator-given lists, and the client behind trusted proxies.

Pure functions (no HTTP): ``frontdoors/proxies.py`` applies :func:`client_address` to
requests, and the configuration checks ``trusted_proxies`` with :func:`parse_networks`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Where webhooks may not go unless the operator says otherwise (``webhook_deny_networks``):
#: "this network", link-local (the cloud metadata services at 169.254.169.254 and
#: fd00:ec2::254 live there) and multicast.
WEBHOOK_DENY_DEFAULT = (
    "0.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "fe80::/10",
    "fd00:ec2::254/128",
    "ff00::/8",
)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Sequence[str]) -> list[Network]:
    """CIDR blocks or single addresses (``10.0.0.0/8``, ``127.0.0.1``, ``::1``).

    Raises:
        ValueError: a value is neither (the message names it).
    """
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return networks


def parse_address(text: str) -> Address | None:
    """An IP address, with or without a port (``1.2.3.4:80``, ``[::1]:80``); None if not one."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def in_networks(address: Address, networks: Sequence[Network]) -> bool:
    """Whether ``address`` is in one of ``networks``."""
    return any(address in net for net in networks)


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or what a trusted proxy says in ``X-Forwarded-For``."""
    peer_ip = parse_address(peer)
    if peer_ip is None or not forwarded_for or not in_networks(peer_ip, trusted):
        return peer
    client = peer
    # Right to left: each hop appends the address it saw. The first address that is not a
    # trusted proxy is the client; anything left of it may be made up by the client.
    for entry in reversed(forwarded_for.split(",")):
        address = parse_address(entry)
        if address is None:
            break  # garbage: believe nothing further left
        client = str(address)
        if not in_networks(address, trusted):
            break
    return client
