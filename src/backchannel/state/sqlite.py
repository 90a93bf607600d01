"""A store in one SQLite file, driven from a single worker thread off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson

from backchannel.state.store import (
    DEAD,
    DELIVERED,
    EXPIRED,
    MESSAGE_FINAL,
    PENDING,
    QUEUED,
    SENT,
    AlreadyExists,
    AppRecord,
    Delivery,
    DeviceCredential,
    Message,
    NewDelivery,
    NewEvent,
    StoredEvent,
    StoreError,
    TunnelName,
    TunnelToken,
)

T = TypeVar("T")

# Applied in order; the database's PRAGMA user_version is the count already applied.
# Append new entries, never edit old ones.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE apps (
        app_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        webhook_url TEXT,
        default_timeout REAL,
        allow_open_attach INTEGER NOT NULL,
        allowed_devices TEXT NOT NULL
    );
    CREATE INDEX apps_by_creation ON apps (created_at, app_id);
    CREATE TABLE device_credentials (
        app_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        tags TEXT NOT NULL,
        PRIMARY KEY (app_id, device_id)
    );
    CREATE INDEX device_credentials_by_creation
        ON device_credentials (app_id, created_at, device_id);
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE tunnel_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX tunnel_tokens_by_expiry ON tunnel_tokens (expires_at);
    """,
    """
    CREATE TABLE tunnel_names (
        name TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE INDEX tunnel_names_by_app ON tunnel_names (app_id);
    """,
    # AUTOINCREMENT: an id is never reused, even once the newest events are trimmed, so a
    # client resuming after it can never be handed a different event under the same id.
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        type TEXT NOT NULL,
        data BLOB NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX events_by_app ON events (app_id, id);
    CREATE INDEX events_by_ts ON events (ts);
    """,
    # The webhook outbox: a row per delivery, kept (as delivered) until purged.
    """
    ALTER TABLE apps ADD COLUMN webhook_kinds TEXT NOT NULL DEFAULT '["event"]';
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        event_id INTEGER,
        event_name TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        last_status INTEGER,
        last_error TEXT
    );
    CREATE INDEX webhook_outbox_lanes ON webhook_outbox (state, app_id, device_id, id);
    CREATE INDEX webhook_outbox_by_app ON webhook_outbox (app_id, state, id);
    """,
    # Messages: the offline queue and idempotent calls. ``seq`` orders a device's queue.
    """
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        app_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        mode TEXT NOT NULL,
        method TEXT NOT NULL,
        body BLOB NOT NULL,
        body_hash TEXT NOT NULL,
        idempotency_key TEXT,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        timeout REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        reply BLOB,
        error TEXT,
        detail TEXT
    );
    CREATE UNIQUE INDEX messages_by_key ON messages (app_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX messages_lanes ON messages (state, app_id, device_id, seq);
    CREATE INDEX messages_by_device ON messages (app_id, device_id, seq);
    CREATE INDEX messages_by_expiry ON messages (state, expires_at);
    CREATE INDEX messages_by_update ON messages (state, updated_at);
    """,
    # Every message of an application in order (GET .../messages).
    """
    CREATE INDEX messages_by_app ON messages (app_id, seq);
    """,
)

_MESSAGE_ROWS = 500  # rows per multi-row INSERT of messages
_INSERT_MESSAGES = (
    "INSERT INTO messages (id, app_id, device_id, mode, method, body, body_hash, "
    "idempotency_key, state, created_at, updated_at, expires_at, timeout, attempts, reply, "
    "error, detail) VALUES "
)
_MESSAGE_COLUMNS = (
    "id, app_id, device_id, mode, method, body, body_hash, idempotency_key, state, "
    "created_at, updated_at, expires_at, timeout, attempts, reply, error, detail, seq"
)

_INSERT_EVENTS = "INSERT INTO events (app_id, device_id, type, data, ts) VALUES "
_ROW = "(?, ?, ?, ?, ?)"
_MAX_ROWS = 2000  # rows per INSERT statement (and below SQLite's bound-parameter limit)
# Deletes run in chunks of this many rows, each its own job on the worker thread, so
# appends interleave with a long trim instead of waiting behind it.
_TRIM_CHUNK = 5000
# Every app id in the events table, by hopping along the (app_id, id) index ("skip scan"),
# in about one index lookup per application rather than a scan of every event.
_EVENT_APPS = """
    WITH RECURSIVE a(app_id) AS (
        SELECT MIN(app_id) FROM events
        UNION ALL
        SELECT (SELECT MIN(app_id) FROM events WHERE app_id > a.app_id) FROM a
        WHERE a.app_id IS NOT NULL
    )
    SELECT app_id FROM a WHERE app_id IS NOT NULL
"""

_APP_COLUMNS = (
    "app_id, name, secret_hash, created_at, webhook_url, default_timeout, "
    "allow_open_attach, allowed_devices, webhook_kinds"
)
_INSERT_OUTBOX = (
    "INSERT INTO webhook_outbox (app_id, device_id, kind, event_id, event_name, body, "
    "created_at, next_attempt_at) VALUES "
)
_OUTBOX_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
_OUTBOX_COLUMNS = (
    "id, app_id, device_id, kind, event_id, event_name, body, created_at, attempts, "
    "next_attempt_at, state, last_status, last_error"
)
# Each (app, device)'s oldest pending row (the index gives MIN(id) per group), if due.
_DUE = f"""
    SELECT {", ".join("o." + c.strip() for c in _OUTBOX_COLUMNS.split(","))}
    FROM (
        SELECT MIN(id) AS id FROM webhook_outbox WHERE state = 'pending'
        GROUP BY app_id, device_id
    ) AS heads JOIN webhook_outbox AS o ON o.id = heads.id
    WHERE o.next_attempt_at <= ? ORDER BY o.id LIMIT ?
"""
_CRED_COLUMNS = "app_id, device_id, key_hash, created_at, tags"
_NAME_COLUMNS = "name, app_id, device_id, token_hash, created_at"


def _name_from_row(row: tuple[Any, ...] | None) -> TunnelName | None:
    if row is None:
        return None
    return TunnelName(str(row[0]), str(row[1]), str(row[2]), str(row[3]), float(row[4]))


def _dump_tuple(values: tuple[str, ...]) -> str:
    return orjson.dumps(list(values)).decode()


def _load_tuple(text: str) -> tuple[str, ...]:
    return tuple(orjson.loads(text))


def _app_params(app: AppRecord) -> tuple[Any, ...]:
    return (
        app.app_id,
        app.name,
        app.secret_hash,
        app.created_at,
        app.webhook_url,
        app.default_timeout,
        int(app.allow_open_attach),
        _dump_tuple(app.allowed_devices),
        _dump_tuple(app.webhook_kinds),
    )


def _app_from_row(row: tuple[Any, ...]) -> AppRecord:
    return AppRecord(
        app_id=row[0],
        name=row[1],
        secret_hash=row[2],
        created_at=row[3],
        webhook_url=row[4],
        default_timeout=row[5],
        allow_open_attach=bool(row[6]),
        allowed_devices=_load_tuple(row[7]),
        webhook_kinds=_load_tuple(row[8]),
    )


def _delivery_from_row(r: tuple[Any, ...]) -> Delivery:
    return Delivery(
        int(r[0]), str(r[1]), str(r[2]), str(r[3]), None if r[4] is None else int(r[4]),
        str(r[5]), bytes(r[6]), float(r[7]), int(r[8]), float(r[9]), str(r[10]),
        None if r[11] is None else int(r[11]), r[12],
    )  # fmt: skip


def _insert_outbox(conn: sqlite3.Connection, rows: Sequence[NewDelivery]) -> list[int]:
    """Insert rows (inside the caller's transaction) with multi-row INSERTs; their ids."""
    per = max(1, min(_MAX_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 8))
    ids: list[int] = []
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        params: list[Any] = []
        for r in chunk:
            params += (
                r.app_id, r.device_id, r.kind, r.event_id, r.event_name, r.body,
                r.created_at, r.created_at,
            )  # fmt: skip
        conn.execute(_INSERT_OUTBOX + ", ".join([_OUTBOX_ROW] * len(chunk)), params)
        last: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        ids += range(last - len(chunk) + 1, last + 1)
    return ids


def _message_from_row(r: tuple[Any, ...]) -> Message:
    return Message(
        id=r[0],
        app_id=r[1],
        device_id=r[2],
        mode=r[3],
        method=r[4],
        body=bytes(r[5]),
        body_hash=r[6],
        idempotency_key=r[7],
        state=r[8],
        created_at=r[9],
        updated_at=r[10],
        expires_at=r[11],
        timeout=r[12],
        attempts=r[13],
        reply=None if r[14] is None else bytes(r[14]),
        error=r[15],
        detail=r[16],
        seq=r[17],
    )


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _cred_from_row(row: tuple[Any, ...]) -> DeviceCredential:
    return DeviceCredential(
        app_id=row[0],
        device_id=row[1],
        key_hash=row[2],
        created_at=row[3],
        tags=_load_tuple(row[4]),
    )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # The connection is in autocommit mode, so multi-statement work opens its own transaction.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate(conn: sqlite3.Connection) -> None:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(f"database schema version {version} is newer than this backchannel")
    for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        # One script per migration so the DDL and the version bump commit together.
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


class SqliteStore:
    """A :class:`~backchannel.state.store.Store` in a SQLite file in WAL mode."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        # Created, used and closed only on the executor's single thread.
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def open(self) -> None:
        """Create the file and its directory if needed, and bring the schema up to date."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backchannel-sqlite")
        self._executor = executor
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            self._executor = None
            executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Close the connection and stop the worker thread; idempotent."""
        executor = self._executor
        if executor is None:
            return
        # Detach first so later calls fail fast; work queued earlier still runs before the close.
        self._executor = None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        finally:
            executor.shutdown(wait=False)

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise StoreError("the store is not open")

        def call() -> T:
            conn = self._conn
            if conn is None:
                raise StoreError("the store is not open")
            return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def create_app(self, app: AppRecord) -> None:
        """Insert a new application."""

        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO apps ({_APP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _app_params(app),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"app {app.app_id!r} exists") from exc

        await self._run(run)

    async def get_app(self, app_id: str) -> AppRecord | None:
        """Return one application or None."""

        def run(conn: sqlite3.Connection) -> AppRecord | None:
            row = conn.execute(
                f"SELECT {_APP_COLUMNS} FROM apps WHERE app_id = ?", (app_id,)
            ).fetchone()
            return None if row is None else _app_from_row(row)

        return await self._run(run)

    async def list_apps(self) -> list[AppRecord]:
        """Return all applications, oldest first."""

        def run(conn: sqlite3.Connection) -> list[AppRecord]:
            rows = conn.execute(f"SELECT {_APP_COLUMNS} FROM apps ORDER BY created_at, app_id")
            return [_app_from_row(row) for row in rows]

        return await self._run(run)

    async def update_app(self, app: AppRecord) -> bool:
        """Replace the record with the same ``app_id``; False when there is none."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE apps SET name = ?, secret_hash = ?, created_at = ?, webhook_url = ?, "
                "default_timeout = ?, allow_open_attach = ?, allowed_devices = ?, "
                "webhook_kinds = ? WHERE app_id = ?",
                (*_app_params(app)[1:], app.app_id),
            )
            return cur.rowcount > 0

        return await self._run(run)

    async def delete_app(self, app_id: str) -> bool:
        """Delete an application and its credentials; False when there was none."""

        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM device_credentials WHERE app_id = ?", (app_id,))
                conn.execute("DELETE FROM tunnel_names WHERE app_id = ?", (app_id,))
                conn.execute("DELETE FROM events WHERE app_id = ?", (app_id,))
                conn.execute("DELETE FROM webhook_outbox WHERE app_id = ?", (app_id,))
                conn.execute("DELETE FROM messages WHERE app_id = ?", (app_id,))
                return conn.execute("DELETE FROM apps WHERE app_id = ?", (app_id,)).rowcount > 0

        return await self._run(run)

    async def put_device_credential(self, cred: DeviceCredential) -> None:
        """Insert or replace a device credential."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT OR REPLACE INTO device_credentials ({_CRED_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    cred.app_id,
                    cred.device_id,
                    cred.key_hash,
                    cred.created_at,
                    _dump_tuple(cred.tags),
                ),
            )

        await self._run(run)

    async def get_device_credential(self, app_id: str, device_id: str) -> DeviceCredential | None:
        """Return one device credential or None."""

        def run(conn: sqlite3.Connection) -> DeviceCredential | None:
            row = conn.execute(
                f"SELECT {_CRED_COLUMNS} FROM device_credentials "
                "WHERE app_id = ? AND device_id = ?",
                (app_id, device_id),
            ).fetchone()
            return None if row is None else _cred_from_row(row)

        return await self._run(run)

    async def list_device_credentials(self, app_id: str) -> list[DeviceCredential]:
        """Return the credentials of one application, oldest first."""

        def run(conn: sqlite3.Connection) -> list[DeviceCredential]:
            rows = conn.execute(
                f"SELECT {_CRED_COLUMNS} FROM device_credentials WHERE app_id = ? "
                "ORDER BY created_at, device_id",
                (app_id,),
            )
            return [_cred_from_row(row) for row in rows]

        return await self._run(run)

    async def delete_device_credential(self, app_id: str, device_id: str) -> bool:
        """Delete one credential; False when there was none."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM device_credentials WHERE app_id = ? AND device_id = ?",
                (app_id, device_id),
            )
            return cur.rowcount > 0

        return await self._run(run)

    async def get_setting(self, name: str) -> str | None:
        """Return a server setting or None."""

        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
            return None if row is None else str(row[0])

        return await self._run(run)

    async def set_setting(self, name: str, value: str) -> None:
        """Store a server setting."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

        await self._run(run)

    async def create_tunnel_token(self, token: TunnelToken) -> None:
        """Insert a new tunnel token."""

        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO tunnel_tokens (token_hash, created_at, expires_at) "
                    "VALUES (?, ?, ?)",
                    (token.token_hash, token.created_at, token.expires_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists("tunnel token exists") from None

        await self._run(run)

    async def get_tunnel_token(self, token_hash: str) -> TunnelToken | None:
        """Return one tunnel token (expired or not) or None."""

        def run(conn: sqlite3.Connection) -> TunnelToken | None:
            row = conn.execute(
                "SELECT token_hash, created_at, expires_at FROM tunnel_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return None if row is None else TunnelToken(str(row[0]), row[1], row[2])

        return await self._run(run)

    async def extend_tunnel_token(self, token_hash: str, expires_at: float) -> bool:
        """Set a token's expiry; False when there is no such token."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tunnel_tokens SET expires_at = ? WHERE token_hash = ?",
                (expires_at, token_hash),
            )
            return cur.rowcount > 0

        return await self._run(run)

    async def delete_tunnel_token(self, token_hash: str) -> bool:
        """Delete one token; False when there was none."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM tunnel_tokens WHERE token_hash = ?", (token_hash,))
            return cur.rowcount > 0

        return await self._run(run)

    async def delete_expired_tunnel_tokens(self, now: float) -> int:
        """Delete every token with ``expires_at <= now``; return how many went."""

        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM tunnel_tokens WHERE expires_at <= ?", (now,))
            return cur.rowcount

        return await self._run(run)

    async def claim_tunnel_name(self, record: TunnelName) -> TunnelName:
        """Reserve ``record.name`` unless taken; return whichever record holds it now."""

        def run(conn: sqlite3.Connection) -> TunnelName:
            conn.execute(
                f"INSERT INTO tunnel_names ({_NAME_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (
                    record.name,
                    record.app_id,
                    record.device_id,
                    record.token_hash,
                    record.created_at,
                ),
            )
            row = conn.execute(
                f"SELECT {_NAME_COLUMNS} FROM tunnel_names WHERE name = ?", (record.name,)
            ).fetchone()
            held = _name_from_row(row)
            assert held is not None
            return held

        return await self._run(run)

    async def get_tunnel_name(self, name: str) -> TunnelName | None:
        """Return one reserved name or None."""

        def run(conn: sqlite3.Connection) -> TunnelName | None:
            row = conn.execute(
                f"SELECT {_NAME_COLUMNS} FROM tunnel_names WHERE name = ?", (name,)
            ).fetchone()
            return _name_from_row(row)

        return await self._run(run)

    async def get_tunnel_name_by_token(self, token_hash: str) -> TunnelName | None:
        """Return the reserved name whose token has this hash, or None."""

        def run(conn: sqlite3.Connection) -> TunnelName | None:
            row = conn.execute(
                f"SELECT {_NAME_COLUMNS} FROM tunnel_names WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return _name_from_row(row)

        return await self._run(run)

    async def delete_tunnel_name(self, name: str) -> bool:
        """Release a name; False when it was not reserved."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM tunnel_names WHERE name = ?", (name,))
            return cur.rowcount > 0

        return await self._run(run)

    async def append_events(
        self, events: list[NewEvent], outbox: Sequence[NewDelivery | None] | None = None
    ) -> list[StoredEvent]:
        """Append a batch (and its outbox rows) in one transaction; return it with its ids."""
        if not events:
            return []

        def run(conn: sqlite3.Connection) -> int:
            # Multi-row INSERTs rather than executemany(): the sqlite3 module lets go of the
            # GIL around every statement step, and with executemany() that is once per row.
            # While the event loop keeps the GIL busy, each row then waits for it (the
            # "convoy effect": measured 75 s instead of 0.1 s for 20,000 rows).
            per = max(1, min(_MAX_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 5))
            with _transaction(conn):
                for start in range(0, len(events), per):
                    chunk = events[start : start + per]
                    params: list[Any] = []
                    for e in chunk:
                        params += (e.app_id, e.device_id, e.type, e.data, e.ts)
                    conn.execute(_INSERT_EVENTS + ", ".join([_ROW] * len(chunk)), params)
                last: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                if outbox:
                    first = last - len(events) + 1
                    _insert_outbox(
                        conn,
                        [
                            dataclasses.replace(row, event_id=first + n)
                            for n, row in enumerate(outbox)
                            if row is not None
                        ],
                    )
            return last

        last = await self._run(run)
        # The transaction held the write lock, so AUTOINCREMENT gave the batch consecutive
        # ids (each is one above the highest ever given) ending at the last insert's.
        first = last - len(events) + 1
        return [
            StoredEvent(first + n, e.app_id, e.device_id, e.type, e.data, e.ts)
            for n, e in enumerate(events)
        ]

    async def read_events(
        self,
        app_id: str,
        after_id: int,
        limit: int,
        devices: Collection[str] | None = None,
        types: Collection[str] | None = None,
    ) -> list[StoredEvent]:
        """Up to ``limit`` events of the app after ``after_id``, oldest first, filtered."""
        sql = "SELECT id, app_id, device_id, type, data, ts FROM events WHERE app_id = ? AND id > ?"
        params: list[Any] = [app_id, after_id]
        for column, values in (("device_id", devices), ("type", types)):
            if values is not None:
                values = list(values)
                sql += f" AND {column} IN ({', '.join('?' * len(values))})"
                params += values
        sql += " ORDER BY id LIMIT ?"
        params.append(max(limit, 0))

        def run(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [
                StoredEvent(int(r[0]), r[1], r[2], r[3], bytes(r[4]), float(r[5]))
                for r in conn.execute(sql, params)
            ]

        return await self._run(run)

    async def last_event_id(self) -> int:
        """The highest event id ever given (0 when none was)."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            return 0 if row is None else int(row[0])

        return await self._run(run)

    async def trim_events(
        self, max_per_app: int, older_than: float, app_ids: Collection[str] | None = None
    ) -> int:
        """Delete events older than ``older_than`` and each app's oldest beyond the count."""

        def apps(conn: sqlite3.Connection) -> list[str]:
            return [str(r[0]) for r in conn.execute(_EVENT_APPS)]

        def cutoff(conn: sqlite3.Connection, app_id: str) -> int | None:
            # The newest id that falls outside the app's ``max_per_app`` newest events.
            row = conn.execute(
                "SELECT id FROM events WHERE app_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (app_id, max_per_app),
            ).fetchone()
            return None if row is None else int(row[0])

        deleted = 0
        for app_id in await self._run(apps) if app_ids is None else sorted(app_ids):
            last = await self._run(functools.partial(cutoff, app_id=app_id))
            if last is not None:
                deleted += await self._delete_chunks(
                    "SELECT id FROM events WHERE app_id = ? AND id <= ?", (app_id, last)
                )
        deleted += await self._delete_chunks("SELECT id FROM events WHERE ts < ?", (older_than,))
        return deleted

    async def _delete_chunks(self, select: str, params: tuple[Any, ...]) -> int:
        """Delete the rows ``select`` names, ``_TRIM_CHUNK`` at a time; return how many."""
        sql = f"DELETE FROM events WHERE id IN ({select} LIMIT {_TRIM_CHUNK})"

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        total = 0
        while True:
            count = await self._run(run)
            total += count
            if count < _TRIM_CHUNK:
                return total

    # -- webhook outbox ------------------------------------------------------------------

    async def enqueue_deliveries(self, rows: list[NewDelivery]) -> list[int]:
        """Add pending rows in one transaction; return their ids."""
        if not rows:
            return []

        def run(conn: sqlite3.Connection) -> list[int]:
            with _transaction(conn):
                return _insert_outbox(conn, rows)

        return await self._run(run)

    async def lane_rows(
        self, app_id: str, device_id: str, after_id: int, limit: int
    ) -> list[Delivery]:
        """The device's pending rows with an id above ``after_id``, oldest first, due or not."""

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            # A range of the (state, app_id, device_id, id) index, whatever the backlog.
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM webhook_outbox "
                "WHERE state = ? AND app_id = ? AND device_id = ? AND id > ? ORDER BY id LIMIT ?",
                (PENDING, app_id, device_id, after_id, max(limit, 0)),
            )
            return [_delivery_from_row(r) for r in rows]

        return await self._run(run)

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Each (app, device)'s oldest pending row whose time has come, oldest first."""

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            return [_delivery_from_row(r) for r in conn.execute(_DUE, (now, max(limit, 0)))]

        return await self._run(run)

    async def _exec(self, sql: str, params: tuple[Any, ...]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._run(run)

    async def mark_delivered(self, delivery_id: int, attempts: int, status: int) -> None:
        """Record a delivery the receiver took."""
        await self._exec(
            "UPDATE webhook_outbox SET state = ?, attempts = ?, last_status = ? WHERE id = ?",
            (DELIVERED, attempts, status, delivery_id),
        )

    async def mark_delivered_many(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Record many deliveries at once: (id, attempts, status) each; one transaction."""
        if not rows:
            return
        # Grouped by (attempts, status), which nearly always share one value: one UPDATE per
        # group and chunk (never executemany, which steps the GIL per row under a busy loop).
        groups: dict[tuple[int, int], list[int]] = {}
        for rid, attempts, status in rows:
            groups.setdefault((attempts, status), []).append(rid)

        def run(conn: sqlite3.Connection) -> None:
            # One commit for the lot: a commit per row is what made deliveries expensive.
            with _transaction(conn):
                for (attempts, status), ids in groups.items():
                    for at in range(0, len(ids), _MAX_ROWS):
                        chunk = ids[at : at + _MAX_ROWS]
                        conn.execute(
                            "UPDATE webhook_outbox SET state = ?, attempts = ?, last_status = ? "
                            f"WHERE id IN ({_placeholders(len(chunk))})",
                            (DELIVERED, attempts, status, *chunk),
                        )

        await self._run(run)

    async def reschedule_delivery(
        self,
        delivery_id: int,
        attempts: int,
        next_attempt_at: float,
        status: int | None,
        error: str,
    ) -> None:
        """Record a failed attempt; the row stays pending."""
        await self._exec(
            "UPDATE webhook_outbox SET attempts = ?, next_attempt_at = ?, last_status = ?, "
            "last_error = ? WHERE id = ?",
            (attempts, next_attempt_at, status, error, delivery_id),
        )

    async def mark_dead(
        self, delivery_id: int, attempts: int, status: int | None, error: str
    ) -> None:
        """Give a row up."""
        await self._exec(
            "UPDATE webhook_outbox SET state = ?, attempts = ?, last_status = ?, last_error = ? "
            "WHERE id = ?",
            (DEAD, attempts, status, error, delivery_id),
        )

    async def list_dead_deliveries(self, app_id: str, limit: int) -> list[Delivery]:
        """The app's dead rows, oldest first."""

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM webhook_outbox WHERE app_id = ? AND state = ? "
                "ORDER BY id LIMIT ?",
                (app_id, DEAD, max(limit, 0)),
            )
            return [_delivery_from_row(r) for r in rows]

        return await self._run(run)

    async def retry_dead_delivery(self, app_id: str, delivery_id: int, now: float) -> bool:
        """Make a dead row pending again."""
        changed = await self._exec(
            "UPDATE webhook_outbox SET state = ?, attempts = 0, next_attempt_at = ? "
            "WHERE id = ? AND app_id = ? AND state = ?",
            (PENDING, now, delivery_id, app_id, DEAD),
        )
        return changed > 0

    async def count_deliveries(self, app_id: str) -> dict[str, int]:
        """Rows of the app per state."""

        def run(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {PENDING: 0, DELIVERED: 0, DEAD: 0}
            rows = conn.execute(
                "SELECT state, COUNT(*) FROM webhook_outbox WHERE app_id = ? GROUP BY state",
                (app_id,),
            )
            for state, n in rows:
                counts[str(state)] = int(n)
            return counts

        return await self._run(run)

    async def purge_deliveries(self, older_than: float) -> int:
        """Delete delivered rows created before ``older_than``."""
        return await self._exec(
            "DELETE FROM webhook_outbox WHERE state = ? AND created_at < ?",
            (DELIVERED, older_than),
        )

    # -- messages ---------------------------------------------------------------------------

    async def create_message(self, message: Message) -> tuple[Message, bool]:
        """Insert a message; on a taken idempotency key return (holder, False) instead."""
        m = message

        def run(conn: sqlite3.Connection) -> tuple[Message, bool]:
            with _transaction(conn):
                if m.idempotency_key is not None:
                    row = conn.execute(
                        f"SELECT {_MESSAGE_COLUMNS} FROM messages "
                        "WHERE app_id = ? AND idempotency_key = ?",
                        (m.app_id, m.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        return _message_from_row(row), False
                cur = conn.execute(
                    "INSERT INTO messages (id, app_id, device_id, mode, method, body, body_hash, "
                    "idempotency_key, state, created_at, updated_at, expires_at, timeout, "
                    "attempts, reply, error, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        m.id,
                        m.app_id,
                        m.device_id,
                        m.mode,
                        m.method,
                        m.body,
                        m.body_hash,
                        m.idempotency_key,
                        m.state,
                        m.created_at,
                        m.updated_at,
                        m.expires_at,
                        m.timeout,
                        m.attempts,
                        m.reply,
                        m.error,
                        m.detail,
                    ),
                )
                return dataclasses.replace(m, seq=int(cur.lastrowid or 0)), True

        try:
            return await self._run(run)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"message {m.id!r} exists") from exc

    async def create_messages(self, messages: Sequence[Message]) -> list[Message]:
        """Insert many messages without idempotency keys in one transaction; give each a seq."""
        if any(m.idempotency_key is not None for m in messages):
            raise ValueError("create_messages takes no idempotency keys")
        if not messages:
            return []
        rows = [
            (
                m.id, m.app_id, m.device_id, m.mode, m.method, m.body, m.body_hash, None,
                m.state, m.created_at, m.updated_at, m.expires_at, m.timeout, m.attempts,
                m.reply, m.error, m.detail,
            )
            for m in messages
        ]  # fmt: skip

        def run(conn: sqlite3.Connection) -> dict[str, int]:
            seqs: dict[str, int] = {}
            with _transaction(conn):
                # Multi-row INSERTs (see _insert_outbox), 17 parameters a row, far below
                # SQLite's bound-parameter limit; RETURNING gives each row's seq.
                for at in range(0, len(rows), _MESSAGE_ROWS):
                    chunk = rows[at : at + _MESSAGE_ROWS]
                    values = ", ".join(["(" + _placeholders(17) + ")"] * len(chunk))
                    cur = conn.execute(
                        _INSERT_MESSAGES + values + " RETURNING id, seq",
                        [v for row in chunk for v in row],
                    )
                    seqs.update((str(i), int(q)) for i, q in cur.fetchall())
            return seqs

        try:
            seqs = await self._run(run)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists("a message id exists") from exc
        return [dataclasses.replace(m, seq=seqs[m.id]) for m in messages]

    async def get_message(self, app_id: str, message_id: str) -> Message | None:
        """One message of the app, or None."""

        def run(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND app_id = ?",
                (message_id, app_id),
            ).fetchone()
            return None if row is None else _message_from_row(row)

        return await self._run(run)

    async def list_messages(
        self,
        app_id: str,
        device_id: str | None,
        states: Collection[str],
        limit: int,
        after_seq: int = 0,
    ) -> list[Message]:
        """Messages of a device (None: every device of the app), oldest first."""
        wanted = tuple(states)

        def run(conn: sqlite3.Connection) -> list[Message]:
            where = "app_id = ? AND seq > ?"
            params: tuple[Any, ...] = (app_id, after_seq)
            if device_id is not None:
                where += " AND device_id = ?"
                params += (device_id,)
            if wanted:
                where += f" AND state IN ({_placeholders(len(wanted))})"
                params += wanted
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY seq LIMIT ?",
                (*params, max(limit, 0)),
            )
            return [_message_from_row(r) for r in rows]

        return await self._run(run)

    async def update_message(
        self,
        app_id: str,
        message_id: str,
        from_states: Collection[str],
        state: str,
        now: float,
        *,
        reply: bytes | None = None,
        error: str | None = None,
        detail: str | None = None,
        attempt: bool = False,
    ) -> bool:
        """Move a message to ``state`` if it is in one of ``from_states``; count an attempt."""
        froms = tuple(from_states)
        return (
            await self._exec(
                "UPDATE messages SET state = ?, updated_at = ?, reply = ?, error = ?, detail = ?, "
                "attempts = attempts + ? "
                f"WHERE id = ? AND app_id = ? AND state IN ({_placeholders(len(froms))})",
                (state, now, reply, error, detail, int(attempt), message_id, app_id, *froms),
            )
            > 0
        )

    async def delete_message(self, app_id: str, message_id: str) -> bool:
        """Forget a message."""
        return (
            await self._exec(
                "DELETE FROM messages WHERE id = ? AND app_id = ?", (message_id, app_id)
            )
            > 0
        )

    async def expire_messages(self, now: float) -> list[tuple[str, str, str]]:
        """Mark queued messages whose TTL passed as expired; return their (app, device, id)."""

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
            with _transaction(conn):
                rows = conn.execute(
                    "SELECT app_id, device_id, id FROM messages "
                    "WHERE state = ? AND expires_at <= ?",
                    (QUEUED, now),
                ).fetchall()
                if rows:
                    conn.execute(
                        "UPDATE messages SET state = ?, updated_at = ?, error = 'expired', "
                        "detail = 'the message expired before the device took it' "
                        "WHERE state = ? AND expires_at <= ?",
                        (EXPIRED, now, QUEUED, now),
                    )
                return [(str(a), str(d), str(i)) for a, d, i in rows]

        return await self._run(run)

    async def get_message_by_key(self, app_id: str, key: str) -> Message | None:
        """The app's message holding an idempotency key, or None."""

        def run(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE app_id = ? AND idempotency_key = ?",
                (app_id, key),
            ).fetchone()
            return None if row is None else _message_from_row(row)

        return await self._run(run)

    async def queued_devices(self) -> dict[tuple[str, str], int]:
        """How many messages are queued per (app, device) that has any."""

        def run(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = conn.execute(
                "SELECT app_id, device_id, COUNT(*) FROM messages WHERE state = ? "
                "GROUP BY app_id, device_id",
                (QUEUED,),
            )
            return {(str(a), str(d)): int(n) for a, d, n in rows}

        return await self._run(run)

    async def interrupt_sent_messages(
        self, now: float, detail: str
    ) -> list[tuple[str, str, str, str]]:
        """After a restart: ``sent`` messages become ``delivered`` with error ``interrupted``."""

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
            with _transaction(conn):
                rows = conn.execute(
                    "SELECT app_id, device_id, id, mode FROM messages WHERE state = ?", (SENT,)
                ).fetchall()
                if rows:
                    conn.execute(
                        "UPDATE messages SET state = ?, updated_at = ?, error = 'interrupted', "
                        "detail = ? WHERE state = ?",
                        (DELIVERED, now, detail, SENT),
                    )
                return [(str(a), str(d), str(i), str(m)) for a, d, i, m in rows]

        return await self._run(run)

    async def purge_messages(self, older_than: float) -> int:
        """Delete final messages last changed before ``older_than``; return how many."""
        return await self._exec(
            f"DELETE FROM messages WHERE state IN ({_placeholders(len(MESSAGE_FINAL))}) "
            "AND updated_at < ?",
            (*MESSAGE_FINAL, older_than),
        )
