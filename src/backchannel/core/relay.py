"""The relay facade: what front doors and transports call. It knows no HTTP and no frames.

Lookups go to this node's :class:`Hub` first; only a miss asks the broker, so the
embedded single-node server never pays for cluster routing, and no front door assumes the
device's session lives in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from backchannel.core import metrics
from backchannel.core.appstats import AppStats
from backchannel.core.clock import Clock
from backchannel.core.hub import Hub
from backchannel.core.outcomes import CallFailed, DeviceOffline, ShuttingDown
from backchannel.core.presence import presence
from backchannel.core.session import CloseReason, Session
from backchannel.core.topics import TopicIndex, validate_topic
from backchannel.routing.broker import Broker

log = logging.getLogger(__name__)

#: Called for every upstream event: (app_id, device_id, name, data). Must not block.
EventListener = Callable[[str, str, str, bytes], None]
#: Called when a device's session ends on this node: (app_id, device_id, reason).
DisconnectListener = Callable[[str, str, CloseReason], None]
#: Called when a session became the device's live session on this node, a takeover
#: included: (app_id, device_id, session). Must not block.
ConnectListener = Callable[[str, str, Session], None]
#: Called when a call made through this node ends: (app_id, device_id, error code or None
#: for a reply, duration in ms). Must not block.
CallListener = Callable[[str, str, str | None, float], None]


class EventBacklog(Protocol):
    """The event log's backlog, as transports see it: when to stop reading devices."""

    congested: bool

    async def room(self) -> None:
        """Wait until devices may be read again."""
        ...


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Timers and limits the relay enforces."""

    default_timeout: float = 30.0
    max_timeout: float = 300.0
    heartbeat: float = 25.0
    heartbeat_timeout: float = 75.0
    max_inflight_per_device: int = 10_000
    shutdown_grace: float = 10.0


class Relay:
    """Sessions, calls and presence across the node and, through the broker, the cluster."""

    def __init__(self, broker: Broker, clock: Clock, limits: RelayLimits = RelayLimits()) -> None:
        self.hub = Hub()
        self.broker = broker
        self.clock = clock
        self.limits = limits
        self.closing = False
        self._stats: dict[str, AppStats] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._event_listeners: list[EventListener] = []
        self._disconnect_listeners: list[DisconnectListener] = []
        self._connect_listeners: list[ConnectListener] = []
        self._call_listeners: list[CallListener] = []
        #: Callers waiting for a device to connect (``?offline=wait``), per (app, device).
        self._online_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        #: Open app WebSockets of a device on this node, for presence (set by the front door).
        self.websocket_counter: Callable[[str, str], int] | None = None
        #: Runs a callback once the event recorded last is durably stored (set by the event
        #: log); None: events are not stored, so acknowledgements go out at once.
        self.when_stored: Callable[[Callable[[], None]], None] | None = None
        #: The event log's backlog (set by the event log): transports pause reading devices
        #: while it is congested, instead of letting events be dropped.
        self.event_backlog: EventBacklog | None = None
        #: Topic subscriptions of this node's device sessions (see the topics section).
        self.topics = TopicIndex()

    def on_event(self, listener: EventListener) -> None:
        """Register a consumer of upstream events (webhooks, app WebSockets...)."""
        self._event_listeners.append(listener)

    def on_connect(self, listener: ConnectListener) -> None:
        """Register a consumer of session starts (presence events)."""
        self._connect_listeners.append(listener)

    def on_disconnect(self, listener: DisconnectListener) -> None:
        """Register a consumer of session ends (to close what depends on the device)."""
        self._disconnect_listeners.append(listener)

    def on_call(self, listener: CallListener) -> None:
        """Register a consumer of call outcomes (call-completion webhooks)."""
        self._call_listeners.append(listener)

    def _call_done(self, app_id: str, device_id: str, code: str | None, started: float) -> None:
        duration_ms = (self.clock.monotonic() - started) * 1000.0
        for listener in self._call_listeners:
            try:
                listener(app_id, device_id, code, duration_ms)
            except Exception:
                log.exception("call listener failed")

    @property
    def node_id(self) -> str:
        """This node's id in the cluster."""
        return self.broker.node_id

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start housekeeping (heartbeats and liveness for every session)."""
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())

    async def _housekeeping(self) -> None:
        # One timer for all sessions instead of one per connection: cheaper at 10k devices.
        interval = min(1.0, self.limits.heartbeat / 5)
        while True:
            await asyncio.sleep(interval)
            now = self.clock.monotonic()
            for session in self.hub:
                try:
                    session.tick(now)
                except Exception:
                    log.exception("heartbeat tick failed for %s", session.device_id)

    async def shutdown(self, grace: float | None = None) -> None:
        """Refuse new work, let calls in flight finish within ``grace``, close every session.

        Idempotent: a second call finds nothing left to close.
        """
        self.closing = True
        grace = self.limits.shutdown_grace if grace is None else grace
        deadline = self.clock.monotonic() + grace
        # Polling is fine here: it runs once, for at most ``grace`` seconds.
        while self.clock.monotonic() < deadline and any(s.in_flight() for s in self.hub):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        sessions = list(self.hub)
        if sessions:
            log.info("closing %d device sessions for shutdown", len(sessions))
            await asyncio.gather(
                *(s.close(CloseReason.SHUTDOWN, "server shutting down") for s in sessions),
                return_exceptions=True,
            )
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background coroutine, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions (called by transports) -------------------------------------------------

    async def register(self, session: Session) -> None:
        """Make ``session`` the device's live session, closing any session it replaces.

        Raises:
            ShuttingDown: the server takes no new sessions.
        """
        if self.closing:
            raise ShuttingDown("server shutting down")
        previous = self.hub.attach(session)
        if previous is not None and previous is not session:
            log.info(
                "session takeover: %s/%s %s replaces %s",
                session.app_id,
                session.device_id,
                session.session_id,
                previous.session_id,
            )
            self.spawn(previous.close(CloseReason.TAKEOVER, "replaced by a newer connection"))
        else:
            metrics.SESSIONS.labels(session.transport).inc()
        await self.broker.claim(session.app_id, session.device_id, session.session_id)
        log.info(
            "device connected: %s/%s via %s from %s",
            session.app_id,
            session.device_id,
            session.transport,
            session.stats.remote,
        )
        for listener in self._connect_listeners:
            try:
                listener(session.app_id, session.device_id, session)
            except Exception:
                log.exception("connect listener failed")
        waiters = self._online_waiters.pop((session.app_id, session.device_id), None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def unregister(self, session: Session, reason: CloseReason) -> None:
        """Forget ``session`` if it is still current (a replaced session changes nothing)."""
        if not self.hub.detach(session):
            return
        metrics.SESSIONS.labels(session.transport).dec()
        await self.broker.release(session.app_id, session.device_id, session.session_id)
        log.info("device disconnected: %s/%s (%s)", session.app_id, session.device_id, reason.value)
        for listener in self._disconnect_listeners:
            try:
                listener(session.app_id, session.device_id, reason)
            except Exception:
                log.exception("disconnect listener failed")

    def device_event(
        self, session: Session, name: str, data: bytes, ack: Callable[[], None] | None = None
    ) -> None:
        """An upstream event arrived from a device: count it, hand it to the listeners.

        ``ack`` (for a device that asked for an acknowledgement) runs once the event is
        stored, or at once when nothing stores events; never for an event that was dropped.
        """
        session.stats.events += 1
        metrics.EVENTS.inc()
        # DEBUG: at thousands of events a second, one INFO line each would drown the log.
        log.debug(
            "event from %s/%s: %s (%d bytes)", session.app_id, session.device_id, name, len(data)
        )
        for listener in self._event_listeners:
            try:
                listener(session.app_id, session.device_id, name, data)
            except Exception:
                log.exception("event listener failed")
        if ack is not None:
            if self.when_stored is None:
                ack()
            else:
                self.when_stored(ack)

    # -- operations (called by front doors) ----------------------------------------------

    def app_stats(self, app_id: str) -> AppStats:
        """This node's counters for an application."""
        stats = self._stats.get(app_id)
        if stats is None:
            stats = self._stats[app_id] = AppStats()
        return stats

    async def call(
        self, app_id: str, device_id: str, body: bytes, method: str, timeout: float
    ) -> bytes:
        """Send ``body`` to a device and return its reply.

        Raises:
            CallFailed: a subclass naming the outcome (offline, timeout, device error...).
        """
        if not self._call_listeners:
            return await self._call(app_id, device_id, body, method, timeout)
        started = self.clock.monotonic()
        try:
            reply = await self._call(app_id, device_id, body, method, timeout)
        except CallFailed as exc:
            self._call_done(app_id, device_id, exc.code, started)
            raise
        self._call_done(app_id, device_id, None, started)
        return reply

    async def _call(
        self, app_id: str, device_id: str, body: bytes, method: str, timeout: float
    ) -> bytes:
        if self.closing:
            raise ShuttingDown("server shutting down")
        session = self.hub.get(app_id, device_id)
        if session is None:
            return await self._call_elsewhere(app_id, device_id, body, method, timeout)
        stats = self.app_stats(app_id)
        started = self.clock.monotonic()
        try:
            reply = await session.call(body, method, timeout)
        except CallFailed as exc:
            stats.errors += 1
            metrics.CALLS.labels(exc.code).inc()
            raise
        stats.record(len(body), len(reply), (self.clock.monotonic() - started) * 1000.0)
        metrics.CALLS_OK.inc()
        return reply

    async def _call_elsewhere(
        self, app_id: str, device_id: str, body: bytes, method: str, timeout: float
    ) -> bytes:
        node = await self.broker.owner(app_id, device_id)
        if node is None or node == self.node_id:
            metrics.CALLS.labels(DeviceOffline.code).inc()
            raise DeviceOffline(f"device {device_id} is not connected")
        return await self.broker.forward_call(node, app_id, device_id, body, method, timeout)

    async def wait_online(self, app_id: str, device_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the device to be connected; False if it is not.

        Single node: in cluster mode a connect on another node is seen only through the
        broker's ownership check made first.
        """
        if self.hub.get(app_id, device_id) is not None:
            return True
        owner = await self.broker.owner(app_id, device_id)
        if owner is not None and owner != self.node_id:
            return True
        if timeout <= 0 or self.closing:
            return False
        lane = (app_id, device_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._online_waiters.setdefault(lane, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._online_waiters.get(lane)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._online_waiters[lane]

    async def presence(self, app_id: str, device_id: str) -> dict[str, Any] | None:
        """The device's presence object, or None when it is offline."""
        session = self.hub.get(app_id, device_id)
        if session is not None:
            counter = self.websocket_counter
            info = presence(session, counter(app_id, device_id) if counter else 0)
            info["subscriptions"] = sorted(self.topics.patterns(session))
            return info
        node = await self.broker.owner(app_id, device_id)
        if node is None or node == self.node_id:
            return None
        return await self.broker.forward_presence(node, app_id, device_id)

    async def devices(self, app_id: str) -> list[str]:
        """Ids of the application's connected devices, across the cluster."""
        return await self.broker.list_devices(app_id)

    async def detach(
        self, app_id: str, device_id: str, reason: CloseReason = CloseReason.DETACHED
    ) -> bool:
        """Close a device's session; False when it is not connected."""
        session = self.hub.get(app_id, device_id)
        if session is not None:
            await session.close(reason, f"{reason.value} by the application")
            await self.unregister(session, reason)
            return True
        node = await self.broker.owner(app_id, device_id)
        if node is None or node == self.node_id:
            return False
        return await self.broker.forward_detach(node, app_id, device_id)

    async def detach_app(self, app_id: str, reason: CloseReason) -> int:
        """Close every session of an application on this node (it was deleted)."""
        sessions = self.hub.of_app(app_id)
        for session in sessions:
            await session.close(reason, "application deleted")
            await self.unregister(session, reason)
        return len(sessions)

    # -- topics ----------------------------------------------------------------------------
    # Devices subscribe through their transport (native SUBSCRIBE frames), which adds the
    # session to ``self.topics`` and drops it when the session ends. Single node for now: in
    # cluster mode a publish must go through the broker to reach every node's subscribers.

    def publish(
        self,
        app_id: str,
        topic: str,
        data: bytes,
        admit: Callable[[int], None] | None = None,
    ) -> int:
        """Push ``data`` to every subscriber of ``topic`` on this node; return how many got it.

        ``admit`` is called with the number of subscribers before anything is sent; whatever
        it raises (a size limit, say) stops the publish.

        Raises:
            ValueError: ``topic`` is not a valid topic name.
        """
        validate_topic(topic)
        subscribers = self.topics.match(app_id, topic)
        if admit is not None:
            admit(len(subscribers))
        metrics.TOPIC_PUBLISHES.inc()
        delivered = 0
        for subscriber in subscribers:
            # One broken or congested session must not cost the others their message.
            try:
                subscriber.push(topic, data)
            except ConnectionError as exc:
                log.debug("push to %s/%s dropped: %s", app_id, subscriber.device_id, exc)
                metrics.TOPIC_PUSHES.labels("congested").inc()
                continue
            except Exception:
                log.exception("push to %s/%s failed", app_id, subscriber.device_id)
                metrics.TOPIC_PUSHES.labels("error").inc()
                continue
            delivered += 1
        if delivered:
            metrics.TOPIC_PUSHES.labels("sent").inc(delivered)
        return delivered

    def topic_devices(self, app_id: str, topic: str) -> list[str]:
        """Ids of the devices on this node subscribed to a pattern matching ``topic``.

        Raises:
            ValueError: ``topic`` is not a valid topic name.
        """
        validate_topic(topic)
        # dict.fromkeys: a device whose old and new sessions overlap (takeover) counts once.
        return list(dict.fromkeys(s.device_id for s in self.topics.match(app_id, topic)))
