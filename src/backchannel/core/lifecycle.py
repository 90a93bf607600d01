"""Lifecycles as data: the states of a queued message and the ends of a call.

The code moves a message only along :data:`MESSAGE_TRANSITIONS` (``core/messages.py``
checks each move against it), and the docs show these same tables: ``python -m
backchannel.core.lifecycle`` rewrites the marked blocks of ``docs/api.md`` and
``docs/architecture.md``, and a test fails when a block is stale (STYLE.md, "Transitions are
data").
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from backchannel.state.store import DELIVERED, EXPIRED, FAILED, QUEUED, REPLIED, SENT

#: The source state of a message that does not exist yet.
NEW = "(new)"


@dataclass(frozen=True, slots=True)
class State:
    """One state: its name, what it means, and whether it is final."""

    name: str
    meaning: str
    final: bool


@dataclass(frozen=True, slots=True)
class Transition:
    """A move from one state to another, and what causes it."""

    source: str
    target: str
    cause: str


MESSAGE_STATES: tuple[State, ...] = (
    State(QUEUED, "waiting for the device, or for its turn", False),
    State(SENT, "handed to the device's connection; waiting for the reply", False),
    State(
        REPLIED,
        "the device replied; `reply` holds the reply (`reply_base64` when it is not UTF-8)",
        True,
    ),
    State(
        FAILED,
        "the device answered with an error (`error` `device_error`, `detail` its message), "
        "or the app cancelled it (`error` `cancelled`)",
        True,
    ),
    State(
        DELIVERED,
        "handed to the device, but no reply came back: `error` says why (`timeout_no_reply`, "
        "`device_disconnected`, or `interrupted` when the server stopped mid-call). The device "
        "may have acted on it",
        True,
    ),
    State(EXPIRED, "its `ttl` passed before the device took it (`error` `expired`)", True),
)

MESSAGE_TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        NEW,
        QUEUED,
        '`send` with `offline=queue` (or a fan-out with `"offline": "queue"`)',
    ),
    Transition(NEW, SENT, "`send` with an `Idempotency-Key` (the call starts at once)"),
    Transition(
        QUEUED,
        SENT,
        "the device is connected and it is this message's turn; written before the hand-over",
    ),
    Transition(
        QUEUED,
        EXPIRED,
        "the `ttl` passed (the sweep runs every second, and a read checks too)",
    ),
    Transition(QUEUED, FAILED, "`DELETE .../messages/{id}` (`error` `cancelled`)"),
    Transition(SENT, REPLIED, "the device replied"),
    Transition(
        SENT,
        FAILED,
        "the device answered with an error, or the message cannot be carried (`invalid_message`)",
    ),
    Transition(
        SENT,
        DELIVERED,
        "no reply: the timeout ran out, the connection ended, or the server restarted "
        "(`interrupted`)",
    ),
    Transition(
        SENT,
        QUEUED,
        "proof that nothing reached the device: it was offline or busy, or the deadline passed "
        "before the write; back in its place in the queue",
    ),
)

CALL_STATES: tuple[State, ...] = (
    State(
        "waiting",
        "the call waits to be written: the connection is congested, or (Cometa) another message is"
        " in flight",
        False,
    ),
    State("delivered", "written to the device's connection; waiting for the reply", False),
    State("replied", "the reply is the HTTP answer (200)", True),
    State("device_offline", "no live session: nothing was sent (418)", True),
    State("device_busy", "too many calls in flight: nothing was sent (429)", True),
    State("timeout_before_delivery", "the deadline passed before the call was written (408)", True),
    State(
        "timeout_no_reply",
        "delivered, no reply in time; a native device gets CANCEL (408)",
        True,
    ),
    State("device_error", "the device answered with an error (502)", True),
    State("device_disconnected", "the session ended while the call was in flight (502)", True),
)

CALL_TRANSITIONS: tuple[Transition, ...] = (
    Transition(NEW, "device_offline", "no session on any node"),
    Transition(NEW, "device_busy", "`max_inflight_per_device` calls are in flight"),
    Transition(NEW, "waiting", "the session takes the call"),
    Transition("waiting", "delivered", "the frame (or chunk) is written"),
    Transition("waiting", "timeout_before_delivery", "the deadline passed first"),
    Transition(
        "waiting",
        "device_disconnected",
        "a native session ended while the frame waited for a congested connection",
    ),
    Transition(
        "waiting",
        "device_offline",
        "a Cometa session ended while the call was queued: nothing was sent",
    ),
    Transition("delivered", "replied", "the REPLY (or the Cometa reply chunk) arrived"),
    Transition("delivered", "device_error", "a REPLY with the ERROR flag"),
    Transition("delivered", "timeout_no_reply", "the deadline passed"),
    Transition("delivered", "device_disconnected", "the session ended"),
)


def allowed(transitions: tuple[Transition, ...], source: str, target: str) -> bool:
    """Whether the table has a move from ``source`` to ``target``."""
    return any(t.source == source and t.target == target for t in transitions)


def render_states(states: tuple[State, ...]) -> str:
    """A Markdown table of states."""
    rows = ["| `state` | Meaning | Final? |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {s.meaning} | {'yes' if s.final else 'no'} |" for s in states]
    return "\n".join(rows)


def render_transitions(transitions: tuple[Transition, ...]) -> str:
    """A Markdown table of transitions."""
    rows = ["| From | To | When |", "|---|---|---|"]
    for t in transitions:
        source = t.source if t.source == NEW else f"`{t.source}`"
        rows.append(f"| {source} | `{t.target}` | {t.cause} |")
    return "\n".join(rows)


#: The marked blocks of the docs: (file relative to the repository, block name, content).
BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("docs/api.md", "message-states", render_states(MESSAGE_STATES)),
    ("docs/architecture.md", "message-transitions", render_transitions(MESSAGE_TRANSITIONS)),
    ("docs/architecture.md", "call-states", render_states(CALL_STATES)),
    ("docs/architecture.md", "call-transitions", render_transitions(CALL_TRANSITIONS)),
)


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- lifecycle:{re.escape(name)} -->\n)(.*?)(<!-- /lifecycle:{re.escape(name)} -->)",
        re.DOTALL,
    )


def rendered(text: str, name: str, content: str) -> str:
    """``text`` with the block ``name`` replaced by ``content``.

    Raises:
        ValueError: the block's markers are missing.
    """
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"no <!-- lifecycle:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(3), text)


def render_docs(root: Path) -> list[Path]:
    """Rewrite every block under ``root``; return the files that changed."""
    changed: list[Path] = []
    for relative, name, content in BLOCKS:
        path = root / relative
        text = path.read_text()
        new = rendered(text, name, content)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    # python -m backchannel.core.lifecycle [repository root]
    for changed_path in render_docs(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(f"rendered {changed_path}")
