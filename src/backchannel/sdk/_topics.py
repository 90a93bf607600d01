"""The device's topic subscriptions and the delivery of PUSH frames to their handlers.

The patterns are matched with :mod:`backchannel.wire.native.topics`, the implementation the
server uses too, so a handler sees exactly the messages the server sent for its pattern.
Handlers run one message at a time in arrival order, on a task of their own, so a slow
handler delays the next message but never the connection (calls, heartbeats).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backchannel.wire.native.topics import is_wildcard, match_levels, split

log = logging.getLogger("backchannel.sdk.device")

#: A topic handler: ``(topic, data)``, sync (run in a thread) or async; its result is ignored.
TopicHandler = Callable[[str, bytes], Any]

#: Messages waiting for their handlers per connection; beyond it new ones are dropped, so a
#: stuck handler cannot make the device's memory grow without bound.
MAX_QUEUED = 1000


@dataclass(slots=True)
class TopicRoute:
    """One subscription: its pattern (pre-split if it has wildcards) and its handler."""

    pattern: str
    levels: tuple[str, ...] | None
    fn: TopicHandler
    is_async: bool

    @classmethod
    def of(cls, pattern: str, fn: TopicHandler) -> TopicRoute:
        """Classify ``fn`` once, at subscription, so the per-message path does not."""
        call = getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        return cls(pattern, split(pattern) if is_wildcard(pattern) else None, fn, is_async)


class Subscriptions:
    """The device's subscriptions by pattern; kept across connections."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: dict[str, TopicRoute] = {}

    def matching(self, topic: str) -> list[TopicRoute]:
        """The routes whose pattern matches ``topic``, in subscription order."""
        levels: tuple[str, ...] | None = None
        found: list[TopicRoute] = []
        for route in self.routes.values():
            if route.levels is None:
                if route.pattern == topic:
                    found.append(route)
                continue
            if levels is None:
                levels = split(topic)
            if match_levels(route.levels, levels):
                found.append(route)
        return found

    def current(self, route: TopicRoute) -> bool:
        """True while ``route`` is still the subscription of its pattern (not replaced)."""
        return self.routes.get(route.pattern) is route


class PushQueue:
    """Runs the handlers of one connection's PUSH frames, one message at a time, in order."""

    __slots__ = ("_queue", "_subscriptions", "_task")

    def __init__(self, subscriptions: Subscriptions) -> None:
        self._subscriptions = subscriptions
        self._queue: asyncio.Queue[tuple[str, bytes, list[TopicRoute]]] = asyncio.Queue(MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None

    def put(self, topic: str, data: bytes) -> None:
        """Queue the message for every matching handler; drop it when the queue is full."""
        routes = self._subscriptions.matching(topic)
        if not routes:
            return
        try:
            self._queue.put_nowait((topic, data, routes))
        except asyncio.QueueFull:
            log.warning(
                "topic handlers are %d messages behind: dropped one on %r", MAX_QUEUED, topic
            )
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._work())

    def close(self) -> None:
        """Stop delivering: the connection ended (messages still queued are dropped)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _work(self) -> None:
        queue, subscriptions = self._queue, self._subscriptions
        while True:
            topic, data, routes = await queue.get()
            for route in routes:
                if subscriptions.current(route):  # not unsubscribed since it arrived
                    await _run(route, topic, data)


async def _run(route: TopicRoute, topic: str, data: bytes) -> None:
    """Call one handler; its failure is logged and the next message is delivered anyway."""
    try:
        if route.is_async:
            await route.fn(topic, data)
        else:
            # A thread, so a blocking handler cannot stall the connection.
            result = await asyncio.to_thread(route.fn, topic, data)
            if inspect.isawaitable(result):
                await result
    except Exception:
        log.exception("topic handler for %r failed on %r", route.pattern, topic)
