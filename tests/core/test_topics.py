"""Topic names, patterns and the subscription index (docs/protocol.md § Topics)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.core.clock import SystemClock
from backchannel.core.relay import Relay
from backchannel.core.topics import (
    MAX_SUBSCRIPTIONS,
    TopicIndex,
    matches,
    validate_pattern,
    validate_topic,
)
from backchannel.routing.memory import MemoryBroker


@dataclass(eq=False)  # identity hash, like a session
class Sub:
    """A subscriber that records what it was pushed."""

    app_id: str
    device_id: str
    got: list[tuple[str, bytes]] = field(default_factory=list)

    def push(self, topic: str, data: bytes) -> None:
        self.got.append((topic, data))


class Broken(Sub):
    """A subscriber whose connection fails (congested, or a bug)."""

    def __init__(self, app_id: str, device_id: str, error: Exception) -> None:
        super().__init__(app_id, device_id)
        self.error = error

    def push(self, topic: str, data: bytes) -> None:
        raise self.error


class TestValidation:
    """docs/protocol.md § Topics: names and patterns."""

    @pytest.mark.parametrize(
        "topic", ["a", "a/b/c", "sensors/kitchen/temp", "/leading", "trailing/", "a//b", "é/ü"]
    )
    def test_valid_topics(self, topic: str) -> None:
        assert validate_topic(topic) == topic

    @pytest.mark.parametrize(
        ("topic", "why"),
        [
            ("", "empty"),
            ("a/+", "wildcard"),
            ("a/#", "wildcard"),
            ("a+b", "wildcard"),
            ("a\x00b", "NUL"),
            ("x" * 256, "255 bytes"),
            ("é" * 128, "255 bytes"),  # 256 bytes of UTF-8
        ],
    )
    def test_invalid_topics(self, topic: str, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            validate_topic(topic)

    def test_topic_of_exactly_255_bytes_is_valid(self) -> None:
        assert validate_topic("x" * 255)
        assert validate_pattern("x" * 253 + "/#")

    @pytest.mark.parametrize(
        "pattern", ["a", "+", "#", "a/+", "a/#", "+/+", "+/b/#", "a/+/c", "/#", "a//+"]
    )
    def test_valid_patterns(self, pattern: str) -> None:
        assert validate_pattern(pattern) == pattern

    @pytest.mark.parametrize(
        ("pattern", "why"),
        [
            ("", "empty"),
            ("a+", "whole level"),
            ("a/b+", "whole level"),
            ("+a", "whole level"),
            ("#b", "whole level"),
            ("a/b#", "whole level"),
            ("a/#/b", "last level"),
            ("#/a", "last level"),
            ("#/#", "last level"),
            ("++", "whole level"),
            ("a\x00", "NUL"),
            ("p" * 256, "255 bytes"),
        ],
    )
    def test_invalid_patterns(self, pattern: str, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            validate_pattern(pattern)


MATCHES: list[tuple[str, str, bool]] = [
    # exact
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/b", "a", False),
    ("a", "A", False),
    # '+' is exactly one whole level
    ("a/+", "a/b", True),
    ("a/+", "a/", True),  # an empty level is a level
    ("a/+", "a", False),
    ("a/+", "a/b/c", False),
    ("+/b", "x/b", True),
    ("+/b", "b", False),
    ("+", "a", True),
    ("+", "a/b", False),
    ("+/+", "a/b", True),
    ("+/+", "a", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/+/c", "a/b/x/c", False),
    # '#' is zero or more levels at the end
    ("a/#", "a", True),
    ("a/#", "a/b", True),
    ("a/#", "a/b/c/d", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("#", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("+/#", "a", True),
    ("+/#", "a/b/c", True),
    ("a/+/#", "a", False),
    ("a/+/#", "a/b", True),
    ("a/+/#", "a/b/c/d", True),
    ("/#", "/x", True),
    ("/#", "x", False),
    # the wildcard characters are not special in the middle of a topic level
    ("a.b/+", "a.b/c", True),
    ("a*/+", "ab/c", False),
]


def reference(pattern: str, topic: str) -> bool:
    """An independent implementation of the rules, by regular expression."""
    parts = pattern.split("/")
    if parts[-1] == "#":
        head = [("[^/]*" if p == "+" else re.escape(p)) for p in parts[:-1]]
        regex = "/".join(head) + ("(/.*)?" if head else ".*")
    else:
        regex = "/".join("[^/]*" if p == "+" else re.escape(p) for p in parts)
    return re.fullmatch(regex, topic, re.DOTALL) is not None


class TestMatching:
    """docs/protocol.md § Topics: what a pattern matches."""

    @pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
    def test_matches(self, pattern: str, topic: str, expected: bool) -> None:
        assert matches(pattern, topic) is expected
        assert reference(pattern, topic) is expected

    @pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
    def test_index_agrees_with_matches(self, pattern: str, topic: str, expected: bool) -> None:
        index = TopicIndex()
        sub = Sub("app", "d1")
        assert index.add("app", pattern, sub)
        assert index.match("app", topic) == ([sub] if expected else [])


levels = st.sampled_from(["a", "b", "", "ab", "é"])
topics = st.lists(levels, min_size=1, max_size=5).map("/".join)
patterns = st.tuples(
    st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=0, max_size=4), st.booleans()
).map(lambda t: "/".join([*t[0], "#"] if t[1] else t[0]) or "#")


@given(patterns, topics)
def test_matches_agrees_with_the_reference(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    assert matches(pattern, topic) is reference(pattern, topic)


class TestIndex:
    """The per-node subscription index."""

    def test_each_subscriber_once_even_when_several_patterns_match(self) -> None:
        index = TopicIndex()
        one, two = Sub("app", "d1"), Sub("app", "d2")
        for pattern in ("a/b", "a/+", "a/#", "#"):
            index.add("app", pattern, one)
        index.add("app", "a/+", two)
        assert index.match("app", "a/b") == [one, two]
        assert index.match("app", "a/c") == [one, two]
        assert index.match("app", "z") == [one]

    def test_applications_are_separate(self) -> None:
        index = TopicIndex()
        mine, theirs = Sub("app1", "d1"), Sub("app2", "d1")
        index.add("app1", "t", mine)
        index.add("app2", "#", theirs)
        assert index.match("app1", "t") == [mine]
        assert index.match("app2", "t") == [theirs]
        assert index.match("app3", "t") == []

    def test_add_is_idempotent_and_remove_undoes_it(self) -> None:
        index = TopicIndex()
        sub = Sub("app", "d1")
        assert index.add("app", "a/+", sub)
        assert index.add("app", "a/+", sub)
        assert index.patterns(sub) == {"a/+"}
        assert index.remove("app", "a/+", sub)
        assert not index.remove("app", "a/+", sub)
        assert index.match("app", "a/b") == []
        assert len(index) == 0

    def test_remove_keeps_other_subscribers_of_the_same_pattern(self) -> None:
        index = TopicIndex()
        one, two = Sub("app", "d1"), Sub("app", "d2")
        for sub in (one, two):
            index.add("app", "x/#", sub)
            index.add("app", "x", sub)
        index.remove("app", "x/#", one)
        index.remove("app", "x", two)
        assert index.match("app", "x/y") == [two]
        assert index.match("app", "x") == [one, two]

    def test_drop_removes_every_pattern_of_one_subscriber_only(self) -> None:
        index = TopicIndex()
        gone, stays = Sub("app", "d1"), Sub("app", "d2")
        for pattern in ("a", "a/+", "#"):
            index.add("app", pattern, gone)
        index.add("app", "a", stays)
        assert index.drop(gone) == 3
        assert index.drop(gone) == 0
        assert index.patterns(gone) == set()
        assert index.match("app", "a") == [stays]
        assert index.match("app", "b") == []
        assert len(index) == 1

    def test_invalid_pattern_raises_and_changes_nothing(self) -> None:
        index = TopicIndex()
        sub = Sub("app", "d1")
        with pytest.raises(ValueError):
            index.add("app", "a/#/b", sub)
        assert index.patterns(sub) == set()
        assert len(index) == 0

    def test_limit_per_subscriber(self) -> None:
        index = TopicIndex()
        sub, other = Sub("app", "d1"), Sub("app", "d2")
        for i in range(MAX_SUBSCRIPTIONS):
            assert index.add("app", f"t/{i}", sub)
        assert not index.add("app", "one/more", sub)
        assert index.add("app", "t/0", sub)  # already held: not a new one
        assert index.match("app", "one/more") == []
        assert index.add("app", "one/more", other)  # the limit is per subscriber
        index.remove("app", "t/0", sub)
        assert index.add("app", "one/more", sub)
        assert len(index.patterns(sub)) == MAX_SUBSCRIPTIONS

    def test_exact_and_wildcard_subscribers_keep_subscription_order(self) -> None:
        index = TopicIndex()
        subs = [Sub("app", f"d{i}") for i in range(4)]
        index.add("app", "#", subs[0])
        index.add("app", "a", subs[1])
        index.add("app", "+", subs[2])
        index.add("app", "a", subs[3])
        # exact subscribers first, then wildcard ones, each group in subscription order
        assert index.match("app", "a") == [subs[1], subs[3], subs[0], subs[2]]


class TestRelay:
    """Relay.publish and Relay.topic_devices on one node."""

    def test_publish_counts_deliveries_and_survives_failing_subscribers(self) -> None:
        relay = Relay(MemoryBroker(), SystemClock())
        first, last = Sub("app", "d1"), Sub("app", "d4")
        congested = Broken("app", "d2", ConnectionResetError("congested"))
        buggy = Broken("app", "d3", RuntimeError("bug"))
        for sub in (first, congested, buggy, last):
            relay.topics.add("app", "t/+", sub)
        assert relay.publish("app", "t/x", b"data") == 2
        assert first.got == last.got == [("t/x", b"data")]
        assert relay.publish("app", "u", b"") == 0
        assert relay.publish("other", "t/x", b"") == 0

    def test_topic_devices(self) -> None:
        relay = Relay(MemoryBroker(), SystemClock())
        old, new, other = Sub("app", "d1"), Sub("app", "d1"), Sub("app", "d2")
        relay.topics.add("app", "a/#", old)
        relay.topics.add("app", "a/b", new)  # a takeover's two sessions: counted once
        relay.topics.add("app", "+/b", other)
        assert relay.topic_devices("app", "a/b") == ["d1", "d2"]
        assert relay.topic_devices("app", "a/c") == ["d1"]
        assert relay.topic_devices("app2", "a/b") == []

    @pytest.mark.parametrize("topic", ["", "a/+", "#"])
    def test_invalid_topics_raise(self, topic: str) -> None:
        relay = Relay(MemoryBroker(), SystemClock())
        with pytest.raises(ValueError):
            relay.publish("app", topic, b"")
        with pytest.raises(ValueError):
            relay.topic_devices("app", topic)
