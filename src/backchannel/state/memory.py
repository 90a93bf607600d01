"""An in-process store on plain dicts; nothing survives the process."""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections.abc import Collection, Sequence

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
    TunnelName,
    TunnelToken,
)


def _event_id(event: StoredEvent) -> int:
    return event.id


class MemoryStore:
    """A :class:`~backchannel.state.store.Store` kept in dicts, for tests and single runs."""

    def __init__(self) -> None:
        self._apps: dict[str, AppRecord] = {}
        self._creds: dict[tuple[str, str], DeviceCredential] = {}
        self._settings: dict[str, str] = {}
        self._tokens: dict[str, TunnelToken] = {}
        self._names: dict[str, TunnelName] = {}
        # Per application, oldest first: ids increase, so a bisect finds ``after_id``.
        self._events: dict[str, list[StoredEvent]] = {}
        self._event_seq = 0
        # The webhook outbox by id (dicts keep insertion order, which is id order).
        self._outbox: dict[int, Delivery] = {}
        self._outbox_seq = 0
        # Messages by id, in creation order; idempotency keys per (app, key).
        self._messages: dict[str, Message] = {}
        self._message_keys: dict[tuple[str, str], str] = {}
        self._message_seq = 0

    async def open(self) -> None:
        """Do nothing: there is nothing to connect to."""

    async def close(self) -> None:
        """Do nothing; the data stays until the object is dropped."""

    async def create_app(self, app: AppRecord) -> None:
        """Insert a new application."""
        if app.app_id in self._apps:
            raise AlreadyExists(f"app {app.app_id!r} exists")
        self._apps[app.app_id] = app

    async def get_app(self, app_id: str) -> AppRecord | None:
        """Return one application or None."""
        return self._apps.get(app_id)

    async def list_apps(self) -> list[AppRecord]:
        """Return all applications, oldest first."""
        return sorted(self._apps.values(), key=lambda a: (a.created_at, a.app_id))

    async def update_app(self, app: AppRecord) -> bool:
        """Replace the record with the same ``app_id``; False when there is none."""
        if app.app_id not in self._apps:
            return False
        self._apps[app.app_id] = app
        return True

    async def delete_app(self, app_id: str) -> bool:
        """Delete an application and its credentials; False when there was none."""
        # Credentials go even when the app is missing, so orphans never outlive a delete.
        for key in [k for k in self._creds if k[0] == app_id]:
            del self._creds[key]
        for name in [n for n, r in self._names.items() if r.app_id == app_id]:
            del self._names[name]
        self._events.pop(app_id, None)
        for rid in [k for k, d in self._outbox.items() if d.app_id == app_id]:
            del self._outbox[rid]
        for mid in [k for k, m in self._messages.items() if m.app_id == app_id]:
            self._forget_message(mid)
        return self._apps.pop(app_id, None) is not None

    async def put_device_credential(self, cred: DeviceCredential) -> None:
        """Insert or replace a device credential."""
        self._creds[(cred.app_id, cred.device_id)] = cred

    async def get_device_credential(self, app_id: str, device_id: str) -> DeviceCredential | None:
        """Return one device credential or None."""
        return self._creds.get((app_id, device_id))

    async def list_device_credentials(self, app_id: str) -> list[DeviceCredential]:
        """Return the credentials of one application, oldest first."""
        creds = [c for c in self._creds.values() if c.app_id == app_id]
        return sorted(creds, key=lambda c: (c.created_at, c.device_id))

    async def delete_device_credential(self, app_id: str, device_id: str) -> bool:
        """Delete one credential; False when there was none."""
        return self._creds.pop((app_id, device_id), None) is not None

    async def get_setting(self, name: str) -> str | None:
        """Return a server setting or None."""
        return self._settings.get(name)

    async def set_setting(self, name: str, value: str) -> None:
        """Store a server setting."""
        self._settings[name] = value

    async def create_tunnel_token(self, token: TunnelToken) -> None:
        """Insert a new tunnel token."""
        if token.token_hash in self._tokens:
            raise AlreadyExists("tunnel token exists")
        self._tokens[token.token_hash] = token

    async def get_tunnel_token(self, token_hash: str) -> TunnelToken | None:
        """Return one tunnel token (expired or not) or None."""
        return self._tokens.get(token_hash)

    async def extend_tunnel_token(self, token_hash: str, expires_at: float) -> bool:
        """Set a token's expiry; False when there is no such token."""
        old = self._tokens.get(token_hash)
        if old is None:
            return False
        self._tokens[token_hash] = TunnelToken(token_hash, old.created_at, expires_at)
        return True

    async def delete_tunnel_token(self, token_hash: str) -> bool:
        """Delete one token; False when there was none."""
        return self._tokens.pop(token_hash, None) is not None

    async def delete_expired_tunnel_tokens(self, now: float) -> int:
        """Delete every token with ``expires_at <= now``; return how many went."""
        gone = [h for h, t in self._tokens.items() if t.expires_at <= now]
        for h in gone:
            del self._tokens[h]
        return len(gone)

    async def claim_tunnel_name(self, record: TunnelName) -> TunnelName:
        """Reserve ``record.name`` unless taken; return whichever record holds it now."""
        return self._names.setdefault(record.name, record)

    async def get_tunnel_name(self, name: str) -> TunnelName | None:
        """Return one reserved name or None."""
        return self._names.get(name)

    async def get_tunnel_name_by_token(self, token_hash: str) -> TunnelName | None:
        """Return the reserved name whose token has this hash, or None."""
        for record in self._names.values():
            if record.token_hash == token_hash:
                return record
        return None

    async def delete_tunnel_name(self, name: str) -> bool:
        """Release a name; False when it was not reserved."""
        return self._names.pop(name, None) is not None

    async def append_events(
        self, events: list[NewEvent], outbox: Sequence[NewDelivery | None] | None = None
    ) -> list[StoredEvent]:
        """Append a batch (and its outbox rows); return it with its ids, in the same order."""
        stored: list[StoredEvent] = []
        logs = self._events
        seq = self._event_seq
        for e in events:
            seq += 1
            event = StoredEvent(seq, e.app_id, e.device_id, e.type, e.data, e.ts)
            log = logs.get(e.app_id)
            if log is None:
                log = logs[e.app_id] = []
            log.append(event)
            stored.append(event)
        self._event_seq = seq
        if outbox:
            self._enqueue(
                [
                    dataclasses.replace(row, event_id=event.id)
                    for row, event in zip(outbox, stored, strict=True)
                    if row is not None
                ]
            )
        return stored

    async def read_events(
        self,
        app_id: str,
        after_id: int,
        limit: int,
        devices: Collection[str] | None = None,
        types: Collection[str] | None = None,
    ) -> list[StoredEvent]:
        """Up to ``limit`` events of the app after ``after_id``, oldest first, filtered."""
        log = self._events.get(app_id)
        if not log or limit <= 0:
            return []
        start = bisect_right(log, after_id, key=_event_id)
        if devices is None and types is None:
            return log[start : start + limit]
        found: list[StoredEvent] = []
        for event in log[start:]:
            if (devices is None or event.device_id in devices) and (
                types is None or event.type in types
            ):
                found.append(event)
                if len(found) >= limit:
                    break
        return found

    async def last_event_id(self) -> int:
        """The highest event id ever given (0 when none was)."""
        return self._event_seq

    async def trim_events(
        self, max_per_app: int, older_than: float, app_ids: Collection[str] | None = None
    ) -> int:
        """Delete events older than ``older_than`` and each app's oldest beyond the count."""
        deleted = 0
        counted = set(self._events) if app_ids is None else set(app_ids)
        for app_id in list(self._events):
            log = self._events[app_id]
            before = len(log)
            if app_id in counted and len(log) > max_per_app:
                del log[: len(log) - max_per_app]
            # Wall-clock time may step back, so ts is not sorted: look at every event.
            if any(e.ts < older_than for e in log):
                log[:] = [e for e in log if e.ts >= older_than]
            deleted += before - len(log)
            if not log:
                del self._events[app_id]
        return deleted

    # -- webhook outbox ------------------------------------------------------------------

    def _enqueue(self, rows: list[NewDelivery]) -> list[int]:
        ids: list[int] = []
        for r in rows:
            self._outbox_seq += 1
            rid = self._outbox_seq
            self._outbox[rid] = Delivery(
                rid, r.app_id, r.device_id, r.kind, r.event_id, r.event_name, r.body,
                r.created_at, 0, r.created_at, PENDING, None, None,
            )  # fmt: skip
            ids.append(rid)
        return ids

    async def enqueue_deliveries(self, rows: list[NewDelivery]) -> list[int]:
        """Add pending rows; return their ids."""
        return self._enqueue(rows)

    async def lane_rows(
        self, app_id: str, device_id: str, after_id: int, limit: int
    ) -> list[Delivery]:
        """The device's pending rows with an id above ``after_id``, oldest first, due or not."""
        out: list[Delivery] = []
        for d in self._outbox.values():
            if len(out) >= limit:
                break
            if (
                d.id > after_id
                and d.state == PENDING
                and d.app_id == app_id
                and d.device_id == device_id
            ):
                out.append(d)
        return out

    async def mark_delivered_many(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Record many deliveries at once: (id, attempts, status) each."""
        for delivery_id, attempts, status in rows:
            await self.mark_delivered(delivery_id, attempts, status)

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Each (app, device)'s oldest pending row whose time has come, oldest first."""
        seen: set[tuple[str, str]] = set()
        due: list[Delivery] = []
        for d in self._outbox.values():
            if d.state != PENDING or (d.app_id, d.device_id) in seen:
                continue
            seen.add((d.app_id, d.device_id))
            if d.next_attempt_at <= now:
                due.append(d)
                if len(due) >= limit:
                    break
        return due

    def _update(self, delivery_id: int, **changes: object) -> None:
        d = self._outbox.get(delivery_id)
        if d is not None:
            self._outbox[delivery_id] = dataclasses.replace(d, **changes)  # type: ignore[arg-type]

    async def mark_delivered(self, delivery_id: int, attempts: int, status: int) -> None:
        """Record a delivery the receiver took."""
        self._update(delivery_id, state=DELIVERED, attempts=attempts, last_status=status)

    async def reschedule_delivery(
        self,
        delivery_id: int,
        attempts: int,
        next_attempt_at: float,
        status: int | None,
        error: str,
    ) -> None:
        """Record a failed attempt; the row stays pending."""
        self._update(
            delivery_id,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            last_status=status,
            last_error=error,
        )

    async def mark_dead(
        self, delivery_id: int, attempts: int, status: int | None, error: str
    ) -> None:
        """Give a row up."""
        self._update(
            delivery_id, state=DEAD, attempts=attempts, last_status=status, last_error=error
        )

    async def list_dead_deliveries(self, app_id: str, limit: int) -> list[Delivery]:
        """The app's dead rows, oldest first."""
        dead = [d for d in self._outbox.values() if d.app_id == app_id and d.state == DEAD]
        return dead[: max(limit, 0)]

    async def retry_dead_delivery(self, app_id: str, delivery_id: int, now: float) -> bool:
        """Make a dead row pending again."""
        d = self._outbox.get(delivery_id)
        if d is None or d.app_id != app_id or d.state != DEAD:
            return False
        self._update(delivery_id, state=PENDING, attempts=0, next_attempt_at=now)
        return True

    async def count_deliveries(self, app_id: str) -> dict[str, int]:
        """Rows of the app per state."""
        counts = {PENDING: 0, DELIVERED: 0, DEAD: 0}
        for d in self._outbox.values():
            if d.app_id == app_id:
                counts[d.state] += 1
        return counts

    async def purge_deliveries(self, older_than: float) -> int:
        """Delete delivered rows created before ``older_than``."""
        gone = [
            k for k, d in self._outbox.items() if d.state == DELIVERED and d.created_at < older_than
        ]
        for k in gone:
            del self._outbox[k]
        return len(gone)

    # -- messages ---------------------------------------------------------------------------

    def _forget_message(self, message_id: str) -> None:
        m = self._messages.pop(message_id)
        if m.idempotency_key is not None:
            self._message_keys.pop((m.app_id, m.idempotency_key), None)

    async def create_message(self, message: Message) -> tuple[Message, bool]:
        """Insert a message; on a taken idempotency key return (holder, False) instead."""
        if message.idempotency_key is not None:
            holder = self._message_keys.get((message.app_id, message.idempotency_key))
            if holder is not None:
                return self._messages[holder], False
        if message.id in self._messages:
            raise AlreadyExists(f"message {message.id!r} exists")
        self._message_seq += 1
        stored = dataclasses.replace(message, seq=self._message_seq)
        self._messages[message.id] = stored
        if message.idempotency_key is not None:
            self._message_keys[(message.app_id, message.idempotency_key)] = message.id
        return stored, True

    async def create_messages(self, messages: Sequence[Message]) -> list[Message]:
        """Insert many messages without idempotency keys; give each a seq."""
        if any(m.idempotency_key is not None for m in messages):
            raise ValueError("create_messages takes no idempotency keys")
        if any(m.id in self._messages for m in messages):
            raise AlreadyExists("a message id exists")
        return [(await self.create_message(m))[0] for m in messages]

    async def get_message(self, app_id: str, message_id: str) -> Message | None:
        """One message of the app, or None."""
        m = self._messages.get(message_id)
        return m if m is not None and m.app_id == app_id else None

    async def list_messages(
        self,
        app_id: str,
        device_id: str | None,
        states: Collection[str],
        limit: int,
        after_seq: int = 0,
    ) -> list[Message]:
        """Messages of a device (None: every device of the app), oldest first."""
        out: list[Message] = []
        for m in self._messages.values():
            if len(out) >= limit:
                break
            if (
                m.app_id == app_id
                and m.seq > after_seq
                and (device_id is None or m.device_id == device_id)
                and (not states or m.state in states)
            ):
                out.append(m)
        return out

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
        m = self._messages.get(message_id)
        if m is None or m.app_id != app_id or m.state not in from_states:
            return False
        self._messages[message_id] = dataclasses.replace(
            m,
            state=state,
            updated_at=now,
            reply=reply,
            error=error,
            detail=detail,
            attempts=m.attempts + int(attempt),
        )
        return True

    async def delete_message(self, app_id: str, message_id: str) -> bool:
        """Forget a message."""
        m = self._messages.get(message_id)
        if m is None or m.app_id != app_id:
            return False
        self._forget_message(message_id)
        return True

    async def get_message_by_key(self, app_id: str, key: str) -> Message | None:
        """The app's message holding an idempotency key, or None."""
        holder = self._message_keys.get((app_id, key))
        return None if holder is None else self._messages[holder]

    async def expire_messages(self, now: float) -> list[tuple[str, str, str]]:
        """Mark queued messages whose TTL passed as expired; return their (app, device, id)."""
        expired: list[tuple[str, str, str]] = []
        for mid, m in self._messages.items():
            if m.state == QUEUED and m.expires_at is not None and m.expires_at <= now:
                self._messages[mid] = dataclasses.replace(
                    m,
                    state=EXPIRED,
                    updated_at=now,
                    error="expired",
                    detail="the message expired before the device took it",
                )
                expired.append((m.app_id, m.device_id, mid))
        return expired

    async def queued_devices(self) -> dict[tuple[str, str], int]:
        """How many messages are queued per (app, device) that has any."""
        counts: dict[tuple[str, str], int] = {}
        for m in self._messages.values():
            if m.state == QUEUED:
                lane = (m.app_id, m.device_id)
                counts[lane] = counts.get(lane, 0) + 1
        return counts

    async def interrupt_sent_messages(
        self, now: float, detail: str
    ) -> list[tuple[str, str, str, str]]:
        """After a restart: ``sent`` messages become ``delivered`` with error ``interrupted``."""
        interrupted: list[tuple[str, str, str, str]] = []
        for mid, m in self._messages.items():
            if m.state == SENT:
                self._messages[mid] = dataclasses.replace(
                    m, state=DELIVERED, updated_at=now, error="interrupted", detail=detail
                )
                interrupted.append((m.app_id, m.device_id, mid, m.mode))
        return interrupted

    async def purge_messages(self, older_than: float) -> int:
        """Delete final messages last changed before ``older_than``; return how many."""
        old = [
            k
            for k, m in self._messages.items()
            if m.state in MESSAGE_FINAL and m.updated_at < older_than
        ]
        for mid in old:
            self._forget_message(mid)
        return len(old)
