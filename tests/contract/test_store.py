"""The one contract suite every Store implementation must pass."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from backchannel.state import sqlite as sqlite_module
from backchannel.state.memory import MemoryStore
from backchannel.state.sqlite import MIGRATIONS, SqliteStore
from backchannel.state.store import (
    DEAD,
    DELIVERED,
    EXPIRED,
    FAILED,
    PENDING,
    QUEUED,
    REPLIED,
    SENT,
    AlreadyExists,
    AppRecord,
    DeviceCredential,
    Message,
    NewDelivery,
    NewEvent,
    Store,
    StoredEvent,
    TunnelName,
    TunnelToken,
)

StoreFactory = Callable[[Path], Store]

FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda _tmp: MemoryStore(),
    "sqlite": lambda tmp: SqliteStore(tmp / "state" / "backchannel.db"),
    # "redis": add a factory here once backchannel.state.redis exists (skip when no server).
}


@pytest_asyncio.fixture(params=list(FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each backend, closed after the test."""
    s = FACTORIES[request.param](tmp_path)
    await s.open()
    yield s
    await s.close()


def app(app_id: str, created_at: float = 1.0, **kw: Any) -> AppRecord:
    """An application record with filler fields."""
    return AppRecord(
        app_id=app_id,
        name=f"name-{app_id}",
        secret_hash=f"hash-{app_id}",
        created_at=created_at,
        **kw,
    )


def cred(
    app_id: str,
    device_id: str,
    created_at: float = 1.0,
    key_hash: str = "k",
    tags: tuple[str, ...] = (),
) -> DeviceCredential:
    """A device credential with filler fields."""
    return DeviceCredential(
        app_id=app_id, device_id=device_id, key_hash=key_hash, created_at=created_at, tags=tags
    )


async def test_missing_records_are_none(store: Store) -> None:
    assert await store.get_app("nope") is None
    assert await store.get_device_credential("nope", "dev") is None
    assert await store.get_setting("nope") is None
    assert await store.list_apps() == []
    assert await store.list_device_credentials("nope") == []


async def test_app_round_trips_every_field(store: Store) -> None:
    full = app(
        "a1",
        created_at=1712345678.123456,
        webhook_url="https://example.test/hook",
        default_timeout=2.5,
        allow_open_attach=True,
        allowed_devices=("dev-1", "dév-2", ""),
        webhook_kinds=("event", "presence", "call"),
    )
    bare = app("a2")
    await store.create_app(full)
    await store.create_app(bare)
    assert await store.get_app("a1") == full
    got = await store.get_app("a2")
    assert got == bare
    assert got is not None and got.allowed_devices == () and got.webhook_url is None


async def test_create_app_rejects_taken_id(store: Store) -> None:
    first = app("a1", created_at=1.0)
    await store.create_app(first)
    with pytest.raises(AlreadyExists):
        await store.create_app(app("a1", created_at=2.0, allow_open_attach=True))
    assert await store.get_app("a1") == first
    assert await store.list_apps() == [first]


async def test_list_apps_orders_by_creation_then_id(store: Store) -> None:
    records = [app("c", 2.0), app("b", 1.0), app("a", 2.0), app("z", 0.5), app("m", 1.0)]
    for record in records:
        await store.create_app(record)
    listed = await store.list_apps()
    assert [a.app_id for a in listed] == ["z", "b", "m", "a", "c"]


async def test_update_app(store: Store) -> None:
    await store.create_app(app("a1"))
    changed = app("a1", webhook_url="https://x.test", default_timeout=9.0, allowed_devices=("d",))
    assert await store.update_app(changed) is True
    assert await store.get_app("a1") == changed
    assert await store.update_app(app("ghost")) is False
    assert await store.get_app("ghost") is None


async def test_delete_app_deletes_its_credentials_only(store: Store) -> None:
    await store.create_app(app("a1"))
    await store.create_app(app("a2"))
    await store.put_device_credential(cred("a1", "d1"))
    await store.put_device_credential(cred("a1", "d2"))
    kept = cred("a2", "d1")
    await store.put_device_credential(kept)

    assert await store.delete_app("a1") is True
    assert await store.get_app("a1") is None
    assert await store.get_device_credential("a1", "d1") is None
    assert await store.list_device_credentials("a1") == []
    assert await store.get_app("a2") is not None
    assert await store.list_device_credentials("a2") == [kept]
    assert await store.delete_app("a1") is False
    assert await store.delete_app("ghost") is False


async def test_recreated_app_starts_without_credentials(store: Store) -> None:
    await store.create_app(app("a1"))
    await store.put_device_credential(cred("a1", "d1"))
    await store.delete_app("a1")
    await store.create_app(app("a1"))
    assert await store.list_device_credentials("a1") == []


async def test_put_device_credential_inserts_then_replaces(store: Store) -> None:
    await store.create_app(app("a1"))
    original = cred("a1", "d1", created_at=1.0, key_hash="old", tags=("x", "y"))
    await store.put_device_credential(original)
    assert await store.get_device_credential("a1", "d1") == original

    rotated = cred("a1", "d1", created_at=5.0, key_hash="new", tags=("z",))
    await store.put_device_credential(rotated)
    assert await store.get_device_credential("a1", "d1") == rotated
    assert await store.list_device_credentials("a1") == [rotated]


async def test_credentials_are_scoped_by_app(store: Store) -> None:
    await store.create_app(app("a1"))
    await store.create_app(app("a2"))
    one = cred("a1", "same", key_hash="k1")
    two = cred("a2", "same", key_hash="k2")
    await store.put_device_credential(one)
    await store.put_device_credential(two)
    assert await store.get_device_credential("a1", "same") == one
    assert await store.get_device_credential("a2", "same") == two
    assert await store.get_device_credential("a1", "other") is None


async def test_list_device_credentials_orders_by_creation_then_id(store: Store) -> None:
    await store.create_app(app("a1"))
    for device_id, created_at in [("c", 2.0), ("b", 1.0), ("a", 2.0), ("z", 0.5), ("m", 1.0)]:
        await store.put_device_credential(cred("a1", device_id, created_at))
    listed = await store.list_device_credentials("a1")
    assert [c.device_id for c in listed] == ["z", "b", "m", "a", "c"]


async def test_delete_device_credential(store: Store) -> None:
    await store.create_app(app("a1"))
    await store.put_device_credential(cred("a1", "d1"))
    await store.put_device_credential(cred("a1", "d2"))
    assert await store.delete_device_credential("a1", "d1") is True
    assert await store.get_device_credential("a1", "d1") is None
    assert [c.device_id for c in await store.list_device_credentials("a1")] == ["d2"]
    assert await store.delete_device_credential("a1", "d1") is False
    assert await store.delete_device_credential("ghost", "d2") is False


async def test_settings_set_get_overwrite(store: Store) -> None:
    await store.set_setting("admin_token_hash", "h1")
    await store.set_setting("other", "")
    assert await store.get_setting("admin_token_hash") == "h1"
    assert await store.get_setting("other") == ""
    await store.set_setting("admin_token_hash", "h2")
    assert await store.get_setting("admin_token_hash") == "h2"


async def test_close_is_idempotent(store: Store) -> None:
    await store.close()
    await store.close()


async def test_concurrent_calls(store: Store) -> None:
    await store.create_app(app("a1"))
    n = 200
    await asyncio.gather(
        *(store.put_device_credential(cred("a1", f"d{i:03}", float(i))) for i in range(n))
    )
    got = await asyncio.gather(*(store.get_device_credential("a1", f"d{i:03}") for i in range(n)))
    assert [c.key_hash if c else None for c in got] == ["k"] * n
    mixed = await asyncio.gather(
        *(store.set_setting(f"s{i}", str(i)) for i in range(n)),
        *(store.get_app("a1") for _ in range(n)),
    )
    assert all(r is None or isinstance(r, AppRecord) for r in mixed)
    assert [c.device_id for c in await store.list_device_credentials("a1")] == [
        f"d{i:03}" for i in range(n)
    ]


# --- sqlite only: durability and file format ---


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "backchannel.db"
    first = SqliteStore(path)
    await first.open()
    record = app("a1", allowed_devices=("d1", "d2"), default_timeout=3.0)
    credential = cred("a1", "d1", tags=("t",))
    await first.create_app(record)
    await first.put_device_credential(credential)
    await first.set_setting("admin_token_hash", "h")
    await first.close()
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get_app("a1") == record
        assert await second.list_device_credentials("a1") == [credential]
        assert await second.get_setting("admin_token_hash") == "h"
        with pytest.raises(AlreadyExists):
            await second.create_app(record)
    finally:
        await second.close()


class TestTunnelTokens:
    """Socket2me tokens, by hash, with an expiry."""

    async def test_create_get_and_duplicate(self, store: Store) -> None:
        token = TunnelToken("h1", created_at=10.0, expires_at=100.0)
        assert await store.get_tunnel_token("h1") is None
        await store.create_tunnel_token(token)
        assert await store.get_tunnel_token("h1") == token
        with pytest.raises(AlreadyExists):
            await store.create_tunnel_token(TunnelToken("h1", 11.0, 111.0))
        assert await store.get_tunnel_token("h1") == token

    async def test_extend_only_existing(self, store: Store) -> None:
        await store.create_tunnel_token(TunnelToken("h1", 10.0, 100.0))
        assert await store.extend_tunnel_token("h1", 500.0)
        assert await store.get_tunnel_token("h1") == TunnelToken("h1", 10.0, 500.0)
        assert not await store.extend_tunnel_token("missing", 500.0)
        assert await store.get_tunnel_token("missing") is None

    async def test_delete_and_delete_expired(self, store: Store) -> None:
        for n, expires in enumerate((50.0, 100.0, 150.0, 200.0)):
            await store.create_tunnel_token(TunnelToken(f"h{n}", 1.0, expires))
        assert await store.delete_tunnel_token("h3")
        assert not await store.delete_tunnel_token("h3")
        assert await store.delete_expired_tunnel_tokens(100.0) == 2  # h0 and h1 (<= now)
        assert await store.get_tunnel_token("h0") is None
        assert await store.get_tunnel_token("h1") is None
        assert await store.get_tunnel_token("h2") == TunnelToken("h2", 1.0, 150.0)
        assert await store.delete_expired_tunnel_tokens(100.0) == 0


class TestTunnelNames:
    """Native tunnel names: first claim wins, looked up by name or token hash."""

    async def test_claim_get_and_release(self, store: Store) -> None:
        mine = TunnelName("web", "a1", "d1", "th1", 5.0)
        assert await store.claim_tunnel_name(mine) == mine
        assert await store.claim_tunnel_name(mine) == mine  # a reclaim by the owner
        theirs = TunnelName("web", "a2", "d2", "th2", 6.0)
        assert await store.claim_tunnel_name(theirs) == mine  # taken: the holder comes back
        assert await store.get_tunnel_name("web") == mine
        assert await store.get_tunnel_name_by_token("th1") == mine
        assert await store.get_tunnel_name_by_token("th2") is None
        assert await store.get_tunnel_name("nope") is None
        assert await store.delete_tunnel_name("web")
        assert not await store.delete_tunnel_name("web")
        assert await store.claim_tunnel_name(theirs) == theirs

    async def test_delete_app_releases_its_names(self, store: Store) -> None:
        await store.create_app(app("a1"))
        await store.claim_tunnel_name(TunnelName("web", "a1", "d1", "th1", 5.0))
        await store.claim_tunnel_name(TunnelName("api", "a2", "d1", "th2", 5.0))
        await store.delete_app("a1")
        assert await store.get_tunnel_name("web") is None
        assert await store.get_tunnel_name("api") is not None


async def test_sqlite_tokens_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = SqliteStore(path)
    await first.open()
    await first.create_tunnel_token(TunnelToken("h", 1.0, 2.0))
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.get_tunnel_token("h") == TunnelToken("h", 1.0, 2.0)
    finally:
        await second.close()


async def test_sqlite_same_instance_reopens(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    await s.set_setting("k", "v")
    await s.close()
    await s.open()
    try:
        assert await s.get_setting("k") == "v"
    finally:
        await s.close()


async def test_sqlite_file_uses_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    s = SqliteStore(path)
    await s.open()
    await s.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "apps",
        "device_credentials",
        "settings",
        "tunnel_tokens",
        "tunnel_names",
        "events",
        "webhook_outbox",
    } <= tables


async def test_sqlite_work_runs_on_worker_thread(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    try:
        await s.set_setting("k", "v")
        names = {t.name for t in threading.enumerate()}
        assert any(n.startswith("backchannel-sqlite") for n in names)
    finally:
        await s.close()


def ev(
    app_id: str = "a1", device_id: str = "d1", type: str = "t", data: bytes = b"x", ts: float = 1.0
) -> NewEvent:
    """A new event with filler fields."""
    return NewEvent(app_id, device_id, type, data, ts)


def ids(events: list[StoredEvent]) -> list[int]:
    return [e.id for e in events]


class TestEvents:
    """The event log: ids, batches, filtered reads, retention."""

    async def test_append_gives_increasing_ids_in_batch_order(self, store: Store) -> None:
        assert await store.last_event_id() == 0
        assert await store.append_events([]) == []
        batch = [
            ev(data=bytes(range(256)), type="température", ts=1712345678.123456),
            ev(device_id="d2", data=b"", type=""),
            ev(app_id="a2", data=b"\x00" * 70_000),
        ]
        stored = await store.append_events(batch)
        assert ids(stored) == [1, 2, 3]
        for new, old in zip(stored, batch, strict=True):
            assert (new.app_id, new.device_id, new.type, new.data, new.ts) == (
                old.app_id,
                old.device_id,
                old.type,
                old.data,
                old.ts,
            )
        more = await store.append_events([ev(app_id="a2"), ev()])
        assert ids(more) == [4, 5]
        assert await store.last_event_id() == 5
        assert await store.read_events("a1", 0, 100) == [stored[0], stored[1], more[1]]
        assert await store.read_events("a2", 0, 100) == [stored[2], more[0]]

    async def test_read_after_id_with_limit(self, store: Store) -> None:
        await store.append_events([ev(data=b"%d" % n) for n in range(10)])
        assert ids(await store.read_events("a1", 0, 3)) == [1, 2, 3]
        assert ids(await store.read_events("a1", 3, 3)) == [4, 5, 6]
        assert ids(await store.read_events("a1", 8, 100)) == [9, 10]
        assert await store.read_events("a1", 10, 100) == []
        assert await store.read_events("a1", 0, 0) == []
        assert await store.read_events("other", 0, 100) == []

    async def test_read_filters_by_devices_and_types(self, store: Store) -> None:
        await store.append_events(
            [
                ev(device_id="d1", type="temp"),  # 1
                ev(device_id="d2", type="temp"),  # 2
                ev(device_id="d3", type="presence"),  # 3
                ev(device_id="d1", type="presence"),  # 4
                ev(device_id="d2", type="door"),  # 5
                ev(app_id="a2", device_id="d1", type="temp"),  # 6
            ]
        )
        assert ids(await store.read_events("a1", 0, 100, devices=["d1"])) == [1, 4]
        assert ids(await store.read_events("a1", 0, 100, devices={"d1", "d3"})) == [1, 3, 4]
        assert ids(await store.read_events("a1", 0, 100, types=["presence"])) == [3, 4]
        assert ids(await store.read_events("a1", 0, 100, types=["temp", "door"])) == [1, 2, 5]
        both = await store.read_events("a1", 0, 100, devices=["d2"], types=["door"])
        assert ids(both) == [5]
        assert ids(await store.read_events("a1", 1, 1, devices=["d1", "d2"])) == [2]
        assert await store.read_events("a1", 0, 100, devices=["nobody"]) == []

    async def test_trim_by_count_per_app(self, store: Store) -> None:
        await store.append_events([ev(app_id=f"a{n % 2}", ts=100.0) for n in range(10)])
        # a0 holds 1, 3, 5, 7, 9; a1 holds 2, 4, 6, 8, 10.
        assert await store.trim_events(3, 0.0, ["a0"]) == 2
        assert ids(await store.read_events("a0", 0, 100)) == [5, 7, 9]
        assert ids(await store.read_events("a1", 0, 100)) == [2, 4, 6, 8, 10]
        assert await store.trim_events(2, 0.0) == 4  # every app: 1 from a0, 3 from a1
        assert ids(await store.read_events("a0", 0, 100)) == [7, 9]
        assert ids(await store.read_events("a1", 0, 100)) == [8, 10]
        assert await store.trim_events(2, 0.0) == 0
        assert await store.trim_events(5, 0.0, ["ghost"]) == 0

    async def test_trim_by_age_applies_to_every_app(self, store: Store) -> None:
        await store.append_events(
            [ev(ts=10.0), ev(app_id="a2", ts=20.0), ev(ts=30.0), ev(app_id="a2", ts=5.0)]
        )
        # ts < older_than goes, whatever the order of the timestamps.
        assert await store.trim_events(100, 20.0, []) == 2
        assert ids(await store.read_events("a1", 0, 100)) == [3]
        assert ids(await store.read_events("a2", 0, 100)) == [2]

    async def test_ids_are_never_reused(self, store: Store) -> None:
        await store.append_events([ev(), ev()])
        assert await store.trim_events(0, 0.0) == 2
        assert await store.read_events("a1", 0, 100) == []
        assert await store.last_event_id() == 2
        assert ids(await store.append_events([ev()])) == [3]

    async def test_delete_app_deletes_its_events(self, store: Store) -> None:
        await store.create_app(app("a1"))
        await store.append_events([ev(), ev(app_id="a2")])
        await store.delete_app("a1")
        assert await store.read_events("a1", 0, 100) == []
        assert ids(await store.read_events("a2", 0, 100)) == [2]

    async def test_concurrent_appends_keep_ids_unique(self, store: Store) -> None:
        batches = await asyncio.gather(
            *(store.append_events([ev(data=b"%d" % n)] * 5) for n in range(40))
        )
        all_ids = [i for batch in batches for i in ids(batch)]
        assert sorted(all_ids) == list(range(1, 201))
        for batch in batches:
            assert ids(batch) == list(range(batch[0].id, batch[0].id + 5))
        stored = await store.read_events("a1", 0, 1000)
        assert ids(stored) == list(range(1, 201))
        by_id = {e.id: e for batch in batches for e in batch}
        assert all(by_id[e.id] == e for e in stored)


async def test_sqlite_events_survive_reopen_and_ids_continue(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = SqliteStore(path)
    await first.open()
    stored = await first.append_events([ev(data=b"\xff\x00"), ev(type="")])
    await first.trim_events(1, 0.0)  # the newest survives; id 1 goes
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.read_events("a1", 0, 10) == [stored[1]]
        assert await second.last_event_id() == 2
        await second.trim_events(0, 0.0)
        assert ids(await second.append_events([ev()])) == [3]
    finally:
        await second.close()


async def test_sqlite_trims_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "_TRIM_CHUNK", 7)
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    try:
        await s.append_events([ev(ts=float(n)) for n in range(50)])
        await s.append_events([ev(app_id="a2", ts=1000.0) for _ in range(30)])
        assert await s.trim_events(10, 0.0) == 40 + 20
        assert ids(await s.read_events("a1", 0, 100)) == list(range(41, 51))
        assert await s.trim_events(100, 48.0) == 8
        assert ids(await s.read_events("a1", 0, 100)) == [49, 50]
    finally:
        await s.close()


async def test_sqlite_upgrades_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    older = len(MIGRATIONS) - 1  # the schema before the events table
    with sqlite3.connect(path, isolation_level=None) as conn:
        for number, sql in enumerate(MIGRATIONS[:older], start=1):
            conn.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;")
    conn.close()
    s = SqliteStore(path)
    await s.open()
    try:
        assert ids(await s.append_events([ev()])) == [1]
    finally:
        await s.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


def dl(
    app_id: str = "a1",
    device_id: str = "d1",
    body: bytes = b"b",
    at: float = 1.0,
    kind: str = "event",
) -> NewDelivery:
    """A new outbox row with filler fields."""
    return NewDelivery(app_id, device_id, kind, "name", body, at)


class TestOutbox:
    """The webhook outbox: per-device order, retries, dead letters, purge."""

    async def test_append_events_enqueues_in_the_same_batch(self, store: Store) -> None:
        stored = await store.append_events(
            [ev(data=b"1"), ev(data=b"2"), ev(data=b"3")], [dl(body=b"1"), None, dl(body=b"3")]
        )
        due = await store.due_deliveries(10.0, 10)
        assert [d.event_id for d in due] == [stored[0].id]  # one device: only its oldest row
        assert due[0].state == PENDING and due[0].attempts == 0 and due[0].body == b"1"
        await store.mark_delivered(due[0].id, 1, 200)
        due = await store.due_deliveries(10.0, 10)
        assert [(d.event_id, d.body) for d in due] == [(stored[2].id, b"3")]

    async def test_due_is_oldest_pending_per_device_and_time(self, store: Store) -> None:
        ids = await store.enqueue_deliveries(
            [dl(device_id="d1", at=1.0), dl(device_id="d2", at=5.0), dl(device_id="d1", at=0.5)]
        )
        assert ids == sorted(ids) and len(set(ids)) == 3
        assert [d.id for d in await store.due_deliveries(2.0, 10)] == [ids[0]]
        assert [d.id for d in await store.due_deliveries(5.0, 10)] == ids[:2]
        assert [d.id for d in await store.due_deliveries(5.0, 1)] == ids[:1]
        # A rescheduled head blocks its device (order), not the others.
        await store.reschedule_delivery(ids[0], 1, 100.0, 500, "HTTP 500")
        assert [d.id for d in await store.due_deliveries(50.0, 10)] == [ids[1]]
        (head,) = await store.due_deliveries(100.0, 1)
        assert (head.attempts, head.last_status, head.last_error) == (1, 500, "HTTP 500")

    async def test_dead_letters_and_retry(self, store: Store) -> None:
        ids = await store.enqueue_deliveries([dl(), dl(), dl(app_id="a2")])
        await store.mark_dead(ids[0], 3, None, "ClientConnectorError")
        # The dead row no longer blocks the device.
        assert [d.id for d in await store.due_deliveries(9.0, 10)] == [ids[1], ids[2]]
        (dead,) = await store.list_dead_deliveries("a1", 10)
        assert (dead.id, dead.state, dead.attempts, dead.last_status, dead.last_error) == (
            ids[0], DEAD, 3, None, "ClientConnectorError",
        )  # fmt: skip
        assert await store.list_dead_deliveries("a2", 10) == []
        assert await store.count_deliveries("a1") == {PENDING: 1, DELIVERED: 0, DEAD: 1}
        assert not await store.retry_dead_delivery("a2", ids[0], 5.0)  # another app's row
        assert not await store.retry_dead_delivery("a1", ids[1], 5.0)  # not dead
        assert await store.retry_dead_delivery("a1", ids[0], 5.0)
        (head, _) = await store.due_deliveries(9.0, 10)
        assert (head.id, head.state, head.attempts, head.next_attempt_at) == (
            ids[0], PENDING, 0, 5.0,
        )  # fmt: skip

    async def test_purge_and_delete_app(self, store: Store) -> None:
        ids = await store.enqueue_deliveries([dl(at=1.0), dl(at=2.0), dl(at=3.0, app_id="a2")])
        await store.mark_delivered(ids[0], 1, 204)
        await store.mark_delivered(ids[1], 1, 200)
        assert await store.purge_deliveries(1.5) == 1
        assert await store.count_deliveries("a1") == {PENDING: 0, DELIVERED: 1, DEAD: 0}
        await store.create_app(app("a2"))
        await store.delete_app("a2")
        assert await store.due_deliveries(9.0, 10) == []


async def test_sqlite_outbox_survives_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "db.sqlite")
    await first.open()
    await first.append_events([ev(), ev()], [dl(body=b"\x00\xff"), dl()])
    await first.close()
    second = SqliteStore(tmp_path / "db.sqlite")
    await second.open()
    try:
        (head,) = await second.due_deliveries(9.0, 10)
        assert (head.event_id, head.body, head.kind, head.event_name) == (
            1,
            b"\x00\xff",
            "event",
            "name",
        )
    finally:
        await second.close()


def msg(
    mid: str,
    *,
    app_id: str = "a1",
    device_id: str = "d1",
    key: str | None = None,
    state: str = QUEUED,
    expires_at: float | None = 100.0,
    body: bytes = b"body",
) -> Message:
    """A queued message with filler fields."""
    return Message(
        id=mid,
        app_id=app_id,
        device_id=device_id,
        mode="queue",
        method="m",
        body=body,
        body_hash=f"hash-{body!r}",
        idempotency_key=key,
        state=state,
        created_at=1.0,
        updated_at=1.0,
        expires_at=expires_at,
        timeout=5.0,
    )


class TestMessages:
    """The offline queue and idempotency records."""

    async def test_create_get_and_order(self, store: Store) -> None:
        a, created_a = await store.create_message(msg("m1", body=b"\x00\xff"))
        b, created_b = await store.create_message(msg("m2"))
        assert created_a and created_b and 0 < a.seq < b.seq
        got = await store.get_message("a1", "m1")
        assert got is not None and (got.body, got.state, got.seq) == (b"\x00\xff", QUEUED, a.seq)
        assert await store.get_message("a2", "m1") is None  # another app's id
        assert await store.get_message("a1", "nope") is None
        listed = await store.list_messages("a1", "d1", (QUEUED,), 10)
        assert [m.id for m in listed] == ["m1", "m2"]
        assert [m.id for m in await store.list_messages("a1", "d1", (), 1)] == ["m1"]
        assert await store.list_messages("a1", "d2", (), 10) == []
        await store.create_message(msg("m3", device_id="d2"))
        app_wide = await store.list_messages("a1", None, (QUEUED,), 10)
        assert [m.id for m in app_wide] == ["m1", "m2", "m3"]
        assert [m.id for m in await store.list_messages("a1", None, (), 10, b.seq)] == ["m3"]

    async def test_idempotency_key_returns_the_holder(self, store: Store) -> None:
        first, _ = await store.create_message(msg("m1", key="k"))
        holder, created = await store.create_message(msg("m2", key="k"))
        assert not created and holder.id == first.id
        assert await store.get_message("a1", "m2") is None
        other, created = await store.create_message(msg("m3", key="k", app_id="a2"))
        assert created and other.id == "m3"  # keys are per application
        found = await store.get_message_by_key("a1", "k")
        assert found is not None and found.id == "m1"
        assert await store.get_message_by_key("a1", "other") is None
        with pytest.raises(AlreadyExists):
            await store.create_message(msg("m1"))

    async def test_compare_and_set_transitions(self, store: Store) -> None:
        await store.create_message(msg("m1"))
        assert await store.update_message("a1", "m1", (QUEUED,), SENT, 2.0, attempt=True)
        assert not await store.update_message("a1", "m1", (QUEUED,), SENT, 3.0)
        assert not await store.update_message("a2", "m1", (SENT,), REPLIED, 3.0)
        assert await store.update_message("a1", "m1", (SENT,), REPLIED, 4.0, reply=b"\x01")
        got = await store.get_message("a1", "m1")
        assert got is not None
        assert (got.state, got.reply, got.attempts, got.updated_at) == (REPLIED, b"\x01", 1, 4.0)
        assert await store.queued_devices() == {}

    async def test_expire_queued_devices_and_interrupt(self, store: Store) -> None:
        await store.create_message(msg("m1", expires_at=5.0))
        await store.create_message(msg("m2", expires_at=5.0))
        await store.create_message(msg("m3", expires_at=50.0, device_id="d2"))
        await store.create_message(msg("m4", state=SENT, expires_at=None))
        assert await store.queued_devices() == {("a1", "d1"): 2, ("a1", "d2"): 1}
        assert sorted(await store.expire_messages(10.0)) == [("a1", "d1", "m1"), ("a1", "d1", "m2")]
        assert await store.queued_devices() == {("a1", "d2"): 1}
        expired = await store.get_message("a1", "m1")
        assert expired is not None and (expired.state, expired.error) == (EXPIRED, "expired")
        assert await store.interrupt_sent_messages(11.0, "restart") == [("a1", "d1", "m4", "queue")]
        m4 = await store.get_message("a1", "m4")
        assert m4 is not None and (m4.state, m4.error, m4.detail) == (
            DELIVERED, "interrupted", "restart",
        )  # fmt: skip

    async def test_purge_delete_and_delete_app(self, store: Store) -> None:
        await store.create_message(msg("m1", key="k1"))
        await store.create_message(msg("m2"))
        await store.update_message("a1", "m1", (QUEUED,), FAILED, 2.0, error="cancelled")
        assert await store.purge_messages(1.5) == 0
        assert await store.purge_messages(3.0) == 1  # only final messages go
        assert await store.get_message("a1", "m1") is None
        assert (await store.create_message(msg("m5", key="k1")))[1]  # the key is free again
        assert await store.delete_message("a1", "m2")
        assert not await store.delete_message("a1", "m2")
        await store.create_app(app("a1"))
        await store.delete_app("a1")
        assert await store.get_message("a1", "m5") is None


async def test_sqlite_messages_survive_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "db.sqlite")
    await first.open()
    await first.create_message(msg("m1", key="k"))
    await first.close()
    second = SqliteStore(tmp_path / "db.sqlite")
    await second.open()
    try:
        assert await second.queued_devices() == {("a1", "d1"): 1}
        holder, created = await second.create_message(msg("m2", key="k"))
        assert not created and holder.id == "m1"
    finally:
        await second.close()


async def test_lane_rows_and_bulk_delivered(store: Store) -> None:
    ids = await store.enqueue_deliveries(
        [dl(device_id="d1", at=5.0), dl(device_id="d2"), dl(device_id="d1"), dl(device_id="d1")]
    )
    lane = await store.lane_rows("a1", "d1", 0, 10)
    assert [d.id for d in lane] == [ids[0], ids[2], ids[3]]  # due or not, oldest first
    assert [d.id for d in await store.lane_rows("a1", "d1", ids[0], 1)] == [ids[2]]
    await store.mark_delivered_many([(ids[0], 1, 200), (ids[2], 3, 204)])
    assert [d.id for d in await store.lane_rows("a1", "d1", 0, 10)] == [ids[3]]
    assert await store.count_deliveries("a1") == {PENDING: 2, DELIVERED: 2, DEAD: 0}
    await store.mark_delivered_many([])
    assert await store.lane_rows("a2", "d2", 0, 10) == []


async def test_create_messages_in_one_go(store: Store) -> None:
    await store.create_message(msg("m0"))
    made = await store.create_messages([msg("m1", device_id="d1"), msg("m2", device_id="d2")])
    assert [m.id for m in made] == ["m1", "m2"]
    assert made[0].seq < made[1].seq and all(m.seq > 0 for m in made)
    assert await store.queued_devices() == {("a1", "d1"): 2, ("a1", "d2"): 1}
    assert await store.create_messages([]) == []
    with pytest.raises(ValueError):
        await store.create_messages([msg("m3", key="k")])
    with pytest.raises(AlreadyExists):
        await store.create_messages([msg("m1")])
