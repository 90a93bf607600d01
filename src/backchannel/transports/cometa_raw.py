"""Cometa devices: raw HTTP attach, then chunk frames on the same socket (COMPAT.md).

The sniffer hands over connections that start with a Cometa attach request. This adapter
feeds their bytes to :class:`~backchannel.wire.cometa.CometaConnection` and adapts them to
the core's ``Session``. Authentication is the core's decision (open attach, allow-lists, or
an optional ``Authorization: Bearer <device key>`` header on the attach request).

Cometa devices carry no request id, so a reply answers the single pending message. Calls
are therefore queued and delivered one by one, each within its own timeout. When a call
times out after delivery, its reply may still come: the session then *owes* that reply
(a count, since several calls in a row may time out). Nothing more is delivered while a
reply is owed. Replies arriving meanwhile pay off the debt and are dropped. If the debt is
not paid within ``stale_grace`` seconds of the last timeout, the session is closed: the
device reconnects with a clean stream. So a late reply is never handed to a later request;
the price of a device that never answers is one reconnect. Calls that were queued and never
delivered fail as "device offline" (nothing was sent; safe to retry), never as "maybe
delivered".
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

from backchannel.core import metrics
from backchannel.core.apps import AppService
from backchannel.core.outcomes import (
    DeviceBusy,
    DeviceDisconnected,
    DeviceOffline,
    InvalidMessage,
    NoReply,
    ShuttingDown,
    TimedOutBeforeDelivery,
)
from backchannel.core.relay import EventBacklog, Relay
from backchannel.core.session import CloseReason, SessionStats, record_latency
from backchannel.wire.cometa import (
    AttachRequest,
    CometaConnection,
    Reply,
    Upstream,
    accept_head,
    parse_attach,
    reject,
)
from backchannel.wire.errors import ProtocolError

log = logging.getLogger(__name__)

ANNOUNCED_HEARTBEAT = 60  # seconds, in the first chunk; the clients' own interval
HANDSHAKE_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class CometaSettings:
    """Limits and timers of Cometa sessions."""

    max_message: int
    liveness: float = 120.0
    stale_grace: float = 5.0
    max_queue: int = 1000


class CometaSession(asyncio.Protocol):
    """One Cometa device connection: an asyncio protocol and a core ``Session``."""

    transport = "cometa"

    def __init__(self, relay: Relay, apps: AppService, settings: CometaSettings) -> None:
        self._relay = relay
        self._apps = apps
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._io: asyncio.Transport | None = None
        self._head = bytearray()
        self._early: bytearray | None = None  # bytes that arrive while we authenticate
        self._conn: CometaConnection | None = None
        self._registered = False
        self._closed = False
        self._close_reason = CloseReason.PEER_CLOSED
        self._current: asyncio.Future[bytes] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._busy = False
        self._owed = 0  # replies owed by calls that timed out after delivery
        self._owed_deadline = 0.0
        self._owed_paid: asyncio.Event = asyncio.Event()
        self._writable: asyncio.Event = asyncio.Event()
        self._writable.set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self.app_id = ""
        self.device_id = ""
        self.session_id = secrets.token_hex(8)
        self.stats = SessionStats(connected_at=time.time(), remote="")

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start reading the attach request."""
        self._io = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.stats.remote = f"{peer[0]}:{peer[1]}"
        self._handshake_timer = self._loop.call_later(HANDSHAKE_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        """Attach request first, then chunk frames."""
        if self._conn is not None:
            self._frames(data)
        elif self._early is not None:
            self._early += data
        else:
            self._handshake(data)

    def pause_writing(self) -> None:
        """The device reads slowly: hold further messages."""
        self._writable.clear()

    def resume_writing(self) -> None:
        """The device caught up."""
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed: fail what is in flight and forget the session."""
        self._closed = True
        self._fail_current(self._close_reason)
        self._wake_all()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._registered:
            self._relay.spawn(self._relay.unregister(self, self._close_reason))

    # -- handshake -----------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        self._head += data
        try:
            request = parse_attach(bytes(self._head))
        except ProtocolError as exc:
            log.info("bad Cometa attach from %s: %s", self.stats.remote, exc)
            self._refuse(400, "Bad Request")
            return
        if request is None:
            return
        self._early = bytearray(self._head[request.consumed :])
        self._head = bytearray()
        self._relay.spawn(self._attach(request))

    async def _attach(self, request: AttachRequest) -> None:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        verdict = await self._apps.authenticate_device(request.app_id, request.device_id, key)
        if self._closed:
            return
        if not verdict.accepted:
            log.info(
                "Cometa attach refused: %s/%s (%s)",
                request.app_id,
                request.device_id,
                verdict.value,
            )
            self._refuse(403, "Forbidden")
            return
        if self._relay.closing:
            self._refuse(503, "Service Unavailable")
            return
        assert self._io is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.app_id, self.device_id = request.app_id, request.device_id
        self.stats.info = request.platform[:200]
        self.stats.last_seen = time.time()
        now = self._loop.time()
        self._conn = CometaConnection(max_chunk=self._settings.max_message, now=now)
        self._io.write(accept_head(ANNOUNCED_HEARTBEAT, int(time.time())))
        try:
            await self._relay.register(self)
        except ShuttingDown:
            self._io.close()
            return
        self._registered = True
        early, self._early = bytes(self._early or b""), None
        if early:
            self._frames(early)

    def _refuse(self, status: int, reason: str) -> None:
        if self._io is not None:
            self._io.write(reject(status, reason))
            self._io.close()
        self._closed = True

    # -- frames from the device ------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        stats = self.stats
        try:
            events = conn.receive_data(data, self._loop.time())
        except ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.labels(self.transport).inc()
            log.warning("Cometa framing broken by %s/%s: %s", self.app_id, self.device_id, exc)
            self._close_reason = CloseReason.PROTOCOL_ERROR
            self._shut()
            return
        stats.rx_bytes += len(data)
        if events:
            # Any frame proves the device alive, not only the 60-second heartbeat.
            stats.last_seen = time.time()
        upstream = False
        for event in events:
            stats.rx_messages += 1
            if isinstance(event, Reply):
                self._reply(event.body)
            elif isinstance(event, Upstream):
                upstream = True
                self._relay.device_event(self, "", event.data)
        backlog = self._relay.event_backlog
        if upstream and backlog is not None and backlog.congested and not self._reading_paused:
            # The event log is behind: stop reading this device until it caught up.
            self._reading_paused = True
            if self._io is not None:
                self._io.pause_reading()
            self._relay.spawn(self._resume_reading(backlog))

    async def _resume_reading(self, backlog: EventBacklog) -> None:
        try:
            await backlog.room()
        finally:
            self._reading_paused = False
            if self._io is not None and not self._closed:
                self._io.resume_reading()

    def _reply(self, body: bytes) -> None:
        if self._owed:
            # Replies come in order: this is the late answer to a call that timed out.
            self._owed -= 1
            if not self._owed:
                self._owed_paid.set()
            metrics.LATE_REPLIES.inc()
            return
        current = self._current
        if current is not None and not current.done():
            current.set_result(body)
        else:
            metrics.LATE_REPLIES.inc()  # an answer nobody asked for

    # -- Session ----------------------------------------------------------------------------

    async def call(self, body: bytes, method: str, timeout: float) -> bytes:
        """Queue behind earlier calls, then deliver ``body`` and wait for the one reply."""
        if self._closed:
            raise DeviceOffline(f"device {self.device_id} is not connected")
        if not body:
            raise InvalidMessage("a Cometa device cannot receive an empty message")
        if len(self._waiters) >= self._settings.max_queue:
            raise DeviceBusy(f"device {self.device_id} has {len(self._waiters)} calls queued")
        loop = self._loop
        deadline = loop.time() + timeout
        self.stats.calls += 1
        if not self._busy and not self._waiters and not self._owed and self._writable.is_set():
            # Idle session, nothing owed, socket writable: no queue to wait in, so skip the
            # timeout scope (the common case when devices outnumber concurrent callers).
            self._busy = True
        else:
            await self._wait_for_turn(deadline, timeout)
        if self._closed:
            self._release_turn()
            raise DeviceOffline(
                f"device disconnected before the message was delivered "
                f"({self._close_reason.value}); nothing was sent"
            )
        conn, io = self._conn, self._io
        assert conn is not None and io is not None
        future: asyncio.Future[bytes] = loop.create_future()
        self._current = future
        frame = conn.message(body)
        # perf_counter, not loop.time(): uvloop's clock has whole-millisecond steps.
        started = time.perf_counter()
        io.write(frame)
        self.stats.tx_bytes += len(frame)
        self.stats.tx_messages += 1
        timer = loop.call_at(deadline, _expire, future)
        try:
            reply = await future
        except TimeoutError:
            self.stats.errors += 1
            self._owed += 1
            self._owed_deadline = loop.time() + self._settings.stale_grace
            self._owed_paid.clear()
            raise NoReply(timeout) from None
        finally:
            timer.cancel()
            self._current = None
            self._release_turn()
        record_latency(self.stats, (time.perf_counter() - started) * 1000.0)
        return reply

    async def _wait_for_turn(self, deadline: float, timeout: float) -> None:
        held = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._take_turn()
                held = True
                await self._settle_stale()
                await self._writable.wait()
        except TimeoutError:
            if held:
                self._release_turn()
            self.stats.errors += 1
            raise TimedOutBeforeDelivery(timeout) from None

    async def _take_turn(self) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._busy = True  # we were handed the turn as we gave up: pass it on
                self._release_turn()
            raise
        self._busy = True

    def _release_turn(self) -> None:
        self._busy = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy = True  # reserved for the woken waiter
                waiter.set_result(None)
                return

    async def _settle_stale(self) -> None:
        if not self._owed:
            return
        try:
            async with asyncio.timeout_at(self._owed_deadline):
                await self._owed_paid.wait()
        except TimeoutError:
            pass
        if self._owed and not self._closed:
            log.info(
                "Cometa device %s/%s still owes %d late replies after %g s: reconnecting it "
                "so that no late reply answers a later message",
                self.app_id,
                self.device_id,
                self._owed,
                self._settings.stale_grace,
            )
            self._close_reason = CloseReason.REPLY_ORDER_LOST
            self._shut()

    def in_flight(self) -> int:
        """The call on the wire plus the queued ones."""
        return len(self._waiters) + (1 if self._current is not None else 0)

    def tick(self, now: float) -> None:
        """Drop a device that sent nothing for the liveness period."""
        conn = self._conn
        if conn is not None and not self._closed and conn.is_dead(now, self._settings.liveness):
            log.info("Cometa device %s/%s silent: dropping", self.app_id, self.device_id)
            self._close_reason = CloseReason.HEARTBEAT_TIMEOUT
            self._shut()

    async def close(self, reason: CloseReason, detail: str = "") -> None:
        """Close the socket (Cometa has no close codes; the device reconnects)."""
        self._close_reason = reason
        self._shut()

    def _shut(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_current(self._close_reason)
        self._wake_all()
        if self._io is not None:
            self._io.close()

    def _fail_current(self, reason: CloseReason) -> None:
        if self._current is not None and not self._current.done():
            self._current.set_exception(DeviceDisconnected(f"device disconnected ({reason.value})"))

    def _wake_all(self) -> None:
        # Queued callers wake up, see the session closed, and fail with DeviceDisconnected.
        self._owed_paid.set()
        self._writable.set()
        if not self._busy:
            self._release_turn()


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class CometaTransport:
    """Makes a :class:`CometaSession` for each connection the sniffer recognises."""

    def __init__(self, relay: Relay, apps: AppService, settings: CometaSettings) -> None:
        self._relay = relay
        self._apps = apps
        self._settings = settings

    def __call__(self) -> CometaSession:
        """Protocol factory for the sniffer."""
        return CometaSession(self._relay, self._apps, self._settings)
