"""The client's acknowledgement of a ``request`` event, turned into an HTTP response.

Socket2me clients answer with ``respond(status, body, headers)``, and every argument is
optional: the arguments are read by position and type (COMPAT.md, Socket2me, "Socket.IO
side"). The original passed them to Express's ``res.send``; this module applies the same rules
and also refuses what cannot go on the wire (bad header names or values, impossible statuses),
which Express would have thrown on mid-request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backchannel.wire.errors import RemoteProtocolError

PROVIDED_BY = ("X-Provided-By", "Socket2Me")
"""The header the original server added to every answer, and so does backchannel."""

# Hop-by-hop and framing headers: the relay's HTTP server computes these itself, and a
# client-given value would contradict the bytes actually sent.
_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        PROVIDED_BY[0].lower(),
    }
)

# Statuses whose responses carry no body; Express's res.send empties the body and removes
# Content-Type for them.
_NO_BODY = frozenset({204, 304})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")

_TEXT = "text/html; charset=utf-8"
_JSON = "application/json; charset=utf-8"
_BINARY = "application/octet-stream"


class MalformedRespond(RemoteProtocolError, ValueError):
    """The client's answer cannot be turned into an HTTP response; answer 502 with the message."""

    status_hint = 502
    error_code = "malformed_respond"


@dataclass(frozen=True, slots=True)
class Respond:
    """An HTTP response from a client's answer: header names in the client's case and order."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def parse_respond(args: Sequence[Any]) -> Respond:
    """Turn the arguments of a client's ``respond`` acknowledgement into a response.

    Args:
        args: the acknowledgement's arguments as python-socketio delivers them (JSON values,
            with binary attachments as bytes); JavaScript ``undefined`` and ``null`` are None.

    Returns:
        The status, the headers to send (X-Provided-By last) and the body bytes.

    Raises:
        MalformedRespond: the status is not an integer from 200 to 599, a header name is not
            a token, a header value has CR, LF or NUL or is not a string, number, boolean or
            list of those, or the body is of a type that has no HTTP form.
    """
    status = 200
    rest = list(args)
    if rest and _is_number(rest[0]):
        status = _status(rest.pop(0))
    body: Any = rest[0] if rest else "OK"
    given = rest[1] if len(rest) > 1 else None
    headers = _headers(given) if isinstance(given, dict) else []

    content, default_type = _body(body)
    has_type = any(name.lower() == "content-type" for name, _ in headers)
    if status in _NO_BODY:
        content = b""
        headers = [(name, value) for name, value in headers if name.lower() != "content-type"]
    elif default_type is not None and not has_type:
        headers.append(("Content-Type", default_type))
    headers.append(PROVIDED_BY)
    return Respond(status=status, headers=headers, body=content)


def _is_number(value: Any) -> bool:
    """True for what JavaScript's ``typeof`` calls a number (bool excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _status(value: int | float) -> int:
    """Check a status argument: an integer (or integral float) from 200 to 599."""
    if isinstance(value, float):
        if not value.is_integer():
            raise MalformedRespond(f"status is not an integer: {value!r}")
        value = int(value)
    # 1xx are interim responses: an HTTP server cannot send one as the final answer.
    if not 200 <= value <= 599:
        raise MalformedRespond(f"status out of range 200-599: {value}")
    return value


def _headers(given: dict[Any, Any]) -> list[tuple[str, str]]:
    """The client's headers as lines, checked, with the relay's own headers left out."""
    lines: list[tuple[str, str]] = []
    for name, value in given.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise MalformedRespond(f"invalid header name {str(name)[:40]!r}")
        if name.lower() in _DROPPED:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                # A JavaScript undefined or null: no header line rather than the text "null".
                continue
            text = _header_value(name, item)
            if _BAD_VALUE.search(text):
                raise MalformedRespond(f"header {name[:40]!r} has a CR, LF or NUL in its value")
            lines.append((name, text))
    return lines


def _header_value(name: str, value: Any) -> str:
    """One header value as text, spelled as JavaScript's ``String()`` would."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _int_text(name, value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        # JavaScript has one number type: 3.0 is "3".
        return _int_text(name, int(value)) if value.is_integer() else repr(value)
    raise MalformedRespond(f"header {name[:40]!r} has a value of type {type(value).__name__}")


def _int_text(name: str, value: int) -> str:
    """str() of an int, refusing those too long for it (over 4300 digits)."""
    try:
        return str(value)
    except ValueError as exc:
        raise MalformedRespond(f"header {name[:40]!r} has a number too long to send") from exc


def _body(body: Any) -> tuple[bytes, str | None]:
    """The body bytes and the Content-Type to use when the client set none."""
    if body is None:
        return b"", None
    if isinstance(body, str):
        return _utf8(body), _TEXT
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), _BINARY
    if isinstance(body, dict | list | int | float):  # bool is an int
        try:
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise MalformedRespond(f"body cannot be sent as JSON: {exc}") from exc
        return _utf8(text), _JSON
    raise MalformedRespond(f"body of type {type(body).__name__} cannot be sent")


def _utf8(text: str) -> bytes:
    """Encode as UTF-8, replacing lone surrogates with U+FFFD as JavaScript's encoder does."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")
