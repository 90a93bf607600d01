"""Event webhooks (COMPAT.md, "Webhook"): every upstream event is POSTed to the app's URL.

The body is the raw event bytes (``application/octet-stream``), because the only known
Cometa receiver reads the body as the event. The headers carry the rest:

- ``X-Backchannel-App``, ``X-Backchannel-Device``;
- ``X-Backchannel-Event``: the event name (empty for Cometa devices), percent-encoded
  outside visible ASCII and for ``%`` itself, so any name fits in a header;
- ``X-Backchannel-Timestamp``: unix seconds at this attempt;
- ``X-Backchannel-Delivery``: a random id, the same on every retry of one event, so a
  receiver can drop duplicates;
- ``X-Backchannel-Signature``: ``sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>``.

The signing key is ``sha256_hex(app secret)`` as ASCII, which the app computes from its
secret (``backchannel.sdk.webhooks``). The server never stores the plaintext secret, only
that hash, so the hash is the one secret-derived value it holds to sign with. The
consequence: the stored hash is itself the signing key, so whoever reads the store can forge
webhooks (though not call the API, which needs the plaintext); rotating the app secret
rotates the key.

Delivery never blocks the device: the listener appends to a bounded in-memory queue per
application, and workers POST. Events of one device share a lane, so they arrive in order;
lanes let one app's devices deliver concurrently. Queued events are lost at a restart; the
durable outbox comes later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from backchannel import __version__
from backchannel.core.apps import AppService
from backchannel.core.clock import Clock

log = logging.getLogger(__name__)

DROPPED = Counter("backchannel_webhook_dropped", "Webhook events dropped from a full queue")
DELIVERED = Counter("backchannel_webhook_delivered", "Webhook events the receiver took (2xx)")
FAILED = Counter("backchannel_webhook_failed", "Webhook events given up after every attempt")

# Visible ASCII but ``%`` passes through unchanged; everything else is percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def signature(key_hash: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``timestamp + "." + body`` under the app's secret hash."""
    mac = hmac.new(key_hash.encode("ascii"), timestamp.encode("ascii") + b".", hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


@dataclass(slots=True)
class _Event:
    seq: int
    app_id: str
    device_id: str
    name: str
    data: bytes


class _AppQueue:
    """One application's pending events, in lanes by device, and a worker per busy lane."""

    __slots__ = ("lanes", "nbytes", "size", "workers")

    def __init__(self, lanes: int) -> None:
        self.lanes: list[deque[_Event]] = [deque() for _ in range(lanes)]
        self.workers: list[asyncio.Task[None] | None] = [None] * lanes
        self.size = 0
        self.nbytes = 0

    def pop(self, lane: int) -> _Event:
        event = self.lanes[lane].popleft()
        self.size -= 1
        self.nbytes -= len(event.data)
        return event

    def drop_oldest(self) -> None:
        oldest = min((i for i, lane in enumerate(self.lanes) if lane), key=self._head_seq)
        self.pop(oldest)

    def _head_seq(self, lane: int) -> int:
        return self.lanes[lane][0].seq

    def idle(self) -> bool:
        return self.size == 0 and all(w is None for w in self.workers)


class Webhooks:
    """Queues upstream events of apps with a webhook URL and delivers them with retries."""

    def __init__(
        self,
        apps: AppService,
        clock: Clock,
        *,
        max_events: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        lanes: int = 4,
        timeout: float = 10.0,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        attempts: int = 8,
        hook_ttl: float = 2.0,
    ) -> None:
        self._apps = apps
        self._clock = clock
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._lanes = lanes
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._attempts = attempts
        self._hook_ttl = hook_ttl
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[str, _AppQueue] = {}
        # app id -> (until, has a webhook): lets the listener skip apps without one
        # synchronously; it is refreshed by every delivery attempt, so a webhook URL newly
        # set on an app takes effect within ``hook_ttl`` plus the AppService cache time.
        self._hooked: dict[str, tuple[float, bool]] = {}
        self._seq = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client; events are taken from now on."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": f"backchannel-webhooks/{__version__}"},
        )

    async def stop(self) -> None:
        """Cancel the workers and close the client; events still queued are lost."""
        session, self._session = self._session, None
        workers = [w for q in self._queues.values() for w in q.workers if w is not None]
        pending = sum(q.size for q in self._queues.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._queues.clear()
        if pending:
            log.warning("webhooks stopped with %d undelivered events", pending)
        if session is not None:
            await session.close()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp ``cleanup_ctx``: run while the server runs."""
        await self.start()
        yield
        await self.stop()

    # -- the relay listener ----------------------------------------------------------------

    def on_event(self, app_id: str, device_id: str, name: str, data: bytes) -> None:
        """Queue an upstream event for its app's webhook; never blocks, never awaits."""
        if self._session is None:
            return
        hooked = self._hooked.get(app_id)
        if hooked is not None and not hooked[1] and hooked[0] > self._clock.monotonic():
            return
        queue = self._queues.get(app_id)
        if queue is None:
            queue = self._queues[app_id] = _AppQueue(self._lanes)
        while queue.size and (
            queue.size >= self._max_events or queue.nbytes + len(data) > self._max_bytes
        ):
            queue.drop_oldest()
            DROPPED.inc()
        self._seq += 1
        lane = hash(device_id) % self._lanes
        queue.lanes[lane].append(_Event(self._seq, app_id, device_id, name, data))
        queue.size += 1
        queue.nbytes += len(data)
        if queue.workers[lane] is None:
            worker = asyncio.get_running_loop().create_task(self._work(app_id, queue, lane))
            queue.workers[lane] = worker

    # -- delivery --------------------------------------------------------------------------

    async def _work(self, app_id: str, queue: _AppQueue, lane: int) -> None:
        try:
            while queue.lanes[lane]:
                event = queue.pop(lane)
                try:
                    await self._deliver(event)
                except Exception:
                    # Keep the lane moving: one bad event must not strand the ones behind it.
                    log.exception("webhook delivery failed for %s/%s", app_id, event.device_id)
        finally:
            queue.workers[lane] = None
            if queue.idle() and self._queues.get(app_id) is queue:
                del self._queues[app_id]

    async def _deliver(self, event: _Event) -> None:
        delivery = secrets.token_hex(16)
        outcome = ""
        for attempt in range(1, self._attempts + 1):
            # Looked up on every attempt: a changed URL or a rotated secret applies at once.
            app = await self._apps.get(event.app_id)
            url = app.webhook_url if app is not None else None
            expires = self._clock.monotonic() + self._hook_ttl
            self._hooked[event.app_id] = (expires, url is not None)
            if app is None or url is None:
                return  # the webhook was removed (or the app deleted) since the event
            outcome = await self._post(url, app.secret_hash, event, delivery)
            if not outcome:
                DELIVERED.inc()
                return
            if attempt < self._attempts:
                await asyncio.sleep(min(self._backoff * 2 ** (attempt - 1), self._max_backoff))
        FAILED.inc()
        # Never the body or the signature: the log is less protected than the receiver.
        log.warning(
            "webhook delivery %s of %s/%s dropped after %d attempts: %s",
            delivery,
            event.app_id,
            event.device_id,
            self._attempts,
            outcome,
        )

    async def _post(self, url: str, key_hash: str, event: _Event, delivery: str) -> str:
        """POST once; return "" on a 2xx, else what went wrong."""
        session = self._session
        if session is None:
            return "stopped"
        timestamp = str(int(self._clock.time()))
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Backchannel-App": event.app_id,
            "X-Backchannel-Device": event.device_id,
            "X-Backchannel-Event": quote(event.name, safe=_HEADER_SAFE),
            "X-Backchannel-Timestamp": timestamp,
            "X-Backchannel-Delivery": delivery,
            "X-Backchannel-Signature": "sha256=" + signature(key_hash, timestamp, event.data),
        }
        try:
            async with session.post(
                url, data=event.data, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return ""
                return f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The type only: some messages quote the URL, which may hold a credential.
            return type(exc).__name__
