"""core/lifecycle.py: the tables are what the docs show, and they hang together."""

from __future__ import annotations

from pathlib import Path

import pytest

from backchannel.core.lifecycle import (
    BLOCKS,
    CALL_STATES,
    CALL_TRANSITIONS,
    MESSAGE_STATES,
    MESSAGE_TRANSITIONS,
    NEW,
    State,
    Transition,
    allowed,
    rendered,
)
from backchannel.core.outcomes import CallFailed
from backchannel.state.store import MESSAGE_FINAL

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("relative", "name", "content"), BLOCKS)
def test_docs_show_the_tables(relative: str, name: str, content: str) -> None:
    text = (ROOT / relative).read_text()
    assert rendered(text, name, content) == text, (
        f"{relative}: the {name} table is stale; run `python -m backchannel.core.lifecycle`"
    )


@pytest.mark.parametrize(
    ("states", "transitions"),
    [(MESSAGE_STATES, MESSAGE_TRANSITIONS), (CALL_STATES, CALL_TRANSITIONS)],
)
def test_tables_are_consistent(
    states: tuple[State, ...], transitions: tuple[Transition, ...]
) -> None:
    names = {s.name for s in states}
    final = {s.name for s in states if s.final}
    for t in transitions:
        assert t.source == NEW or t.source in names, t
        assert t.target in names, t
        assert t.source not in final, f"a final state moves on: {t}"
    reached = {t.target for t in transitions}
    assert names == reached, f"unreachable: {names - reached}"
    moving = {t.source for t in transitions}
    assert names - final <= moving, f"stuck: {(names - final) - moving}"


def test_message_finals_match_the_store() -> None:
    assert {s.name for s in MESSAGE_STATES if s.final} == set(MESSAGE_FINAL)


def test_call_finals_are_the_api_error_codes() -> None:
    codes = set()
    stack: list[type[CallFailed]] = [CallFailed]
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack += cls.__subclasses__()
    finals = {s.name for s in CALL_STATES if s.final} - {"replied"}
    assert finals <= codes


def test_allowed() -> None:
    assert allowed(MESSAGE_TRANSITIONS, "queued", "sent")
    assert not allowed(MESSAGE_TRANSITIONS, "replied", "queued")


def test_rendered_needs_the_markers() -> None:
    with pytest.raises(ValueError, match="lifecycle:x"):
        rendered("no markers", "x", "content")
    text = "a\n<!-- lifecycle:x -->\nold\n<!-- /lifecycle:x -->\nb"
    assert rendered(text, "x", "new") == "a\n<!-- lifecycle:x -->\nnew\n<!-- /lifecycle:x -->\nb"
