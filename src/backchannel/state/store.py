"""The store interface: durable records of applications, device credentials and settings.

Implementations live beside this file (``memory.py``, ``sqlite.py``; ``redis.py`` for cluster
mode) and all pass the one contract suite in ``tests/contract/test_store.py``. The store holds
only *hashes* of secrets; it never sees a plaintext secret or key.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class StoreError(Exception):
    """Base class of store failures."""


class AlreadyExists(StoreError):
    """A record with the same key exists."""


@dataclass(frozen=True, slots=True)
class AppRecord:
    """One application: the tenant boundary of the relay."""

    app_id: str
    name: str
    secret_hash: str
    created_at: float
    webhook_url: str | None = None
    default_timeout: float | None = None
    allow_open_attach: bool = False
    allowed_devices: tuple[str, ...] = ()
    #: What the webhook receives: ``event`` (device events), ``presence``, ``call``.
    webhook_kinds: tuple[str, ...] = ("event",)


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """The hashed key a device authenticates with, and the tags given at provisioning."""

    app_id: str
    device_id: str
    key_hash: str
    created_at: float
    tags: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TunnelToken:
    """A Socket2me token, by its hash: it names a public ``/go/{token}`` URL until it expires."""

    token_hash: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class TunnelName:
    """A native tunnel's reserved name, its owner (a device credential) and its token hash."""

    name: str
    app_id: str
    device_id: str
    token_hash: str
    created_at: float


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append to the log: the store gives it an id."""

    app_id: str
    device_id: str
    type: str
    data: bytes
    ts: float
    #: The device's own event name (the webhook's ``X-Backchannel-Event``); not stored.
    name: str = ""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event in the log, with the id the store gave it (increasing, never reused)."""

    id: int
    app_id: str
    device_id: str
    type: str
    data: bytes
    ts: float


#: Webhook outbox states.
PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A webhook delivery to put in the outbox (``event_id``: filled by ``append_events``)."""

    app_id: str
    device_id: str
    kind: str
    event_name: str
    body: bytes
    created_at: float
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One row of the webhook outbox."""

    id: int
    app_id: str
    device_id: str
    kind: str
    event_id: int | None
    event_name: str
    body: bytes
    created_at: float
    attempts: int
    next_attempt_at: float
    state: str
    last_status: int | None
    last_error: str | None


#: Message states (``GET .../messages/{id}``); the last four are final.
QUEUED = "queued"  # waiting for the device (or for its turn)
SENT = "sent"  # handed to the device's connection, awaiting the reply
REPLIED = "replied"  # the device replied; the reply is kept
FAILED = "failed"  # the device answered with an error, or the message cannot be delivered
# ``delivered`` (the outbox's DELIVERED): handed over, but no reply came (see ``error``);
# never sent again, because the device may have acted on it.
EXPIRED = "expired"  # the TTL passed before the device took it
MESSAGE_FINAL = (REPLIED, FAILED, DELIVERED, EXPIRED)


@dataclass(frozen=True, slots=True)
class Message:
    """A message to one device: queued for later delivery, or a call made idempotent by key."""

    id: str
    app_id: str
    device_id: str
    #: ``queue`` (answered 202, delivered when the device is there) or ``call`` (answered
    #: synchronously; recorded only because it carried an ``Idempotency-Key``).
    mode: str
    method: str
    body: bytes
    body_hash: str
    idempotency_key: str | None
    state: str
    created_at: float
    updated_at: float
    expires_at: float | None
    #: Seconds the device gets to reply once the message is handed to it.
    timeout: float
    attempts: int = 0
    reply: bytes | None = None
    error: str | None = None
    detail: str | None = None
    #: Order of creation (given by the store): queued messages go out in this order.
    seq: int = 0


class Store(Protocol):
    """Durable state. Every method is a coroutine and safe to call from the event loop.

    Contracts (checked by the contract suite for every implementation):
      - ``get_*`` return ``None`` for a missing record, never raise for it.
      - ``create_app`` raises :class:`AlreadyExists` for a taken ``app_id``.
      - ``delete_app`` also deletes the app's device credentials.
      - ``put_device_credential`` inserts or replaces (re-provisioning rotates the key).
      - Lists are ordered by creation time, then by id.
      - ``create_tunnel_token`` raises :class:`AlreadyExists` for a taken hash;
        ``extend_tunnel_token`` changes only an existing token.
      - ``claim_tunnel_name`` inserts the name unless it exists, and returns the record that
        holds the name afterwards (the caller compares owners).
      - ``delete_app`` also deletes the app's tunnel names and events.
      - Event ids are integers from 1, increasing in the order of ``append_events`` (within a
        batch too) across every application, and never reused, even after a trim or a
        restart; ``last_event_id`` is the highest id ever given.
      - ``append_events`` writes its whole batch or nothing (one transaction), together
        with the outbox rows given beside it.
      - Webhook outbox ids increase and are never reused. ``due_deliveries`` returns, per
        (app, device), only the oldest ``pending`` row, and only if its time has come.
        ``delete_app`` also deletes the app's outbox rows.
      - ``create_message`` gives ``seq`` (increasing); a message whose (app, idempotency
        key) is taken is not written, and the one holding the key is returned instead.
        ``update_message`` changes a message only while its state is one of
        ``from_states`` (compare and set). ``delete_app`` also deletes the app's messages.
      - Data written before ``close()`` is readable after a new ``open()`` on the same
        location (except for the memory store, which keeps nothing).
    """

    async def open(self) -> None:
        """Connect, create the schema if needed."""

    async def close(self) -> None:
        """Flush and release resources; idempotent."""

    async def create_app(self, app: AppRecord) -> None:
        """Insert a new application."""

    async def get_app(self, app_id: str) -> AppRecord | None:
        """Return one application or None."""

    async def list_apps(self) -> list[AppRecord]:
        """Return all applications."""

    async def update_app(self, app: AppRecord) -> bool:
        """Replace the record with the same ``app_id``; False when there is none."""

    async def delete_app(self, app_id: str) -> bool:
        """Delete an application and its credentials; False when there was none."""

    async def put_device_credential(self, cred: DeviceCredential) -> None:
        """Insert or replace a device credential."""

    async def get_device_credential(self, app_id: str, device_id: str) -> DeviceCredential | None:
        """Return one device credential or None."""

    async def list_device_credentials(self, app_id: str) -> list[DeviceCredential]:
        """Return the credentials of one application."""

    async def delete_device_credential(self, app_id: str, device_id: str) -> bool:
        """Delete one credential; False when there was none."""

    async def get_setting(self, name: str) -> str | None:
        """Return a server setting (such as the admin token hash) or None."""

    async def set_setting(self, name: str, value: str) -> None:
        """Store a server setting."""

    async def create_tunnel_token(self, token: TunnelToken) -> None:
        """Insert a new tunnel token."""
        ...

    async def get_tunnel_token(self, token_hash: str) -> TunnelToken | None:
        """Return one tunnel token (expired or not) or None."""
        ...

    async def extend_tunnel_token(self, token_hash: str, expires_at: float) -> bool:
        """Set a token's expiry; False when there is no such token."""
        ...

    async def delete_tunnel_token(self, token_hash: str) -> bool:
        """Delete one token; False when there was none."""
        ...

    async def delete_expired_tunnel_tokens(self, now: float) -> int:
        """Delete every token with ``expires_at <= now``; return how many went."""
        ...

    async def claim_tunnel_name(self, record: TunnelName) -> TunnelName:
        """Reserve ``record.name`` unless taken; return whichever record holds it now."""
        ...

    async def get_tunnel_name(self, name: str) -> TunnelName | None:
        """Return one reserved name or None."""
        ...

    async def get_tunnel_name_by_token(self, token_hash: str) -> TunnelName | None:
        """Return the reserved name whose token has this hash, or None."""
        ...

    async def delete_tunnel_name(self, name: str) -> bool:
        """Release a name; False when it was not reserved."""
        ...

    async def append_events(
        self, events: list[NewEvent], outbox: Sequence[NewDelivery | None] | None = None
    ) -> list[StoredEvent]:
        """Append a batch in one transaction; return it with its ids, in the same order.

        ``outbox``, when given, runs beside ``events``: each non-None entry is enqueued in
        the same transaction with ``event_id`` set to its event's id.
        """
        ...

    async def read_events(
        self,
        app_id: str,
        after_id: int,
        limit: int,
        devices: Collection[str] | None = None,
        types: Collection[str] | None = None,
    ) -> list[StoredEvent]:
        """Up to ``limit`` events of the app with ``id > after_id``, oldest first.

        ``devices`` and ``types``, when given, keep only events whose ``device_id`` (and
        ``type``) is one of them.
        """
        ...

    async def last_event_id(self) -> int:
        """The highest event id ever given (0 when none was), trimmed events included."""
        ...

    async def trim_events(
        self, max_per_app: int, older_than: float, app_ids: Collection[str] | None = None
    ) -> int:
        """Delete events with ``ts < older_than``, and each app's oldest beyond ``max_per_app``.

        ``app_ids`` limits the count rule to those applications (the ones that received
        events since the last trim); None applies it to every application. The age rule
        always applies to all. Returns how many events were deleted.
        """
        ...

    # -- webhook outbox ------------------------------------------------------------------

    async def enqueue_deliveries(self, rows: list[NewDelivery]) -> list[int]:
        """Add ``pending`` rows due at their ``created_at``, in one transaction; their ids."""
        ...

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Up to ``limit`` rows, oldest first: each (app, device)'s oldest pending row, if due."""
        ...

    async def lane_rows(
        self, app_id: str, device_id: str, after_id: int, limit: int
    ) -> list[Delivery]:
        """The device's pending rows with an id above ``after_id``, oldest first, due or not."""
        ...

    async def mark_delivered(self, delivery_id: int, attempts: int, status: int) -> None:
        """Record a delivery the receiver took."""
        ...

    async def mark_delivered_many(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Record many deliveries at once: (id, attempts, status) each; one transaction."""
        ...

    async def reschedule_delivery(
        self,
        delivery_id: int,
        attempts: int,
        next_attempt_at: float,
        status: int | None,
        error: str,
    ) -> None:
        """Record a failed attempt; the row stays pending until ``next_attempt_at``."""
        ...

    async def mark_dead(
        self, delivery_id: int, attempts: int, status: int | None, error: str
    ) -> None:
        """Give a row up after its last failed attempt."""
        ...

    async def list_dead_deliveries(self, app_id: str, limit: int) -> list[Delivery]:
        """The app's dead rows, oldest first."""
        ...

    async def retry_dead_delivery(self, app_id: str, delivery_id: int, now: float) -> bool:
        """Make a dead row of the app pending again (attempts from 0); False if none."""
        ...

    async def count_deliveries(self, app_id: str) -> dict[str, int]:
        """How many rows of the app are in each state (every state is a key)."""
        ...

    async def purge_deliveries(self, older_than: float) -> int:
        """Delete delivered rows created before ``older_than``; return how many."""
        ...

    # -- messages (offline queue and idempotent calls) -------------------------------------

    async def create_message(self, message: Message) -> tuple[Message, bool]:
        """Insert a message; on a taken idempotency key return (holder, False) instead."""
        ...

    async def create_messages(self, messages: Sequence[Message]) -> list[Message]:
        """Insert many messages without idempotency keys in one transaction; give each a seq."""
        ...

    async def get_message(self, app_id: str, message_id: str) -> Message | None:
        """One message of the app, or None."""
        ...

    async def list_messages(
        self,
        app_id: str,
        device_id: str | None,
        states: Collection[str],
        limit: int,
        after_seq: int = 0,
    ) -> list[Message]:
        """Messages of a device (None: of every device of the app) in the given states (all
        when empty) with a seq above ``after_seq``, oldest first."""
        ...

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
        ...

    async def delete_message(self, app_id: str, message_id: str) -> bool:
        """Forget a message (an idempotent call that changed nothing can be made again)."""
        ...

    async def get_message_by_key(self, app_id: str, key: str) -> Message | None:
        """The app's message holding an idempotency key, or None."""
        ...

    async def expire_messages(self, now: float) -> list[tuple[str, str, str]]:
        """Mark queued messages whose TTL passed as expired; return their (app, device, id)."""
        ...

    async def queued_devices(self) -> dict[tuple[str, str], int]:
        """How many messages are queued per (app, device) that has any."""
        ...

    async def interrupt_sent_messages(
        self, now: float, detail: str
    ) -> list[tuple[str, str, str, str]]:
        """After a restart: ``sent`` messages become ``delivered`` with error ``interrupted``.

        Returns their (app, device, id, mode).
        """
        ...

    async def purge_messages(self, older_than: float) -> int:
        """Delete final messages last changed before ``older_than``; return how many."""
        ...
