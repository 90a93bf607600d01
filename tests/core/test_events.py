"""core/events.py: batching, presence records, live subscribers, bounds and retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace

import orjson
import pytest
from prometheus_client import REGISTRY

from backchannel.core import events as events_module
from backchannel.core.events import EventLog, EventSettings, event_type
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason, SessionStats
from backchannel.routing.memory import MemoryBroker
from backchannel.state.memory import MemoryStore
from backchannel.state.store import NewDelivery, NewEvent, StoredEvent
from tests.conftest import wait_for


class FakeClock:
    """Wall time moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class SpyStore(MemoryStore):
    """A memory store that records each append call, and can hold or fail them."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[NewEvent]] = []
        self.gate: asyncio.Event | None = None
        self.failures = 0

    async def append_events(
        self, events: list[NewEvent], outbox: Sequence[NewDelivery | None] | None = None
    ) -> list[StoredEvent]:
        self.batches.append(list(events))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("disk trouble")
        return await super().append_events(events, outbox)

    async def all(self, app_id: str = "a") -> list[StoredEvent]:
        return await self.read_events(app_id, 0, 1_000_000)


class FakeSession:
    """A stand-in Session with the facts presence records carry."""

    transport = "fake"

    def __init__(self, app_id: str, device_id: str, sid: str) -> None:
        self.app_id = app_id
        self.device_id = device_id
        self.session_id = sid
        self.stats = SessionStats(connected_at=123.5, remote="10.0.0.1:4242", last_seen=130.25)

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        return body

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        return None

    def tick(self, now: float) -> None:
        return None

    def in_flight(self) -> int:
        return 0


@pytest.fixture
def store() -> SpyStore:
    return SpyStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def log(store: SpyStore, clock: FakeClock) -> AsyncIterator[EventLog]:
    event_log = EventLog(store, clock)
    await event_log.start()
    yield event_log
    await event_log.stop()


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("backchannel_events_dropped_total", {"reason": reason})
    return value or 0.0


def test_event_types() -> None:
    assert event_type("temp") == "temp"
    assert event_type("") == "message"
    assert event_type("message") == "message"
    assert event_type("presence") == "device:presence"
    assert event_type("device:presence") == "device:presence"
    assert event_type("message_status") == "device:message_status"


class TestBatching:
    async def test_one_loop_turn_is_one_store_call(self, log: EventLog, store: SpyStore) -> None:
        for n in range(100):
            log.on_event("a", f"d{n % 3}", "temp", b"%d" % n)
        assert store.batches == []  # nothing was awaited on the hot path
        await log.drain()
        assert len(store.batches) == 1
        stored = await store.all()
        assert [e.data for e in stored] == [b"%d" % n for n in range(100)]
        assert [e.id for e in stored] == list(range(1, 101))
        assert log.last_id == 100

    async def test_events_pile_up_while_the_store_writes(
        self, log: EventLog, store: SpyStore
    ) -> None:
        store.gate = asyncio.Event()
        sub = log.subscribe("a")
        log.on_event("a", "d", "t", b"first")
        await wait_for(lambda: len(store.batches) == 1)
        for n in range(50):
            log.on_event("a", "d", "t", b"%d" % n)
        await asyncio.sleep(0.01)
        # Not stored yet: not visible to readers, and no id given.
        assert await sub.get(0.01) == []
        assert log.last_id == 0
        store.gate.set()
        await log.drain()
        assert [len(b) for b in store.batches] == [1, 50]
        got = await sub.get(1)
        assert [e.id for e in got] == list(range(1, 52))

    async def test_batches_are_capped(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock, EventSettings(max_batch=10, max_batch_bytes=1000))
        await log.start()
        try:
            for _ in range(25):
                log.on_event("a", "d", "t", b"x")
            log.on_event("a", "d", "t", b"y" * 5000)  # alone over the byte cap: still written
            log.on_event("a", "d", "t", b"x" * 600)
            log.on_event("a", "d", "t", b"x" * 600)
            await log.drain()
            assert [len(b) for b in store.batches] == [10, 10, 5, 1, 1, 1]
            assert len(await store.all()) == 28
        finally:
            await log.stop()

    async def test_backlog_bound_drops_new_events(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock, EventSettings(max_pending=5, max_pending_bytes=100))
        await log.start()
        try:
            before = dropped("backlog")
            for n in range(8):
                log.on_event("a", "d", "t", b"%d" % n)
            log.on_event("b", "d", "t", b"\0" * 200)  # over the byte bound alone
            await log.drain()
            assert [e.data for e in await store.all()] == [b"0", b"1", b"2", b"3", b"4"]
            assert dropped("backlog") == before + 4
        finally:
            await log.stop()

    async def test_congestion_pauses_and_resumes(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock, EventSettings(max_pending=8))
        await log.start()
        store.gate = asyncio.Event()
        try:
            log.on_event("a", "d", "t", b"first")
            await wait_for(lambda: len(store.batches) == 1)  # the writer holds one event
            for n in range(3):
                log.on_event("a", "d", "t", b"%d" % n)
            assert not log.congested
            log.on_event("a", "d", "t", b"3")  # 4 waiting: half of max_pending
            assert log.congested
            room = asyncio.ensure_future(log.room())
            await asyncio.sleep(0.01)
            assert not room.done()
            store.gate.set()
            await asyncio.wait_for(room, 2)
            assert not log.congested
            await log.drain()
            assert len(await store.all()) == 5
        finally:
            store.gate = None
            await log.stop()

    async def test_acks_wait_for_the_write(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock, EventSettings(max_pending=2))
        await log.start()
        store.gate = asyncio.Event()
        acked: list[str] = []
        try:
            log.on_event("a", "d", "t", b"x")
            log.when_stored(lambda: acked.append("x"))
            await wait_for(lambda: len(store.batches) == 1)
            log.on_event("a", "d", "t", b"y")
            log.when_stored(lambda: acked.append("y"))
            log.on_event("a", "d", "t", b"z")
            log.when_stored(lambda: acked.append("z"))
            log.on_event("a", "d", "t", b"w")  # over max_pending: dropped, never acked
            log.when_stored(lambda: acked.append("w"))
            await asyncio.sleep(0.01)
            assert acked == []  # the write is still held
            store.gate.set()
            await log.drain()
            assert acked == ["x", "y", "z"]
            assert [e.data for e in await store.all()] == [b"x", b"y", b"z"]
        finally:
            store.gate = None
            await log.stop()

    async def test_store_failures_are_retried(
        self, log: EventLog, store: SpyStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(events_module, "_RETRY_DELAYS", (0.01, 0.01))
        store.failures = 2
        log.on_event("a", "d", "t", b"kept")
        await log.drain()
        assert [e.data for e in await store.all()] == [b"kept"]
        store.failures = 3
        before = dropped("store_error")
        log.on_event("a", "d", "t", b"lost")
        await log.drain()
        assert dropped("store_error") == before + 1
        log.on_event("a", "d", "t", b"after")
        await log.drain()
        assert [e.data for e in await store.all()] == [b"kept", b"after"]

    async def test_stop_writes_what_is_pending(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock)
        log.on_event("a", "d", "t", b"before start")  # not running: not recorded
        await log.start()
        for n in range(10):
            log.on_event("a", "d", "t", b"%d" % n)
        await log.stop()
        assert len(await store.all()) == 10
        log.on_event("a", "d", "t", b"after stop")
        assert len(await store.all()) == 10

    async def test_last_id_continues_from_the_store(
        self, store: SpyStore, clock: FakeClock
    ) -> None:
        await store.append_events([NewEvent("a", "d", "t", b"", 1.0)] * 7)
        log = EventLog(store, clock)
        await log.start()
        try:
            assert log.last_id == 7
        finally:
            await log.stop()


class TestPresence:
    async def test_records_through_the_relay(
        self, log: EventLog, store: SpyStore, clock: FakeClock
    ) -> None:
        relay = Relay(MemoryBroker("n1"), clock)
        log.attach(relay)
        first, second = FakeSession("a", "d1", "s1"), FakeSession("a", "d1", "s2")
        await relay.register(first)
        relay.device_event(first, "", b"cometa style")
        relay.device_event(first, "presence", b"spoof")
        await relay.register(second)  # takeover: online again, no offline in between
        await relay.unregister(first, CloseReason.TAKEOVER)  # a replaced session: nothing
        await relay.unregister(second, CloseReason.HEARTBEAT_TIMEOUT)
        await log.drain()
        stored = await store.all()
        assert [e.type for e in stored] == [
            "presence",
            "message",
            "device:presence",
            "presence",
            "presence",
        ]
        online, again, offline = (orjson.loads(e.data) for e in stored if e.type == "presence")
        assert online == {
            "online": True,
            "reason": None,
            "remote": "10.0.0.1:4242",
            "transport": "fake",
            "session_id": "s1",
            "connected_at": 123.5,
            "last_seen": 130.25,
            "replaced": None,
        }
        assert again["online"] is True and again["replaced"] == "s1"
        assert again["session_id"] == "s2"
        assert offline["online"] is False and offline["reason"] == "heartbeat_timeout"
        assert offline["session_id"] == "s2" and offline["remote"] == "10.0.0.1:4242"
        assert all(e.ts == clock.now for e in stored)

    async def test_detach_records_the_reason(self, log: EventLog, store: SpyStore) -> None:
        relay = Relay(MemoryBroker("n1"), FakeClock())
        log.attach(relay)
        await relay.register(FakeSession("a", "d1", "s1"))
        assert await relay.detach("a", "d1")
        await log.drain()
        offline = orjson.loads((await store.all())[-1].data)
        assert (offline["online"], offline["reason"]) == (False, "detached")

    async def test_unknown_session_still_gives_a_record(
        self, log: EventLog, store: SpyStore
    ) -> None:
        log.on_disconnect("a", "ghost", CloseReason.NORMAL)
        await log.drain()
        data = orjson.loads((await store.all())[0].data)
        assert data["online"] is False and data["reason"] == "normal"
        assert data["remote"] is None and data["session_id"] is None


class TestSubscribers:
    async def test_filters(self, log: EventLog) -> None:
        everything = log.subscribe("a")
        d1 = log.subscribe("a", devices=["d1"])
        presence = log.subscribe("a", types=["presence"])
        both = log.subscribe("a", devices=["d2"], types=["temp", "presence"])
        other = log.subscribe("b")
        log.on_event("a", "d1", "temp", b"1")
        log.on_event("a", "d2", "temp", b"2")
        log.on_event("a", "d2", "door", b"3")
        log.on_disconnect("a", "d2", CloseReason.NORMAL)
        await log.drain()

        def data(got: Collection[StoredEvent]) -> list[bytes | str]:
            return [e.type if e.type == "presence" else e.data for e in got]

        assert data(await everything.get(1)) == [b"1", b"2", b"3", "presence"]
        assert data(await d1.get(1)) == [b"1"]
        assert data(await presence.get(1)) == ["presence"]
        assert data(await both.get(1)) == [b"2", "presence"]
        assert await other.get(0.01) == []

    async def test_slow_subscriber_is_dropped_alone(self, log: EventLog) -> None:
        log.settings = replace(log.settings, queue_events=5)
        slow, fast = log.subscribe("a"), log.subscribe("a")
        told: list[str] = []
        slow.on_close = lambda: told.append("closed")
        for n in range(3):
            log.on_event("a", "d", "t", b"%d" % n)
        await log.drain()
        assert len(await fast.get(1)) == 3
        for n in range(3, 6):
            log.on_event("a", "d", "t", b"%d" % n)
        await log.drain()
        assert slow.closed and slow.dropped and told == ["closed"]
        assert await slow.get(1) == []  # dropped: resume from the store instead
        assert [e.data for e in await fast.get(1)] == [b"3", b"4", b"5"]
        assert not fast.closed

    async def test_byte_bound_lets_one_big_event_through(self, log: EventLog) -> None:
        log.settings = replace(log.settings, queue_bytes=100)
        sub = log.subscribe("a")
        log.on_event("a", "d", "t", b"x" * 500)
        await log.drain()
        assert not sub.closed
        assert len(await sub.get(1)) == 1
        log.on_event("a", "d", "t", b"x" * 60)
        log.on_event("a", "d", "t", b"x" * 60)
        await log.drain()
        assert sub.dropped

    async def test_shutdown_closes_and_refuses(self, log: EventLog) -> None:
        sub = log.subscribe("a")
        log.on_event("a", "d", "t", b"last")
        await log.drain()
        log.close_subscribers()
        assert sub.closed and not sub.dropped
        assert [e.data for e in await sub.get(1)] == [b"last"]  # what was queued still comes
        assert await sub.get(1) == []
        assert not log.accepting
        assert log.subscribe("a").closed

    async def test_unsubscribe_is_idempotent(self, log: EventLog) -> None:
        sub = log.subscribe("a")
        log.unsubscribe(sub)
        log.unsubscribe(sub)
        log.on_event("a", "d", "t", b"x")
        await log.drain()
        assert await sub.get(0.01) == []


class TestRetention:
    async def test_by_count_and_by_age(self, store: SpyStore, clock: FakeClock) -> None:
        log = EventLog(store, clock, EventSettings(retention_count=3, retention_seconds=100))
        await log.start()
        try:
            for n in range(5):
                log.on_event("a", "d", "t", b"%d" % n)
                log.on_event("b", "d", "t", b"%d" % n)
            await log.drain()
            await log.trim()  # (the first trim, at start, may have done it already)
            assert [e.data for e in await store.all("a")] == [b"2", b"3", b"4"]
            assert [e.data for e in await store.all("b")] == [b"2", b"3", b"4"]
            clock.now += 50
            log.on_event("a", "d", "t", b"new")
            await log.drain()
            clock.now += 60  # the first five are 110 s old now, "new" 60 s
            assert await log.trim() == 6  # "2" of a by count; a's 3, 4 and b's 2, 3, 4 by age
            assert [e.data for e in await store.all("a")] == [b"new"]
            assert await store.all("b") == []
        finally:
            await log.stop()

    async def test_only_apps_with_new_events_are_counted(
        self, store: SpyStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[Collection[str] | None] = []
        trim = store.trim_events

        async def spy(
            max_per_app: int, older: float, app_ids: Collection[str] | None = None
        ) -> int:
            calls.append(None if app_ids is None else set(app_ids))
            return await trim(max_per_app, older, app_ids)

        monkeypatch.setattr(store, "trim_events", spy)
        log = EventLog(store, clock)
        await log.start()  # the first trim runs at once and covers every app
        try:
            await wait_for(lambda: len(calls) == 1)
            log.on_event("a", "d", "t", b"")
            log.on_event("b", "d", "t", b"")
            await log.drain()
            await log.trim()
            await log.trim()
            assert calls == [None, {"a", "b"}, set()]
        finally:
            await log.stop()


class FakePlanner:
    """Asks for an outbox row for every event named "hook"."""

    def __init__(self) -> None:
        self.enqueued_calls = 0

    async def plan(self, batch: list[NewEvent]) -> list[NewDelivery | None] | None:
        rows: list[NewDelivery | None] = [
            NewDelivery(e.app_id, e.device_id, "event", e.name, e.data, e.ts)
            if e.name == "hook"
            else None
            for e in batch
        ]
        return rows if any(rows) else None

    def enqueued(self) -> None:
        self.enqueued_calls += 1


async def test_outbox_rows_go_with_their_events(store: SpyStore, clock: FakeClock) -> None:
    planner = FakePlanner()
    event_log = EventLog(store, clock, outbox=planner)
    await event_log.start()
    try:
        event_log.on_event("a", "d", "plain", b"1")
        event_log.on_event("a", "d", "hook", b"2")
        await event_log.drain()
        assert len(store.batches) == 1 and planner.enqueued_calls == 1
        stored = await store.all()
        (row,) = await store.due_deliveries(clock.time() + 1, 10)
        assert (row.event_id, row.body, row.event_name) == (stored[1].id, b"2", "hook")
        event_log.on_event("a", "d", "plain", b"3")
        await event_log.drain()
        assert planner.enqueued_calls == 1  # no rows, no wake-up
    finally:
        await event_log.stop()
