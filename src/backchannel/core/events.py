"""The event log: upstream events and presence changes, stored with ids, pushed to subscribers.

Every upstream event of a device (native or Cometa), and every presence change (a session
starting, replacing another, or ending), becomes one record of the store's event log. The
log gives each record an id that increases across the server and is never reused, so a
reader that remembers the last id it saw can resume after it with no gap and no duplicate.

**The hot path never waits on the store.** The relay's listeners only append to a list in
memory; one writer task takes everything that piled up (events of the same loop turn, and
whatever arrived while the previous write ran) and writes it in one store call, one SQLite
transaction. So the batch grows with the load. When the backlog passes half of
:attr:`EventSettings.max_pending` (or of its byte bound) the log is *congested*: transports
stop reading from devices that send events (TCP pushes back on them) until the writer brought
it down to a quarter. Past the full bound, which only a burst within one loop turn can reach,
new events are dropped and counted (``backchannel_events_dropped_total{reason="backlog"}``).

**Readers see an event only once it is stored.** Ids come from the store, so live
subscribers are fed after the write, in id order. Each subscriber has a bounded queue; one
that falls too far behind is dropped (its stream ends) rather than buffered without limit or
allowed to slow the others. Nothing is lost by that: it resumes from the store with the last
id it saw.

**Types.** A device event's type is its name. An unnamed event (every Cometa event, and a
native one with an empty name) has the type ``message``, the type Server-Sent Events give
unnamed events. ``presence`` is reserved for presence changes: a device event named
``presence`` is recorded as ``device:presence``, so a device cannot pass for the server; the
same goes for ``message_status``, the type of a queued message's final state.

**Presence data** is a JSON object: ``online``, ``reason`` (the close reason, ``null`` while
online), ``remote``, ``transport``, ``session_id``, ``connected_at``, ``last_seen`` (Unix
seconds), and ``replaced``: on a takeover, the id of the session the new one replaced
(``null`` otherwise). A takeover gives one ``online: true`` record and no ``online: false``,
because the device never went offline.

**Webhooks.** An :class:`OutboxPlanner` (``backchannel.core.webhooks``), when given, names
the webhook outbox rows of each batch, and the store writes them in the same transaction as
the events: a stored event always has its delivery stored.

**Acknowledgements mean stored.** A device that asks for an acknowledgement (native
``EVENT`` with an id) gets it only once its event is in the store (:meth:`EventLog.when_stored`),
so an acknowledged event survives a crash; an event dropped on the way is never acknowledged.

**Retention** is by count per application and by age; a background task trims every
``trim_interval`` seconds, so an application can briefly hold more than the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from backchannel.core import metrics
from backchannel.core.clock import Clock
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason, Session
from backchannel.state.store import NewDelivery, NewEvent, Store, StoredEvent

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: The type of presence changes.
PRESENCE = "presence"
#: The type of a queued message's final state (``backchannel.core.messages``).
MESSAGE_STATUS = "message_status"
#: The type of unnamed events (all Cometa events).
UNNAMED = "message"
#: The prefix that keeps a device event from taking a reserved type.
DEVICE_PREFIX = "device:"
_RESERVED = frozenset({PRESENCE, MESSAGE_STATUS})
# Waits between attempts to write a batch the store refused, then the batch is dropped.
_RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


def event_type(name: str) -> str:
    """The type an upstream event named ``name`` is recorded with."""
    if not name:
        return UNNAMED
    if name in _RESERVED:
        return DEVICE_PREFIX + name
    return name


@dataclass(frozen=True, slots=True)
class EventSettings:
    """Retention and the bounds that keep a slow store or a slow reader from costing memory."""

    retention_count: int = 10_000
    retention_seconds: float = 7 * 86400.0
    trim_interval: float = 60.0
    #: Events waiting for the store; beyond either bound, new events are dropped.
    max_pending: int = 100_000
    max_pending_bytes: int = 256 * MiB
    #: Events written per store call at most (either bound), so a big backlog goes out in
    #: steps that never overflow an idle subscriber's queue in one go.
    max_batch: int = 20_000
    max_batch_bytes: int = 16 * MiB
    #: A subscriber with more than this queued is dropped (a single event always fits).
    queue_events: int = 100_000
    queue_bytes: int = 64 * MiB


class OutboxPlanner(Protocol):
    """Decides the webhook outbox rows written with a batch of events (the same transaction)."""

    async def plan(self, batch: list[NewEvent]) -> list[NewDelivery | None] | None:
        """One row or None per event; None when the batch has no row at all."""
        ...

    def enqueued(self) -> None:
        """Called after a batch with outbox rows is stored."""
        ...


class Subscription:
    """One live reader of an application's events, with optional device and type filters.

    Created by :meth:`EventLog.subscribe`. The reader takes events with :meth:`get`, and
    calls :meth:`EventLog.unsubscribe` when it stops.
    """

    __slots__ = (
        "_bytes",
        "_queue",
        "_wake",
        "app_id",
        "closed",
        "devices",
        "dropped",
        "on_close",
        "types",
    )

    def __init__(
        self, app_id: str, devices: frozenset[str] | None, types: frozenset[str] | None
    ) -> None:
        self.app_id = app_id
        self.devices = devices
        self.types = types
        self._queue: list[StoredEvent] = []
        self._bytes = 0
        self._wake = asyncio.Event()
        #: True once closed: by the server shutting down, or dropped.
        self.closed = False
        #: True when closed for falling behind (the reader should resume from the store).
        self.dropped = False
        #: Called once when the log closes the subscription (the reader may be blocked
        #: writing to a stuck client and need a nudge).
        self.on_close: Callable[[], None] | None = None

    def matches(self, event: StoredEvent) -> bool:
        """Whether the filters let ``event`` through."""
        return (self.devices is None or event.device_id in self.devices) and (
            self.types is None or event.type in self.types
        )

    def push(self, event: StoredEvent, max_events: int, max_bytes: int) -> bool:
        """Queue ``event``; False when that would pass a bound (the caller drops us)."""
        queue = self._queue
        size = len(event.data)
        if queue and (len(queue) >= max_events or self._bytes + size > max_bytes):
            return False
        queue.append(event)
        self._bytes += size
        self._wake.set()
        return True

    async def get(self, timeout: float) -> list[StoredEvent]:
        """Every queued event, waiting up to ``timeout`` s for one; [] on timeout or close."""
        if not self._queue and not self.closed:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        batch, self._queue = self._queue, []
        self._bytes = 0
        return batch

    def close(self, *, dropped: bool = False) -> None:
        """End the subscription: the reader's :meth:`get` returns what is left, then []."""
        if self.closed:
            return
        self.closed = True
        self.dropped = dropped
        if dropped:
            self._queue = []  # the reader resumes from the store; free the memory now
            self._bytes = 0
        self._wake.set()
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()


class EventLog:
    """Records upstream events and presence changes in the store and feeds subscribers."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        settings: EventSettings | None = None,
        outbox: OutboxPlanner | None = None,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._clock = clock
        self.settings = settings or EventSettings()
        self._pending: list[NewEvent] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._running = False
        self._open = True  # new subscriptions are taken (until the server shuts down)
        self._subs: dict[str, set[Subscription]] = {}
        # The live session of each device, for the details of its "offline" record (the
        # relay's disconnect listeners only get the reason).
        self._online: dict[tuple[str, str], Session] = {}
        # Applications that received events since the last trim; None: check them all.
        self._touched: set[str] | None = None
        # Acknowledgements waiting for their event's write: (sequence number, callback).
        # ``_recorded`` counts accepted records, ``_taken`` those handed to the writer.
        self._acks: list[tuple[int, Callable[[], None]]] = []
        self._recorded = 0
        self._taken = 0
        self._last_accepted = False
        #: True while the backlog is high: transports pause reading devices (see ``room``).
        self.congested = False
        self._room = asyncio.Event()
        self._room.set()
        #: The highest id stored so far (on this server, across restarts).
        self.last_id = 0

    def attach(self, relay: Relay) -> None:
        """Listen to the relay's events, connects and disconnects."""
        relay.on_event(self.on_event)
        relay.on_connect(self.on_connect)
        relay.on_disconnect(self.on_disconnect)
        relay.when_stored = self.when_stored
        relay.event_backlog = self

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the newest id, then start the writer and the retention task."""
        self.last_id = await self._store.last_event_id()
        loop = asyncio.get_running_loop()
        self._running = True
        self._writer = loop.create_task(self._write_loop())
        self._trimmer = loop.create_task(self._trim_loop())

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending (for up to ``timeout`` s), stop the tasks, end every stream."""
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.drain()
        self._running = False
        self._acks = []  # their events were not stored: no acknowledgement
        self._uncongest()
        if self._pending:
            log.warning("event log stopped with %d events unwritten", len(self._pending))
            metrics.EVENTS_DROPPED.labels("shutdown").inc(len(self._pending))
            self._pending = []
            self._pending_bytes = 0
        for task in (self._writer, self._trimmer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._writer = self._trimmer = None
        self.close_subscribers()

    async def drain(self) -> None:
        """Wait until every event recorded so far is stored and pushed to subscribers."""
        await self._idle.wait()

    @property
    def accepting(self) -> bool:
        """Whether :meth:`subscribe` gives live subscriptions (false once shutting down)."""
        return self._running and self._open

    def close_subscribers(self) -> None:
        """End every subscription, and refuse new ones (the server is shutting down)."""
        self._open = False
        subs = [sub for group in self._subs.values() for sub in group]
        self._subs.clear()
        for sub in subs:
            sub.close()
        metrics.EVENT_STREAMS.set(0)

    # -- recording (the hot path: no await, no store) --------------------------------------

    def on_event(self, app_id: str, device_id: str, name: str, data: bytes) -> None:
        """Relay listener: record an upstream event."""
        now = self._clock.time()
        self._record(NewEvent(app_id, device_id, event_type(name), data, now, name))

    def on_connect(self, app_id: str, device_id: str, session: Session) -> None:
        """Relay listener: record ``online: true`` (a takeover names the replaced session)."""
        key = (app_id, device_id)
        previous = self._online.get(key)
        self._online[key] = session
        replaced = previous.session_id if previous is not None and previous is not session else None
        self._presence(app_id, device_id, session, None, replaced)

    def on_disconnect(self, app_id: str, device_id: str, reason: CloseReason) -> None:
        """Relay listener: record ``online: false`` with the reason."""
        session = self._online.pop((app_id, device_id), None)
        self._presence(app_id, device_id, session, reason.value, None)

    def record_message_status(self, app_id: str, device_id: str, data: bytes) -> None:
        """Record a queued message's final state (JSON ``data``; see core/messages.py)."""
        self._record(NewEvent(app_id, device_id, MESSAGE_STATUS, data, self._clock.time()))

    def _presence(
        self,
        app_id: str,
        device_id: str,
        session: Session | None,
        reason: str | None,
        replaced: str | None,
    ) -> None:
        stats = session.stats if session is not None else None
        data: dict[str, Any] = {
            "online": reason is None,
            "reason": reason,
            "remote": stats.remote if stats else None,
            "transport": session.transport if session else None,
            "session_id": session.session_id if session else None,
            "connected_at": stats.connected_at if stats else None,
            "last_seen": (stats.last_seen or stats.connected_at) if stats else None,
            "replaced": replaced,
        }
        now = self._clock.time()
        self._record(NewEvent(app_id, device_id, PRESENCE, orjson.dumps(data), now))

    async def room(self) -> None:
        """Wait until the backlog is low enough for devices to be read again."""
        await self._room.wait()

    def _uncongest(self) -> None:
        self.congested = False
        self._room.set()

    def when_stored(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the record made just before is stored; never if it was dropped."""
        if self._last_accepted:
            self._acks.append((self._recorded, callback))

    def _record(self, event: NewEvent) -> None:
        settings = self.settings
        self._last_accepted = False
        if not self._running:
            metrics.EVENTS_DROPPED.labels("stopped").inc()
            return
        if (
            len(self._pending) >= settings.max_pending
            or self._pending_bytes + len(event.data) > settings.max_pending_bytes
        ):
            metrics.EVENTS_DROPPED.labels("backlog").inc()
            return
        self._last_accepted = True
        self._recorded += 1
        self._pending.append(event)
        self._pending_bytes += len(event.data)
        if not self.congested and (
            len(self._pending) * 2 >= settings.max_pending
            or self._pending_bytes * 2 >= settings.max_pending_bytes
        ):
            self.congested = True
            self._room.clear()
            metrics.EVENT_LOG_CONGESTED.inc()
        self._idle.clear()
        self._wake.set()

    # -- writing ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._take_batch()
                self._taken += len(batch)
                if self.congested and (
                    len(self._pending) * 4 <= self.settings.max_pending
                    and self._pending_bytes * 4 <= self.settings.max_pending_bytes
                ):
                    self._uncongest()
                written_up_to = self._taken
                stored = await self._append(batch)
                if self._acks:
                    self._acknowledge(written_up_to, bool(stored))
                if stored:
                    try:
                        self._publish(stored)
                    except Exception:
                        # A bug here must not stop the writer: devices would stay paused.
                        log.exception("event log: feeding the subscribers failed")
                if self._pending:
                    # A store that never yields (memory) would otherwise feed every batch to
                    # the subscribers before any of them could write one out.
                    await asyncio.sleep(0)
            self._idle.set()

    def _acknowledge(self, up_to: int, stored: bool) -> None:
        # Callbacks of this batch's records: called when the write succeeded, forgotten when
        # the store refused it (the device never gets an ack, and may send the event again).
        acks = self._acks
        n = 0
        while n < len(acks) and acks[n][0] <= up_to:
            n += 1
        done, self._acks = acks[:n], acks[n:]
        if not stored:
            return
        for _, callback in done:
            try:
                callback()
            except Exception:
                log.exception("event acknowledgement failed")

    def _take_batch(self) -> list[NewEvent]:
        pending = self._pending
        settings = self.settings
        count = 0
        nbytes = 0
        # At least one event, however big; then up to either bound.
        for event in pending:
            if count and (
                count >= settings.max_batch or nbytes + len(event.data) > settings.max_batch_bytes
            ):
                break
            count += 1
            nbytes += len(event.data)
        if count == len(pending):
            self._pending = []
            self._pending_bytes = 0
            return pending
        batch = pending[:count]
        del pending[:count]
        self._pending_bytes -= nbytes
        return batch

    async def _append(self, batch: list[NewEvent]) -> list[StoredEvent]:
        for delay in (*_RETRY_DELAYS, None):
            try:
                # Planned on every attempt: the store may be what failed the app lookups.
                rows = await self._outbox.plan(batch) if self._outbox is not None else None
                if rows:
                    stored = await self._store.append_events(batch, rows)
                else:
                    stored = await self._store.append_events(batch)
            except Exception as exc:
                if delay is None:
                    log.error("event log: dropped %d events the store refused", len(batch))
                    metrics.EVENTS_DROPPED.labels("store_error").inc(len(batch))
                    return []
                log.warning("event log: store write failed (%s); retrying in %gs", exc, delay)
                await asyncio.sleep(delay)
            else:
                metrics.EVENTS_STORED.inc(len(stored))
                if rows and self._outbox is not None:
                    self._outbox.enqueued()
                return stored
        return []  # pragma: no cover - the loop always returns

    def _publish(self, stored: list[StoredEvent]) -> None:
        self.last_id = stored[-1].id
        touched = self._touched
        if touched is not None:
            touched.update(e.app_id for e in stored)
        subs = self._subs
        if not subs:
            return
        settings = self.settings
        for event in stored:
            group = subs.get(event.app_id)
            if not group:
                continue
            slow: list[Subscription] | None = None
            for sub in group:
                if sub.matches(event) and not sub.push(
                    event, settings.queue_events, settings.queue_bytes
                ):
                    slow = [sub] if slow is None else [*slow, sub]
            if slow:
                for sub in slow:
                    log.info("event stream of %s too slow: dropped", sub.app_id)
                    metrics.EVENT_STREAMS_DROPPED.inc()
                    self.unsubscribe(sub)
                    sub.close(dropped=True)

    # -- reading ---------------------------------------------------------------------------

    def subscribe(
        self,
        app_id: str,
        devices: Collection[str] | None = None,
        types: Collection[str] | None = None,
    ) -> Subscription:
        """A live feed of the application's events stored from now on, filtered."""
        sub = Subscription(
            app_id,
            frozenset(devices) if devices else None,
            frozenset(types) if types else None,
        )
        if not self.accepting:
            sub.close()
            return sub
        self._subs.setdefault(app_id, set()).add(sub)
        metrics.EVENT_STREAMS.inc()
        return sub

    def subscribers(self, app_id: str) -> int:
        """Live subscriptions of an application on this node."""
        return len(self._subs.get(app_id, ()))

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop feeding ``sub``; idempotent."""
        group = self._subs.get(sub.app_id)
        if group is None or sub not in group:
            return
        group.discard(sub)
        if not group:
            del self._subs[sub.app_id]
        metrics.EVENT_STREAMS.dec()

    async def read(
        self,
        app_id: str,
        after_id: int,
        limit: int,
        devices: Collection[str] | None = None,
        types: Collection[str] | None = None,
    ) -> list[StoredEvent]:
        """Stored events of the application after ``after_id``, oldest first, filtered."""
        return await self._store.read_events(
            app_id, after_id, limit, devices or None, types or None
        )

    # -- retention -------------------------------------------------------------------------

    async def _trim_loop(self) -> None:
        while True:
            try:
                await self.trim()
            except Exception:
                log.exception("event log: trim failed")
            await asyncio.sleep(self.settings.trim_interval)

    async def trim(self) -> int:
        """Apply the retention rules now; return how many events were deleted."""
        apps, self._touched = self._touched, set()
        older_than = self._clock.time() - self.settings.retention_seconds
        try:
            deleted = await self._store.trim_events(self.settings.retention_count, older_than, apps)
        except BaseException:
            # Check those applications again next time.
            if apps is None:
                self._touched = None
            elif self._touched is not None:
                self._touched |= apps
            raise
        if deleted:
            log.debug("event log: trimmed %d events", deleted)
        return deleted
