"""Topic names and subscription patterns (``docs/protocol.md`` section "Topics").

MQTT-style: levels are separated by ``/``; in a pattern, ``+`` stands for exactly one whole
level and ``#``, allowed only as the whole last level, for zero or more levels (so ``a/#``
matches ``a``, ``a/b`` and ``a/b/c``). This is the one implementation of the rules: the
server's :mod:`backchannel.core.topics` index and the device SDK's dispatch both use it, so
a device can never disagree with the server about which messages a pattern covers.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_TOPIC_BYTES = 255  # the u8 length prefix of SUBSCRIBE and PUSH
SEPARATOR = "/"
SINGLE = "+"
MULTI = "#"


def _check_length(text: str, what: str) -> None:
    if not text:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL")
    if len(text.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"{what} is longer than {MAX_TOPIC_BYTES} bytes of UTF-8")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name to publish on.

    Raises:
        ValueError: empty, longer than 255 bytes of UTF-8, or containing ``+``, ``#`` or NUL.
    """
    _check_length(topic, "a topic")
    if SINGLE in topic or MULTI in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard: '+' and '#' are for patterns")
    return topic


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern.

    Raises:
        ValueError: empty, longer than 255 bytes of UTF-8, containing NUL, a wildcard
            inside a level (``a+``, ``#b``), or ``#`` anywhere but as the whole last level.
    """
    _check_length(pattern, "a pattern")
    if SINGLE not in pattern and MULTI not in pattern:
        return pattern
    levels = pattern.split(SEPARATOR)
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == SINGLE or (level == MULTI and i == last):
            continue
        if level == MULTI:
            raise ValueError(f"pattern {pattern!r}: '#' is allowed only as the last level")
        if SINGLE in level or MULTI in level:
            raise ValueError(
                f"pattern {pattern!r}: a wildcard must be a whole level, not part of {level!r}"
            )
    return pattern


def is_wildcard(pattern: str) -> bool:
    """True when a (valid) pattern contains ``+`` or ``#``, i.e. is not an exact topic."""
    return SINGLE in pattern or MULTI in pattern


def split(name: str) -> tuple[str, ...]:
    """The levels of a topic or pattern."""
    return tuple(name.split(SEPARATOR))


def match_levels(pattern: Sequence[str], topic: Sequence[str]) -> bool:
    """True when the pattern's levels match the topic's levels (both from :func:`split`)."""
    n = len(pattern)
    if n and pattern[-1] == MULTI:
        n -= 1
        # '#' also matches zero levels: 'a/#' covers 'a' itself.
        if len(topic) < n:
            return False
    elif len(topic) != n:
        return False
    for i in range(n):
        level = pattern[i]
        if level != SINGLE and level != topic[i]:
            return False
    return True


def matches(pattern: str, topic: str) -> bool:
    """True when a valid ``pattern`` covers the topic name ``topic``."""
    if not is_wildcard(pattern):
        return pattern == topic
    return match_levels(split(pattern), split(topic))
