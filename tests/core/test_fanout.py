"""core/fanout.py: one deadline for all calls, outcomes in order, failures kept apart.

The sessions here are stand-ins attached to a real :class:`Relay`, to play the parts a
real transport never should: a session that ignores its timeout, one that crashes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from backchannel.core.apps import AppService
from backchannel.core.clock import SystemClock
from backchannel.core.fanout import GRACE, Fanout, Status, TooManyDevices, unique_devices
from backchannel.core.outcomes import DeviceBusy, NoReply
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason, SessionStats
from backchannel.routing.memory import MemoryBroker
from backchannel.state.memory import MemoryStore


class StandInSession:
    """A session whose ``call`` does what the test says."""

    transport = "stand-in"

    def __init__(self, device_id: str, behaviour: str, app_id: str = "app") -> None:
        self.app_id = app_id
        self.device_id = device_id
        self.session_id = f"s-{device_id}"
        self.stats = SessionStats(connected_at=0.0, remote="")
        self.behaviour = behaviour
        self.cancelled = False

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        if self.behaviour == "echo":
            return self.device_id.encode() + b":" + body
        if self.behaviour == "busy":
            raise DeviceBusy("too many calls")
        if self.behaviour == "slow":
            await asyncio.sleep(timeout)
            raise NoReply(timeout)
        if self.behaviour == "crash":
            raise RuntimeError("bug in a transport")
        # "hang": ignores its timeout, as a broken transport might.
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return b""

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        return None

    def tick(self, now: float) -> None:
        return None

    def in_flight(self) -> int:
        return 0


def make_fanout(*sessions: StandInSession, max_devices: int = 100) -> Fanout:
    clock = SystemClock()
    relay = Relay(MemoryBroker("node"), clock)
    for session in sessions:
        relay.hub.attach(session)
    return Fanout(relay, AppService(MemoryStore(), clock), max_devices)


async def test_outcomes_in_target_order() -> None:
    fanout = make_fanout(
        StandInSession("a", "echo"), StandInSession("b", "busy"), StandInSession("c", "slow")
    )
    report = await fanout.run("app", ["c", "x", "b", "a"], b"hi", "", 0.2)
    assert [o.device_id for o in report.outcomes] == ["c", "x", "b", "a"]
    c, x, b, a = report.outcomes
    assert (a.status, a.reply, a.error) == (Status.REPLIED, b"a:hi", None)
    assert (b.status, b.error) == (Status.ERROR, "device_busy")
    assert (c.status, c.error) == (Status.TIMEOUT, "timeout_no_reply")
    assert (x.status, x.error) == (Status.OFFLINE, "device_offline")
    assert report.timeout == 0.2
    assert [report.count(s) for s in Status] == [1, 1, 0, 1, 1]  # none queued here
    assert a.ms < c.ms


async def test_hung_session_is_abandoned_at_the_deadline() -> None:
    hung = StandInSession("hung", "hang")
    fanout = make_fanout(hung, StandInSession("ok", "echo"))
    started = time.monotonic()
    report = await fanout.run("app", ["hung", "ok"], b"x", "", 0.2)
    elapsed = time.monotonic() - started
    assert 0.2 + GRACE <= elapsed < 0.2 + 2 * GRACE + 0.3
    hung_outcome, ok = report.outcomes
    assert (hung_outcome.status, hung_outcome.error) == (Status.TIMEOUT, "timeout")
    assert hung_outcome.detail == "no reply within 0.2 s"
    assert hung_outcome.ms >= 200
    assert ok.status is Status.REPLIED
    assert hung.cancelled


async def test_a_crashing_session_fails_only_itself() -> None:
    fanout = make_fanout(StandInSession("bad", "crash"), StandInSession("good", "echo"))
    report = await fanout.run("app", ["bad", "good"], b"x", "", 1.0)
    bad, good = report.outcomes
    assert (bad.status, bad.error) == (Status.ERROR, "internal_error")
    assert good.reply == b"good:x"


async def test_other_apps_sessions_are_offline() -> None:
    fanout = make_fanout(StandInSession("d", "echo", app_id="other"))
    report = await fanout.run("app", ["d"], b"x", "", 1.0)
    assert report.outcomes[0].status is Status.OFFLINE


async def test_empty_and_limit() -> None:
    fanout = make_fanout(max_devices=2)
    assert (await fanout.run("app", [], b"x", "", 1.0)).outcomes == []
    with pytest.raises(TooManyDevices) as info:
        await fanout.run("app", ["a", "b", "c"], b"x", "", 1.0)
    assert (info.value.count, info.value.limit) == (3, 2)
    fanout.check_size(2)


def test_unique_devices() -> None:
    assert unique_devices(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert unique_devices([]) == []
    with pytest.raises(ValueError, match="bad/id"):
        unique_devices(["ok", "bad/id"])
    with pytest.raises(ValueError):
        unique_devices(["x" * 129])


async def test_tagged_devices_in_provisioning_order() -> None:
    clock = SystemClock()
    store = MemoryStore()
    apps = AppService(store, clock)
    await store.open()
    app, _ = await apps.create("tags")
    for device_id, tags in (("z", ("t",)), ("a", ("u",)), ("m", ("t", "u"))):
        await apps.provision(app.app_id, device_id, tags)
        await asyncio.sleep(0.01)  # distinct created_at: the store orders by it, then by id
    fanout = Fanout(Relay(MemoryBroker("node"), clock), apps, 10)
    assert await fanout.tagged_devices(app.app_id, "t") == ["z", "m"]
    assert await fanout.tagged_devices(app.app_id, "u") == ["a", "m"]
    assert await fanout.tagged_devices(app.app_id, "none") == []
