"""Topic subscriptions of this node's device sessions (``docs/protocol.md``, "Topics").

Pure bookkeeping, no I/O. The pattern rules live in :mod:`backchannel.wire.native.topics`,
shared with the device SDK so both ends agree on what a pattern matches; they are
re-exported here for the core's callers.

Per application, exact patterns sit in a dict (a publish to a topic that only exact
subscribers use costs one lookup) and wildcard patterns are kept pre-split into levels, so
matching one costs no string work beyond splitting the published topic once. Each
subscriber's own patterns are indexed too, so dropping a session costs O(its patterns),
not O(all subscriptions).
"""

from __future__ import annotations

from typing import Protocol

from backchannel.wire.native.topics import (
    is_wildcard,
    match_levels,
    matches,
    split,
    validate_pattern,
    validate_topic,
)

__all__ = [
    "MAX_SUBSCRIPTIONS",
    "Subscriber",
    "TopicIndex",
    "matches",
    "validate_pattern",
    "validate_topic",
]

#: Patterns one subscriber (one device session) may hold at once.
MAX_SUBSCRIPTIONS = 100


class Subscriber(Protocol):
    """What receives published messages: in practice a native device session."""

    app_id: str
    device_id: str

    def push(self, topic: str, data: bytes) -> None:
        """Queue a PUSH to the device; never blocks."""


class _AppTopics:
    """One application's subscriptions. Subscriber sets are dicts to keep insertion order."""

    __slots__ = ("exact", "wild")

    def __init__(self) -> None:
        self.exact: dict[str, dict[Subscriber, None]] = {}
        # pattern -> (its levels, its subscribers)
        self.wild: dict[str, tuple[tuple[str, ...], dict[Subscriber, None]]] = {}

    def __bool__(self) -> bool:
        return bool(self.exact or self.wild)


class TopicIndex:
    """Which subscribers of which application hold which patterns."""

    __slots__ = ("_apps", "_by_subscriber")

    def __init__(self) -> None:
        self._apps: dict[str, _AppTopics] = {}
        self._by_subscriber: dict[Subscriber, set[tuple[str, str]]] = {}

    def add(self, app_id: str, pattern: str, subscriber: Subscriber) -> bool:
        """Subscribe; True when the subscriber holds ``pattern`` afterwards (new or not).

        Returns False, changing nothing, when the subscriber already holds
        :data:`MAX_SUBSCRIPTIONS` other patterns.

        Raises:
            ValueError: the pattern is invalid (the message says why).
        """
        validate_pattern(pattern)
        held = self._by_subscriber.get(subscriber)
        key = (app_id, pattern)
        if held is not None and key in held:
            return True
        if held is not None and len(held) >= MAX_SUBSCRIPTIONS:
            return False
        topics = self._apps.get(app_id)
        if topics is None:
            topics = self._apps[app_id] = _AppTopics()
        if is_wildcard(pattern):
            entry = topics.wild.get(pattern)
            if entry is None:
                entry = topics.wild[pattern] = (split(pattern), {})
            entry[1][subscriber] = None
        else:
            topics.exact.setdefault(pattern, {})[subscriber] = None
        if held is None:
            held = self._by_subscriber[subscriber] = set()
        held.add(key)
        return True

    def remove(self, app_id: str, pattern: str, subscriber: Subscriber) -> bool:
        """Unsubscribe; False when the subscriber did not hold ``pattern``."""
        held = self._by_subscriber.get(subscriber)
        if held is None or (app_id, pattern) not in held:
            return False
        held.discard((app_id, pattern))
        if not held:
            del self._by_subscriber[subscriber]
        self._forget(app_id, pattern, subscriber)
        return True

    def drop(self, subscriber: Subscriber) -> int:
        """Remove every subscription of ``subscriber`` (its session ended); return how many."""
        held = self._by_subscriber.pop(subscriber, None)
        if not held:
            return 0
        for app_id, pattern in held:
            self._forget(app_id, pattern, subscriber)
        return len(held)

    def _forget(self, app_id: str, pattern: str, subscriber: Subscriber) -> None:
        topics = self._apps.get(app_id)
        if topics is None:
            return
        if is_wildcard(pattern):
            entry = topics.wild.get(pattern)
            if entry is not None:
                entry[1].pop(subscriber, None)
                if not entry[1]:
                    del topics.wild[pattern]
        else:
            subs = topics.exact.get(pattern)
            if subs is not None:
                subs.pop(subscriber, None)
                if not subs:
                    del topics.exact[pattern]
        if not topics:
            del self._apps[app_id]

    def match(self, app_id: str, topic: str) -> list[Subscriber]:
        """The subscribers of ``app_id`` with a pattern matching ``topic``, each once."""
        topics = self._apps.get(app_id)
        if topics is None:
            return []
        exact = topics.exact.get(topic)
        if not topics.wild:
            return list(exact) if exact else []
        found: dict[Subscriber, None] = dict(exact) if exact else {}
        levels = split(topic)
        for pattern_levels, subscribers in topics.wild.values():
            if match_levels(pattern_levels, levels):
                found.update(subscribers)
        return list(found)

    def patterns(self, subscriber: object) -> set[str]:
        """The patterns ``subscriber`` holds (a copy); none for an object that never subscribed."""
        # Any session may be asked about (a Cometa one never subscribes): a lookup by identity.
        held = self._by_subscriber.get(subscriber)  # type: ignore[call-overload]
        return {pattern for _, pattern in held or ()}

    def __len__(self) -> int:
        """How many subscribers hold at least one pattern."""
        return len(self._by_subscriber)
