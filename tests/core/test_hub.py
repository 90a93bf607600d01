"""core/hub.py: takeover and identity-checked detach."""

from __future__ import annotations

from backchannel.core.hub import Hub
from backchannel.core.session import CloseReason, SessionStats


class FakeSession:
    """A stand-in Session: the hub only reads ids (no I/O is involved)."""

    transport = "fake"

    def __init__(self, app_id: str, device_id: str, sid: str) -> None:
        self.app_id = app_id
        self.device_id = device_id
        self.session_id = sid
        self.stats = SessionStats(connected_at=0.0, remote="")

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        return body

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        return None

    def tick(self, now: float) -> None:
        return None

    def in_flight(self) -> int:
        return 0


def test_takeover_and_late_detach() -> None:
    hub = Hub()
    old, new = FakeSession("a", "d", "1"), FakeSession("a", "d", "2")
    assert hub.attach(old) is None
    assert hub.attach(new) is old
    assert len(hub) == 1
    # The replaced session's disconnect must not unregister its successor.
    assert hub.detach(old) is False
    assert hub.get("a", "d") is new
    assert hub.detach(new) is True
    assert hub.get("a", "d") is None
    assert len(hub) == 0


def test_apps_are_separate() -> None:
    hub = Hub()
    a, b = FakeSession("app1", "d", "1"), FakeSession("app2", "d", "2")
    hub.attach(a)
    hub.attach(b)
    assert hub.get("app1", "d") is a
    assert hub.get("app2", "d") is b
    assert hub.of_app("app1") == [a]
    assert hub.app_count("app2") == 1
    assert sorted(s.session_id for s in hub) == ["1", "2"]
