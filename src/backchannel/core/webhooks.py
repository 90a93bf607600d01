"""What goes into the webhook outbox, and the retry schedule (the HTTP side is a front door).

Three kinds of delivery, chosen per application (``AppRecord.webhook_kinds``):

- ``event``: a device's upstream event; the body is the raw event bytes. Its outbox row is
  written by the event log **in the same store transaction as the event**, so a stored event
  always has its delivery stored too (at-least-once, across restarts).
- ``presence``: a device connected or disconnected (from the event log's presence records,
  in the same transaction too); the body is JSON, see :func:`record_body`.
- ``message``: a queued message reached its final state (from the event log's
  ``message_status`` records, in the same transaction too); the body is JSON, see
  :func:`record_body`.
- ``call``: a call made through this node ended; the body is JSON, see :meth:`WebhookPlanner.
  on_call`. These rows are batched and written by a task of their own, off the call's path;
  a crash within that instant can lose one (the call's caller has its answer anyway).

Nothing here waits on the hot path: the event log plans in its writer task, and call outcomes
are appended to a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

from backchannel.core.apps import AppService
from backchannel.core.clock import Clock
from backchannel.state.store import NewDelivery, NewEvent, Store

log = logging.getLogger(__name__)

EVENT = "event"
PRESENCE = "presence"
CALL = "call"
MESSAGE = "message"
#: The event log's type of presence records (``backchannel.core.events.PRESENCE``).
_PRESENCE_TYPE = "presence"
#: The event log's type of message records (``backchannel.core.events.MESSAGE_STATUS``).
_MESSAGE_TYPE = "message_status"
_MAX_PENDING_CALLS = 100_000
_WANTS_CALLS_TTL = 2.0  # seconds, like AppService's cache


def backoff(attempts: int, base: float, cap: float) -> float:
    """The wait after the ``attempts``-th failed attempt: base, 2 base, 4 base... up to cap."""
    return float(min(base * 2 ** min(attempts - 1, 60), cap))


def record_body(event: NewEvent, record: dict[str, Any]) -> bytes:
    """The JSON body of a presence or message webhook: the record plus who and when.

    Presence: ``{"app_id", "device_id", "ts", "online", "reason", "remote", "transport",
    "session_id", "connected_at", "last_seen", "replaced"}``. Message: ``{"app_id",
    "device_id", "ts", "message_id", "state", ...}``, as ``GET .../messages/{id}`` shows it.
    ``record`` is the event's data, already parsed.
    """
    data: dict[str, Any] = {"app_id": event.app_id, "device_id": event.device_id, "ts": event.ts}
    data.update(record)
    return orjson.dumps(data)


class WebhookPlanner:
    """Decides which events, presence changes and calls get an outbox row, and writes calls."""

    def __init__(self, store: Store, apps: AppService, clock: Clock) -> None:
        self._store = store
        self._apps = apps
        self._clock = clock
        # (app_id, device_id, error code or None, duration ms, wall time) of ended calls.
        self._calls: list[tuple[str, str, str | None, float, float]] = []
        #: app_id -> (wants call webhooks, monotonic time until which that is trusted).
        self._wants_calls: dict[str, tuple[bool, float]] = {}
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._running = False
        #: Called after new rows are stored (the delivery worker's wake-up).
        self.on_enqueued: Callable[[], None] | None = None

    async def _kinds(self, app_id: str) -> tuple[str, ...]:
        app = await self._apps.get(app_id)
        if app is None or not app.webhook_url:
            return ()
        return app.webhook_kinds

    # -- events and presence (the event log's writer calls these) ----------------------------

    async def plan(self, batch: list[NewEvent]) -> list[NewDelivery | None] | None:
        """The outbox rows of a batch of events, one per event (None: none); None: none at all."""
        kinds: dict[str, tuple[str, ...]] = {}
        for event in batch:
            if event.app_id not in kinds:
                kinds[event.app_id] = await self._kinds(event.app_id)
        if not any(kinds.values()):
            return None
        rows: list[NewDelivery | None] = []
        for e in batch:
            wanted = kinds[e.app_id]
            if e.type == _PRESENCE_TYPE:
                if PRESENCE in wanted:
                    record = orjson.loads(e.data)
                    name = "connect" if record.get("online") else "disconnect"
                    body = record_body(e, record)
                    rows.append(NewDelivery(e.app_id, e.device_id, PRESENCE, name, body, e.ts))
                    continue
            elif e.type == _MESSAGE_TYPE:
                if MESSAGE in wanted:
                    record = orjson.loads(e.data)
                    state = str(record.get("state", ""))
                    body = record_body(e, record)
                    rows.append(NewDelivery(e.app_id, e.device_id, MESSAGE, state, body, e.ts))
                    continue
            elif EVENT in wanted:
                rows.append(NewDelivery(e.app_id, e.device_id, EVENT, e.name, e.data, e.ts))
                continue
            rows.append(None)
        return rows

    def enqueued(self) -> None:
        """New rows are in the store: wake the worker."""
        if self.on_enqueued is not None:
            self.on_enqueued()

    # -- calls (a relay listener) ----------------------------------------------------------

    def on_call(self, app_id: str, device_id: str, code: str | None, duration_ms: float) -> None:
        """Relay listener: a call ended.

        The body: ``{"app_id", "device_id", "ts", "status": "ok" | "error", "error": <code> |
        null, "duration_ms"}``.
        """
        if not self._running or len(self._calls) >= _MAX_PENDING_CALLS:
            return
        # The hot path: most apps want no call webhooks, and once that is known (for a
        # couple of seconds, like the app cache) a call costs one dict lookup here.
        known = self._wants_calls.get(app_id)
        if known is not None and not known[0] and known[1] > self._clock.monotonic():
            return
        self._calls.append((app_id, device_id, code, duration_ms, self._clock.time()))
        self._wake.set()

    async def start(self) -> None:
        """Start writing call rows."""
        self._running = True
        self._writer = asyncio.get_running_loop().create_task(self._write_calls())

    async def stop(self) -> None:
        """Write what is pending, then stop."""
        self._running = False
        if self._calls:
            with contextlib.suppress(Exception):
                await self._flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _write_calls(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("webhooks: could not store call deliveries")
                await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        batch, self._calls = self._calls, []
        kinds: dict[str, tuple[str, ...]] = {}
        rows: list[NewDelivery] = []
        fresh_until = self._clock.monotonic() + _WANTS_CALLS_TTL
        for app_id, device_id, code, duration_ms, ts in batch:
            if app_id not in kinds:
                kinds[app_id] = await self._kinds(app_id)
                self._wants_calls[app_id] = (CALL in kinds[app_id], fresh_until)
            if CALL in kinds[app_id]:
                body = {
                    "app_id": app_id,
                    "device_id": device_id,
                    "ts": ts,
                    "status": "ok" if code is None else "error",
                    "error": code,
                    "duration_ms": round(duration_ms, 3),
                }
                rows.append(NewDelivery(app_id, device_id, CALL, CALL, orjson.dumps(body), ts))
        if rows:
            await self._store.enqueue_deliveries(rows)
            self.enqueued()
