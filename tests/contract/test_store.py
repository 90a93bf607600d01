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

from backchannel.state.memory import MemoryStore
from backchannel.state.sqlite import MIGRATIONS, SqliteStore
from backchannel.state.store import (
    AlreadyExists,
    AppRecord,
    DeviceCredential,
    Store,
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
    assert {"apps", "device_credentials", "settings", "tunnel_tokens", "tunnel_names"} <= tables


async def test_sqlite_work_runs_on_worker_thread(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    try:
        await s.set_setting("k", "v")
        names = {t.name for t in threading.enumerate()}
        assert any(n.startswith("backchannel-sqlite") for n in names)
    finally:
        await s.close()
