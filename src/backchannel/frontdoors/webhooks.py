"""Webhooks (COMPAT.md, "Webhook"; docs/api.md, "Webhooks"): the outbox's delivery worker.

Each delivery is a row of the store's webhook outbox (``backchannel.core.webhooks`` decides
which rows exist); this worker POSTs them. The body of an ``event`` delivery is the raw event
bytes (``application/octet-stream``), because the only known Cometa receiver reads the body
as the event; ``presence`` and ``call`` bodies are JSON. The headers carry the rest:

- ``X-Backchannel-App``, ``X-Backchannel-Device``;
- ``X-Backchannel-Kind``: ``event``, ``presence`` or ``call``;
- ``X-Backchannel-Event``: the event name (empty for Cometa devices; ``connect`` or
  ``disconnect`` for presence, ``call`` for calls), percent-encoded outside visible ASCII
  and for ``%`` itself, so any name fits in a header;
- ``X-Backchannel-Timestamp``: unix seconds at this attempt;
- ``X-Backchannel-Delivery``: an id derived from the outbox row, the same on every retry
  (and after a restart), so a receiver can drop duplicates;
- ``X-Backchannel-Signature``: ``sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>``.

The signing key is ``sha256_hex(app secret)`` as ASCII, which the app computes from its
secret (``backchannel.sdk.webhooks``). The server never stores the plaintext secret, only
that hash, so the hash is the one secret-derived value it holds to sign with. The
consequence: the stored hash is itself the signing key, so whoever reads the store can forge
webhooks (though not call the API, which needs the plaintext); rotating the app secret
rotates the key.

**Scheduling.** The store hands out, per (app, device), only the oldest pending row, and the
worker runs at most one POST per device at a time, so a device's deliveries arrive in order;
up to ``concurrency`` devices deliver in parallel. A 2xx marks the row delivered; anything
else (status, connection error, 10 s timeout; redirects are not followed) reschedules it
after ``backoff * 2**(attempts-1)`` seconds, capped at ``max_backoff``, until
``max_attempts``, when the row is ``dead`` (listed and retried through the API). New rows
wake the worker at once; a timer wakes it for each retry, and it polls every
``poll_interval`` for anything else (rows left pending by a previous run). Devices never
wait on any of it: rows are written by the event log's writer, off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from backchannel import __version__
from backchannel.core.apps import AppService
from backchannel.core.clock import Clock
from backchannel.core.networks import Network
from backchannel.core.webhooks import EVENT, backoff
from backchannel.frontdoors.app_api import AppApi
from backchannel.frontdoors.egress import DeniedAddress, GuardedResolver, denied_literal
from backchannel.frontdoors.errors import ApiError, json_response
from backchannel.state.store import PENDING, Delivery, Store

log = logging.getLogger(__name__)

DELIVERED = Counter("backchannel_webhook_delivered", "Webhook deliveries the receiver took (2xx)")
RETRIED = Counter("backchannel_webhook_retried", "Webhook attempts that failed")
FAILED = Counter("backchannel_webhook_failed", "Webhook deliveries given up (dead letters)")

# Visible ASCII but ``%`` passes through unchanged; everything else is percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
#: The error of an attempt refused by ``webhook_deny_networks`` (frontdoors/egress.py).
DENIED = "address_denied"
#: Rows of one device read ahead per store query while its lane delivers.
_LANE_AHEAD = 32


def signature(key_hash: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``timestamp + "." + body`` under the app's secret hash."""
    mac = hmac.new(key_hash.encode("ascii"), timestamp.encode("ascii") + b".", hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def delivery_id(row: Delivery) -> str:
    """The ``X-Backchannel-Delivery`` of a row: stable across retries and restarts."""
    seed = f"{row.app_id}/{row.id}/{row.created_at!r}".encode()
    return hashlib.sha256(seed).hexdigest()[:32]


class Webhooks:
    """Delivers the webhook outbox: in order per device, with retries, then dead letters."""

    def __init__(
        self,
        store: Store,
        apps: AppService,
        clock: Clock,
        *,
        timeout: float = 10.0,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        max_attempts: int = 12,
        concurrency: int = 32,
        poll_interval: float = 1.0,
        retention: float = 86400.0,
        denied: Sequence[Network] = (),
    ) -> None:
        self._store = store
        self._apps = apps
        self._clock = clock
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self.max_attempts = max_attempts
        self._concurrency = concurrency
        self._poll = poll_interval
        self._retention = retention
        self._denied = tuple(denied)
        self._url_denied: dict[str, bool] = {}
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        # (app, device) -> the task delivering its head row.
        self._busy: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._next_purge = 0.0
        # Deliveries the receiver took, written to the store in batches by ``_write_marks``
        # (a commit per delivery cost most of a delivery's CPU). Until written, their rows
        # still read as pending: ``_marking`` keeps the scheduler from sending them again.
        self._marks: list[tuple[int, int, int]] = []
        self._marking: set[int] = set()
        self._marks_ready = asyncio.Event()
        self._marker: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client and start delivering (rows left pending included)."""
        connector = (
            aiohttp.TCPConnector(resolver=GuardedResolver(self._denied)) if self._denied else None
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": f"backchannel-webhooks/{__version__}"},
        )
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._run())
        self._marker = loop.create_task(self._write_marks())

    async def stop(self) -> None:
        """Stop delivering; rows not yet delivered stay pending in the store."""
        session, self._session = self._session, None
        tasks = [t for t in (self._loop_task, self._marker, *self._busy.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = self._marker = None
        self._busy.clear()
        if self._marks:
            # Whatever is not written here is delivered again after the restart (at least
            # once), so try once, and do not hold the shutdown on a failing store.
            marks, self._marks = self._marks, []
            try:
                await self._store.mark_delivered_many(marks)
            except Exception:
                log.exception("webhooks: %d deliveries not recorded at shutdown", len(marks))
            self._marking.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if session is not None:
            await session.close()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp ``cleanup_ctx``: run while the server runs."""
        await self.start()
        yield
        await self.stop()

    def wake(self) -> None:
        """Look for due rows now (new rows were enqueued, or a retry is due)."""
        self._wake.set()

    # -- scheduling ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._schedule()
                await self._maybe_purge()
            except Exception:
                log.exception("webhooks: outbox scan failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()

    async def _schedule(self) -> None:
        free = self._concurrency - len(self._busy)
        if free <= 0:
            return
        # Busy devices' heads come back too (they are still pending): ask for that many more.
        rows = await self._store.due_deliveries(self._clock.time(), free + len(self._busy))
        loop = asyncio.get_running_loop()
        for row in rows:
            key = (row.app_id, row.device_id)
            if key in self._busy or row.id in self._marking:
                continue
            self._busy[key] = loop.create_task(self._attempt(key, row))
            free -= 1
            if free <= 0:
                break

    async def _maybe_purge(self) -> None:
        now = self._clock.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + min(3600.0, max(60.0, self._retention / 10))
        purged = await self._store.purge_deliveries(self._clock.time() - self._retention)
        if purged:
            log.debug("webhooks: purged %d delivered rows", purged)

    def _wake_in(self, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(timer)
            self._wake.set()

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    # -- delivery --------------------------------------------------------------------------

    async def _attempt(self, key: tuple[str, str], row: Delivery) -> None:
        # The lane (one device) keeps its slot while its next rows are due, and reads them
        # ahead in small ranges of the index rather than waiting for the scheduler's scan.
        try:
            ahead: deque[Delivery] = deque((row,))
            while ahead:
                current = ahead.popleft()
                if current.next_attempt_at > self._clock.time():
                    break  # a retry waits for its timer
                if not await self._deliver(current) or self._session is None:
                    break
                if not ahead:
                    ahead.extend(await self._store.lane_rows(*key, current.id, _LANE_AHEAD))
        except Exception:
            # The row stays as it was, and is tried again at the next scan.
            log.exception("webhooks: delivery %d of %s/%s failed", row.id, *key)
            self._wake_in(self._backoff)
        finally:
            if self._busy.get(key) is asyncio.current_task():
                del self._busy[key]
            self._wake.set()  # a slot is free for another device

    async def _write_marks(self) -> None:
        while True:
            await self._marks_ready.wait()
            self._marks_ready.clear()
            while self._marks:
                marks, self._marks = self._marks, []
                try:
                    await self._store.mark_delivered_many(marks)
                except Exception:
                    log.exception("webhooks: recording %d deliveries failed; retrying", len(marks))
                    self._marks[:0] = marks
                    await asyncio.sleep(1.0)
                    continue
                for delivery_id, _, _ in marks:
                    self._marking.discard(delivery_id)

    async def _deliver(self, row: Delivery) -> bool:
        """One attempt; True when the row is done with (delivered or dead), False on a retry."""
        # Looked up on every attempt: a changed URL or a rotated secret applies at once.
        app = await self._apps.get(row.app_id)
        attempts = row.attempts + 1
        if app is None or not app.webhook_url:
            await self._store.mark_dead(row.id, attempts, None, "no webhook URL")
            FAILED.inc()
            return True
        status, error = await self._post(app.webhook_url, app.secret_hash, row)
        if status is not None and 200 <= status < 300:
            self._marks.append((row.id, attempts, status))
            self._marking.add(row.id)
            self._marks_ready.set()
            DELIVERED.inc()
            return True
        RETRIED.inc()
        if attempts >= self.max_attempts:
            await self._store.mark_dead(row.id, attempts, status, error)
            FAILED.inc()
            # Never the body or the signature: the log is less protected than the receiver.
            log.warning(
                "webhook delivery %d of %s/%s dead after %d attempts: %s",
                row.id,
                row.app_id,
                row.device_id,
                attempts,
                error,
            )
            return True
        delay = backoff(attempts, self._backoff, self._max_backoff)
        await self._store.reschedule_delivery(
            row.id, attempts, self._clock.time() + delay, status, error
        )
        self._wake_in(delay)
        return False

    async def _post(self, url: str, key_hash: str, row: Delivery) -> tuple[int | None, str]:
        """POST once; return the status (None without one) and what went wrong ("" on 2xx)."""
        session = self._session
        if session is None:
            return None, "stopped"
        denied = self._url_denied.get(url)
        if denied is None:
            # Per URL, not per attempt: an app's URL rarely changes, and deliveries are many.
            if len(self._url_denied) > 4096:
                self._url_denied.clear()
            denied = self._url_denied[url] = denied_literal(url, self._denied)
        if denied:
            return None, DENIED
        timestamp = str(int(self._clock.time()))
        headers = {
            "Content-Type": "application/octet-stream" if row.kind == EVENT else "application/json",
            "X-Backchannel-App": row.app_id,
            "X-Backchannel-Device": row.device_id,
            "X-Backchannel-Kind": row.kind,
            "X-Backchannel-Event": quote(row.event_name, safe=_HEADER_SAFE),
            "X-Backchannel-Timestamp": timestamp,
            "X-Backchannel-Delivery": delivery_id(row),
            "X-Backchannel-Signature": "sha256=" + signature(key_hash, timestamp, row.body),
        }
        try:
            async with session.post(
                url, data=row.body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return resp.status, ""
                return resp.status, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(getattr(exc, "os_error", None), DeniedAddress):
                return None, DENIED
            # The type only: some messages quote the URL, which may hold a credential.
            return None, type(exc).__name__ or "error"


def dead_json(row: Delivery) -> dict[str, Any]:
    """The public view of a dead delivery (never its body)."""
    return {
        "id": row.id,
        "kind": row.kind,
        "device_id": row.device_id,
        "event_id": row.event_id,
        "event": row.event_name,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "created_at": row.created_at,
    }


class WebhookApi:
    """Dead letters and outbox counts under ``/v1/applications/{app_id}/webhooks``."""

    def __init__(self, store: Store, api: AppApi, webhooks: Webhooks, clock: Clock) -> None:
        self._store = store
        self._api = api
        self._webhooks = webhooks
        self._clock = clock

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        base = "/v1/applications/{app_id}/webhooks"
        app.router.add_get(base, self.status)
        app.router.add_get(base + "/dead", self.dead)
        app.router.add_post(base + "/dead/{delivery_id}/retry", self.retry)

    async def status(self, request: web.Request) -> web.Response:
        """The webhook URL, kinds, and how many deliveries are in each state."""
        app = await self._api.authorize(request)
        counts = await self._store.count_deliveries(app.app_id)
        return json_response(
            {
                "webhook_url": app.webhook_url,
                "webhook_kinds": list(app.webhook_kinds),
                "max_attempts": self._webhooks.max_attempts,
                **counts,
            }
        )

    async def dead(self, request: web.Request) -> web.Response:
        """The application's dead deliveries, oldest first (``?limit=``, default 100)."""
        app = await self._api.authorize(request)
        raw = request.query.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise ApiError(400, "invalid_limit", "limit must be 1 to 1000")
        rows = await self._store.list_dead_deliveries(app.app_id, int(raw))
        return json_response({"dead": [dead_json(r) for r in rows]})

    async def retry(self, request: web.Request) -> web.Response:
        """Make a dead delivery pending again, with a fresh count of attempts."""
        app = await self._api.authorize(request)
        raw = request.match_info["delivery_id"]
        if not raw.isdigit():
            raise ApiError(404, "not_found", f"no dead delivery {raw}")
        if not await self._store.retry_dead_delivery(app.app_id, int(raw), self._clock.time()):
            raise ApiError(404, "not_found", f"no dead delivery {raw}")
        self._webhooks.wake()
        return json_response({"id": int(raw), "state": PENDING})
