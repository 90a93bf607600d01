"""core/networks.py: operator network lists, and the client behind trusted proxies."""

from __future__ import annotations

import pytest

from backchannel.core.networks import client_address, parse_address, parse_networks

TRUSTED = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


def test_parse_networks_and_addresses() -> None:
    assert [str(n) for n in TRUSTED] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["10.0.0.0/8", "nope"])
    assert str(parse_address("1.2.3.4:80")) == "1.2.3.4"
    assert str(parse_address("[2001:db8::1]:443")) == "2001:db8::1"
    assert str(parse_address(" 2001:db8::2 ")) == "2001:db8::2"
    assert parse_address("unknown") is None


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        # An untrusted peer's header is ignored: it could say anything.
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
        # A trusted proxy: the address it saw.
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        # Proxies in a chain: the right-most address that is not a trusted proxy.
        ("127.0.0.1", "198.51.100.66, 198.51.100.1, 10.1.2.3", "198.51.100.1"),
        # Everything trusted: the left-most address.
        ("127.0.0.1", "10.0.0.5, 10.0.0.6", "10.0.0.5"),
        # Garbage stops the walk: nothing left of it is believed.
        ("127.0.0.1", "198.51.100.66, junk, 10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("::1", "2001:db8::7", "2001:db8::7"),
        ("127.0.0.1", "198.51.100.1:5555", "198.51.100.1"),
    ],
)
def test_client_address(peer: str, xff: str | None, client: str) -> None:
    assert client_address(peer, xff, TRUSTED) == client
