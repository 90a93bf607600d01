"""core/tunnels.py: one client per token, takeover, identity-checked detach."""

from __future__ import annotations

from backchannel.core.tunnels import PublicRequest, PublicResponse, TunnelRegistry


class FakeClient:
    """A stand-in TunnelClient that records how it was closed (no I/O is involved)."""

    kind = "fake"
    connected_at = 0.0

    def __init__(self, remote: str = "192.0.2.1") -> None:
        self.remote = remote
        self.closed: list[str] = []
        self.takeovers: list[bool] = []

    @property
    def in_flight(self) -> int:
        return 0

    async def forward(self, request: PublicRequest, timeout: float) -> PublicResponse:
        return PublicResponse(200, [], request.body)

    def close(self, reason: str, *, takeover: bool = False) -> None:
        self.closed.append(reason)
        self.takeovers.append(takeover)


def test_attach_get_detach() -> None:
    registry = TunnelRegistry()
    client = FakeClient()
    assert registry.attach("h", client) is None
    assert registry.get("h") is client
    assert registry.get("other") is None
    assert len(registry) == 1
    # Attaching the same client again is not a takeover: it is not closed.
    assert registry.attach("h", client) is None
    assert client.closed == []
    assert registry.detach("h", client) is True
    assert registry.get("h") is None
    assert registry.detach("h", client) is False
    assert len(registry) == 0


def test_takeover_closes_the_old_client() -> None:
    registry = TunnelRegistry()
    old, new = FakeClient("192.0.2.1"), FakeClient("192.0.2.2")
    registry.attach("h", old)
    assert registry.attach("h", new) is old
    assert len(old.closed) == 1
    assert "replaced" in old.closed[0]
    assert old.takeovers == [True]
    assert new.closed == []
    assert registry.get("h") is new
    assert len(registry) == 1


def test_late_detach_of_a_replaced_client_keeps_its_successor() -> None:
    """Socket2me's bug: the old socket's disconnect handler unregistered the new client."""
    registry = TunnelRegistry()
    old, new = FakeClient(), FakeClient()
    registry.attach("h", old)
    registry.attach("h", new)
    assert registry.detach("h", old) is False
    assert registry.get("h") is new
    assert new.closed == []
    assert registry.detach("h", new) is True
    assert registry.get("h") is None


def test_detach_of_a_client_never_attached_to_that_token() -> None:
    registry = TunnelRegistry()
    a, b = FakeClient(), FakeClient()
    registry.attach("h1", a)
    registry.attach("h2", b)
    assert registry.detach("h1", b) is False
    assert registry.get("h1") is a
    assert registry.get("h2") is b


def test_drop() -> None:
    registry = TunnelRegistry()
    client = FakeClient()
    registry.attach("h", client)
    assert registry.drop("h", "token expired") is True
    assert client.closed == ["token expired"]
    assert registry.get("h") is None
    assert registry.drop("h", "again") is False
    assert client.closed == ["token expired"]
    # Its own disconnect handler, running later, finds nothing to remove.
    assert registry.detach("h", client) is False
