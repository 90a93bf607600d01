"""Messages that outlive one HTTP call: the per-device offline queue and idempotent calls.

A queued message is written to the store before the app gets its ``202``, and goes to the
device in creation order whenever the device is connected to this node. Delivery is *at
most once*: a message is marked ``sent`` in the store before it is handed to the device, and
a message that was handed over is never sent again, whatever happens next (a lost
connection, a timeout, a server crash): it ends ``replied``, ``failed`` or ``delivered``
(handed over, no reply; ``error`` says why). Only outcomes that prove nothing reached the
device (offline, busy, timed out before delivery) put it back in the queue, in its place.

A call that carries an ``Idempotency-Key`` is recorded the same way, so a retry with the
same key gets the first call's outcome instead of a second delivery.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import orjson

from backchannel.core import metrics
from backchannel.core.clock import Clock
from backchannel.core.lifecycle import MESSAGE_TRANSITIONS, allowed
from backchannel.core.outcomes import (
    CallFailed,
    DeviceBusy,
    DeviceError,
    DeviceOffline,
    InvalidMessage,
    ShuttingDown,
    TimedOutBeforeDelivery,
)
from backchannel.core.relay import Relay
from backchannel.core.session import Session
from backchannel.state.store import (
    DELIVERED,
    EXPIRED,
    FAILED,
    MESSAGE_FINAL,
    QUEUED,
    REPLIED,
    SENT,
    Message,
    Store,
)

log = logging.getLogger(__name__)

#: Outcomes that prove the device never got the message: it may be sent again.
NOT_SENT: tuple[type[CallFailed], ...] = (
    DeviceOffline,
    DeviceBusy,
    TimedOutBeforeDelivery,
    ShuttingDown,
)
_BATCH = 50  # queued messages read per store query while draining a device's queue
_PURGE_EVERY = 60.0  # seconds between purges of old final messages
_BUSY_RETRY = 1.0  # seconds before a busy device's queue is tried again
_EXPIRED = "the message expired before the device took it"


@dataclass(frozen=True, slots=True)
class MessageSettings:
    """Limits of the offline queue and of idempotency records."""

    default_ttl: float = 86_400.0
    max_ttl: float = 7 * 86_400.0
    #: How long a final message, its reply and its idempotency key are kept.
    retention: float = 86_400.0
    max_queued_per_device: int = 1_000
    #: Largest body of a queued message: queued bodies sit on disk until delivered.
    max_body: int = 1024 * 1024
    sweep_interval: float = 1.0


class QueueFull(Exception):
    """The device already has the most queued messages allowed."""

    code = "queue_full"


class MessageTooLarge(Exception):
    """A queued message's body is over ``MessageSettings.max_body``."""

    code = "body_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a queued message's body is at most {limit} bytes, got {size}")
        self.limit = limit


class KeyReused(Exception):
    """An idempotency key came back with a different request."""

    code = "idempotency_key_reused"


class KeyInProgress(Exception):
    """The first request with this idempotency key is still running elsewhere."""

    code = "idempotency_key_in_progress"


def message_view(message: Message) -> dict[str, Any]:
    """The public view of a message (its body is not echoed back): the API's and webhooks'."""
    view: dict[str, Any] = {
        "message_id": message.id,
        "device_id": message.device_id,
        "state": message.state,
        "mode": message.mode,
        "method": message.method,
        "created_at": message.created_at,
        "updated_at": message.updated_at,
        "expires_at": message.expires_at,
        "timeout": message.timeout,
        "attempts": message.attempts,
    }
    if message.error is not None:
        view["error"] = message.error
        view["detail"] = message.detail or ""
    if message.reply is not None:
        try:
            view["reply"] = message.reply.decode()
        except UnicodeDecodeError:
            view["reply_base64"] = base64.b64encode(message.reply).decode()
    return view


def body_hash(device_id: str, method: str, body: bytes) -> str:
    """What an idempotent retry must repeat exactly: the target, the method and the body."""
    h = hashlib.sha256(device_id.encode())
    h.update(b"\0" + method.encode() + b"\0")
    h.update(body)
    return h.hexdigest()


def new_message_id() -> str:
    """A message id: 128 random bits, URL-safe."""
    return "msg_" + secrets.token_urlsafe(16)


class Messages:
    """The offline queue of every device, and the record of idempotent calls."""

    def __init__(
        self,
        store: Store,
        relay: Relay,
        clock: Clock,
        settings: MessageSettings = MessageSettings(),
    ) -> None:
        self._store = store
        self._relay = relay
        self._clock = clock
        self.settings = settings
        #: Queued messages per (app, device), so a connect costs a dict lookup, not a query.
        self._queued: dict[tuple[str, str], int] = {}
        self._drains: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: Lanes that got new messages while their drain was reading the store.
        self._dirty: set[tuple[str, str]] = set()
        #: Idempotent calls in flight on this node: retries wait for the first one's outcome.
        self._inflight: dict[str, asyncio.Future[CallFailed | None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: Told each queued message's final state: (app, device, JSON of its view). The
        #: event log's ``record_message_status``, which feeds the event stream and webhooks.
        self.notify: Callable[[str, str, bytes], None] | None = None
        relay.on_connect(self._on_connect)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Settle what a previous run left in flight, load the queues, start the sweeper."""
        detail = "the server stopped while the message was in flight; the device may have it"
        interrupted = await self._store.interrupt_sent_messages(self._clock.time(), detail)
        if interrupted:
            log.warning("%d messages were in flight when the server stopped", len(interrupted))
        for app_id, device_id, message_id, mode in interrupted:
            if mode == "queue":
                self._announce_final(
                    app_id, device_id, message_id, DELIVERED, "interrupted", detail
                )
        self._queued.update(await self._store.queued_devices())
        metrics.MESSAGES_QUEUED.set(sum(self._queued.values()))
        if self._queued:
            log.info("offline queue: %d devices have queued messages", len(self._queued))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop the sweeper and every drain; queued messages stay in the store."""
        tasks = [t for t in (self._sweeper, *self._drains.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- the offline queue -----------------------------------------------------------------

    async def enqueue(
        self,
        app_id: str,
        device_id: str,
        body: bytes,
        method: str,
        timeout: float,
        ttl: float | None,
        key: str | None,
    ) -> tuple[Message, bool]:
        """Queue a message; return it and whether it is new (False: the key's first one).

        Raises:
            QueueFull: the device has ``max_queued_per_device`` queued messages.
            KeyReused: ``key`` was used for a different request.
            MessageTooLarge: the body is over ``max_body``.
        """
        self.check_body(len(body))
        lane = (app_id, device_id)
        digest = body_hash(device_id, method, body)
        if self._queued.get(lane, 0) >= self.settings.max_queued_per_device:
            if key is not None:
                # A retry of an accepted message must still get its answer.
                existing = await self._store.get_message_by_key(app_id, key)
                if existing is not None:
                    _check_same(existing, "queue", digest)
                    return existing, False
            raise QueueFull(
                f"device {device_id} has {self.settings.max_queued_per_device} queued messages"
            )
        now = self._clock.time()
        ttl = self.settings.default_ttl if ttl is None else ttl
        message = Message(
            id=new_message_id(),
            app_id=app_id,
            device_id=device_id,
            mode="queue",
            method=method,
            body=body,
            body_hash=digest,
            idempotency_key=key,
            state=QUEUED,
            created_at=now,
            updated_at=now,
            expires_at=now + ttl,
            timeout=timeout,
        )
        stored, created = await self._store.create_message(message)
        if not created:
            _check_same(stored, "queue", digest)
            return stored, False
        self._count(lane, +1)
        if self._relay.hub.get(app_id, device_id) is not None:
            self._kick(lane)
        return stored, True

    async def enqueue_many(
        self,
        app_id: str,
        device_ids: list[str],
        body: bytes,
        method: str,
        timeout: float,
        ttl: float | None,
    ) -> dict[str, Message | QueueFull]:
        """Queue one message for each device in one store write (a fan-out's offline ones).

        Returns each device's message, or the QueueFull that kept it out.

        Raises:
            MessageTooLarge: the body is too large to queue.
        """
        self.check_body(len(body))
        now = self._clock.time()
        expires = now + (self.settings.default_ttl if ttl is None else ttl)
        results: dict[str, Message | QueueFull] = {}
        fresh: list[Message] = []
        for device_id in device_ids:
            if self._queued.get((app_id, device_id), 0) >= self.settings.max_queued_per_device:
                limit = self.settings.max_queued_per_device
                results[device_id] = QueueFull(f"device {device_id} has {limit} queued messages")
                continue
            fresh.append(
                Message(
                    id=new_message_id(),
                    app_id=app_id,
                    device_id=device_id,
                    mode="queue",
                    method=method,
                    body=body,
                    body_hash=body_hash(device_id, method, body),
                    idempotency_key=None,
                    state=QUEUED,
                    created_at=now,
                    updated_at=now,
                    expires_at=expires,
                    timeout=timeout,
                )
            )
        for stored in await self._store.create_messages(fresh):
            lane = (app_id, stored.device_id)
            results[stored.device_id] = stored
            self._count(lane, +1)
            if self._relay.hub.get(*lane) is not None:
                self._kick(lane)
        return results

    async def get(self, app_id: str, message_id: str) -> Message | None:
        """A message of the app (a queued one past its TTL reads as expired)."""
        message = await self._store.get_message(app_id, message_id)
        if message is None:
            return None
        now = self._clock.time()
        if message.state == QUEUED and message.expires_at is not None and message.expires_at <= now:
            await self._expire(message, now)
            return await self._store.get_message(app_id, message_id)
        return message

    async def list(
        self,
        app_id: str,
        device_id: str | None,
        states: Collection[str],
        limit: int,
        after_seq: int = 0,
    ) -> list[Message]:
        """Messages of a device (None: of the whole app) in ``states`` (all when empty)."""
        return await self._store.list_messages(app_id, device_id, states, limit, after_seq)

    async def cancel(self, app_id: str, message_id: str) -> Message | None:
        """Take a queued message out of the queue; return it as it is now (None: unknown)."""
        message = await self._store.get_message(app_id, message_id)
        if message is None:
            return None
        now = self._clock.time()
        detail = "cancelled by the application"
        if await self._move(
            app_id, message_id, (QUEUED,), FAILED, now, error="cancelled", detail=detail
        ):
            self._count((app_id, message.device_id), -1)
            self._announce(message, FAILED, now, error="cancelled", detail=detail)
        return await self._store.get_message(app_id, message_id)

    def check_body(self, size: int) -> None:
        """Refuse a body too large to queue.

        Raises:
            MessageTooLarge: ``size`` is over ``max_body``.
        """
        if size > self.settings.max_body:
            raise MessageTooLarge(size, self.settings.max_body)

    def queued(self, app_id: str, device_id: str) -> int:
        """How many messages wait for the device."""
        return self._queued.get((app_id, device_id), 0)

    def _on_connect(self, app_id: str, device_id: str, session: Session) -> None:
        lane = (app_id, device_id)
        if self._queued.get(lane):
            self._kick(lane)

    def _kick(self, lane: tuple[str, str]) -> None:
        self._dirty.add(lane)
        if lane not in self._drains:
            task = asyncio.get_running_loop().create_task(self._drain(lane))
            self._drains[lane] = task

    async def _drain(self, lane: tuple[str, str]) -> None:
        # One drain per device at a time: that is what keeps the queue in order.
        try:
            await self._drain_lane(lane)
        except asyncio.CancelledError:
            self._drains.pop(lane, None)
            raise
        except Exception:
            log.exception("offline queue of %s/%s failed; retrying at the next connect", *lane)
        self._drains.pop(lane, None)
        # Kicked while stopping (say the device came back while its old session's call was
        # being put back in the queue): that kick found this drain still running, so go again.
        if lane in self._dirty and self._queued.get(lane) and self._relay.hub.get(*lane):
            self._kick(lane)

    async def _drain_lane(self, lane: tuple[str, str]) -> None:
        app_id, device_id = lane
        while self._relay.hub.get(app_id, device_id) is not None:
            self._dirty.discard(lane)
            batch = await self._store.list_messages(app_id, device_id, (QUEUED,), _BATCH)
            if not batch:
                if lane in self._dirty:
                    continue
                # None left: a count that drifted (a row changed elsewhere) is reset here.
                metrics.MESSAGES_QUEUED.dec(self._queued.pop(lane, 0))
                return
            for message in batch:
                if not await self._deliver(message):
                    return

    async def _deliver(self, message: Message) -> bool:
        """Send one queued message; False when the device cannot take more now."""
        app_id, lane = message.app_id, (message.app_id, message.device_id)
        now = self._clock.time()
        if message.expires_at is not None and message.expires_at <= now:
            await self._expire(message, now)
            return True
        # Recorded before the hand-over: after a crash it must never be sent a second time.
        if not await self._move(app_id, message.id, (QUEUED,), SENT, now, attempt=True):
            return True  # expired or changed meanwhile
        self._count(lane, -1)
        try:
            reply = await self._relay.call(
                app_id, message.device_id, message.body, message.method, message.timeout
            )
        except NOT_SENT as exc:
            await self._move(
                app_id,
                message.id,
                (SENT,),
                QUEUED,
                self._clock.time(),
                error=exc.code,
                detail=f"not delivered yet: {exc}",
            )
            self._count(lane, +1)
            if isinstance(exc, DeviceBusy):
                self._relay.spawn(self._kick_later(lane, _BUSY_RETRY))
            return False
        except CallFailed as exc:
            await self._finish(message, exc)
            return True
        now = self._clock.time()
        if await self._move(app_id, message.id, (SENT,), REPLIED, now, reply=reply):
            self._announce(message, REPLIED, now, reply=reply, sent=True)
        return True

    async def _kick_later(self, lane: tuple[str, str], delay: float) -> None:
        await asyncio.sleep(delay)
        if self._queued.get(lane) and self._relay.hub.get(*lane) is not None:
            self._kick(lane)

    async def _finish(self, message: Message, exc: CallFailed) -> Message:
        """Record a call that went out and failed; return the message as it is now."""
        # The device refused it, or may have got it: either way it is never sent again.
        state = FAILED if isinstance(exc, DeviceError | InvalidMessage) else DELIVERED
        now = self._clock.time()
        if await self._move(
            message.app_id, message.id, (SENT,), state, now, error=exc.code, detail=str(exc)
        ):
            self._announce(message, state, now, error=exc.code, detail=str(exc), sent=True)
        return dataclasses.replace(
            message, state=state, updated_at=now, error=exc.code, detail=str(exc)
        )

    async def _expire(self, message: Message, now: float) -> None:
        if await self._move(
            message.app_id, message.id, (QUEUED,), EXPIRED, now, error="expired", detail=_EXPIRED
        ):
            self._count((message.app_id, message.device_id), -1)
            self._announce(message, EXPIRED, now, error="expired", detail=_EXPIRED)

    def _announce(
        self,
        message: Message,
        state: str,
        now: float,
        *,
        reply: bytes | None = None,
        error: str | None = None,
        detail: str | None = None,
        sent: bool = False,
    ) -> None:
        """Tell ``notify`` a queued message is final (idempotent calls' callers know already).

        ``message`` is the record as read before it went out; ``sent``: it did go out, which
        the store counted as an attempt.
        """
        if message.mode != "queue":
            return
        metrics.MESSAGES_FINAL.labels(state).inc()
        if self.notify is None:
            return
        final = dataclasses.replace(
            message,
            state=state,
            updated_at=now,
            reply=reply,
            error=error,
            detail=detail,
            attempts=message.attempts + int(sent),
        )
        self.notify(message.app_id, message.device_id, orjson.dumps(message_view(final)))

    def _announce_final(
        self, app_id: str, device_id: str, message_id: str, state: str, error: str, detail: str
    ) -> None:
        """``_announce`` for a message changed in bulk, known only by its id."""
        metrics.MESSAGES_FINAL.labels(state).inc()
        if self.notify is not None:
            view = {"message_id": message_id, "device_id": device_id, "state": state}
            self.notify(app_id, device_id, orjson.dumps({**view, "error": error, "detail": detail}))

    async def _move(
        self,
        app_id: str,
        message_id: str,
        sources: tuple[str, ...],
        target: str,
        now: float,
        **changes: Any,
    ) -> bool:
        """``Store.update_message``, for moves that ``core/lifecycle.py`` has in its table only."""
        for source in sources:
            if not allowed(MESSAGE_TRANSITIONS, source, target):
                raise RuntimeError(f"a message cannot move from {source} to {target}")
        return await self._store.update_message(app_id, message_id, sources, target, now, **changes)

    def _count(self, lane: tuple[str, str], delta: int) -> None:
        metrics.MESSAGES_QUEUED.inc(delta)
        left = self._queued.get(lane, 0) + delta
        if left > 0:
            self._queued[lane] = left
        else:
            self._queued.pop(lane, None)

    async def _sweep(self) -> None:
        # Expiry runs on a timer rather than per message: one indexed UPDATE covers them all.
        last_purge = self._clock.monotonic()
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                if self._queued:
                    for app_id, device_id, message_id in await self._store.expire_messages(
                        self._clock.time()
                    ):
                        self._count((app_id, device_id), -1)
                        self._announce_final(
                            app_id, device_id, message_id, EXPIRED, "expired", _EXPIRED
                        )
                if self._clock.monotonic() - last_purge >= _PURGE_EVERY:
                    last_purge = self._clock.monotonic()
                    await self._store.purge_messages(self._clock.time() - self.settings.retention)
            except Exception:
                log.exception("message sweep failed")

    # -- idempotent calls ------------------------------------------------------------------

    async def call_once(
        self, app_id: str, device_id: str, body: bytes, method: str, timeout: float, key: str
    ) -> tuple[Message, bool]:
        """Make the call once per key; return its final record and whether this ran it.

        Raises:
            CallFailed: nothing reached the device (offline, busy...): nothing is recorded,
                so a retry with the same key tries again.
            KeyReused: ``key`` was used for a different request.
            KeyInProgress: the first call with ``key`` is still running on another node.
        """
        digest = body_hash(device_id, method, body)
        now = self._clock.time()
        record = Message(
            id=new_message_id(),
            app_id=app_id,
            device_id=device_id,
            mode="call",
            method=method,
            body=b"",  # the caller holds the body; the record needs only its hash
            body_hash=digest,
            idempotency_key=key,
            state=SENT,
            created_at=now,
            updated_at=now,
            expires_at=None,
            timeout=timeout,
        )
        stored, created = await self._store.create_message(record)
        if not created:
            _check_same(stored, "call", digest)
            if stored.state in MESSAGE_FINAL:
                return stored, False
            first = self._inflight.get(stored.id)
            if first is None:
                raise KeyInProgress(f"a request with idempotency key {key!r} is still running")
            failure = await asyncio.shield(first)
            if failure is not None:
                raise failure
            # Kept for ``retention``; gone only if the app was deleted meanwhile.
            return (await self._store.get_message(app_id, stored.id)) or stored, False
        done: asyncio.Future[CallFailed | None] = asyncio.get_running_loop().create_future()
        self._inflight[stored.id] = done
        try:
            final = await self._run_call(stored, body)
        except CallFailed as exc:
            done.set_result(exc)
            raise
        except BaseException:
            done.set_result(ShuttingDown("the call was interrupted"))
            raise
        finally:
            self._inflight.pop(stored.id, None)
        done.set_result(None)
        return final, True

    async def _run_call(self, record: Message, body: bytes) -> Message:
        app_id = record.app_id
        try:
            reply = await self._relay.call(
                app_id, record.device_id, body, record.method, record.timeout
            )
        except NOT_SENT:
            # Nothing happened on the device: forget the key so that a retry runs again.
            await self._store.delete_message(app_id, record.id)
            raise
        except CallFailed as exc:
            return await self._finish(record, exc)
        now = self._clock.time()
        await self._move(app_id, record.id, (SENT,), REPLIED, now, reply=reply)
        # Built here rather than read back: one store round trip less on every keyed call.
        return dataclasses.replace(record, state=REPLIED, updated_at=now, reply=reply)


def _check_same(stored: Message, mode: str, digest: str) -> None:
    if stored.mode != mode or stored.body_hash != digest:
        raise KeyReused(
            f"idempotency key {stored.idempotency_key!r} was used for a different request"
            " (another device, method, body or delivery mode)"
        )
