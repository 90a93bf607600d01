"""The Cometa device attach: recognising it, parsing it, and answering it.

A Cometa device opens a plain (or TLS) connection to the same port as the API and writes an
HTTP-looking ``POST /v1/applications/{app_id}/devices/{device_id}`` with a short body, after
which the socket is no longer HTTP (COMPAT.md, Cometa, "Device side", point 1). So the transport
must look at the first bytes of every connection (:func:`sniff`), hand ordinary HTTP on to the
HTTP server untouched, and parse the attach itself (:func:`parse_attach`), because a standard
HTTP parser would swallow the chunk stream that follows the body.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote

from backchannel.wire.cometa.chunks import encode_chunk
from backchannel.wire.errors import LocalProtocolError, RemoteProtocolError

# The request line is decided within this many bytes, LF included; beyond that the connection
# is handed on as ordinary HTTP (whose own parser applies its own limits).
MAX_REQUEST_LINE = 2048
# The whole attach head (request line, headers, blank line) must fit in this many bytes.
MAX_ATTACH_HEAD = 8192

# One id segment: visible ASCII without "/", "?" and "#" (RFC 9112 request targets are ASCII;
# ids with other characters arrive percent-encoded and are decoded by parse_attach).
_ID = r"""[!"$-.0->@-~]+"""
_QUERY = r"""(?:\?[!"$-~]*)?"""
_PATH = rf"/v1/applications/(?P<app_id>{_ID})/devices/(?P<device_id>{_ID}){_QUERY}"

ATTACH_PATH: re.Pattern[str] = re.compile(_PATH)
"""The attach request target; use ``fullmatch``. A query string is accepted and ignored."""

_REQUEST_LINE = re.compile(rb"POST " + _PATH.encode() + rb" HTTP/1\.[01]")
_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_ID = re.compile(r"[\x00-\x1f\x7f/]")
_DIGITS = re.compile(r"[0-9]+")

# The request line as a sequence of steps, for deciding on a prefix (see _could_be_attach).
_ID_BYTES = frozenset(b for b in range(0x21, 0x7F) if b not in b"/?#")
_QUERY_BYTES = frozenset(b for b in range(0x21, 0x7F) if b != ord("#"))
_STEPS: tuple[tuple[str, bytes], ...] = (
    ("literal", b"POST /v1/applications/"),
    ("id", b""),
    ("literal", b"/devices/"),
    ("id", b""),
    ("query", b""),
    ("literal", b" HTTP/1."),
    ("one of", b"01"),
    ("literal", b"\r"),
)


class Sniff(Enum):
    """What the first bytes of a connection are."""

    NEED_MORE = "need_more"
    ATTACH = "attach"
    OTHER = "other"


class MalformedAttach(RemoteProtocolError):
    """The device's attach head or body is broken; answer 400 and close."""

    status_hint = 400
    error_code = "malformed_attach"


@dataclass(frozen=True, slots=True)
class AttachRequest:
    """A parsed attach: ids percent-decoded, header names lower-case, ``consumed`` bytes used."""

    app_id: str
    device_id: str
    platform: str
    headers: dict[str, str]
    consumed: int


def sniff(data: bytes) -> Sniff:
    """Decide from the request line alone whether a connection is a Cometa attach.

    Answers OTHER as soon as the bytes seen cannot begin an attach request line, so ordinary
    HTTP (and TLS, whose first byte is 0x16) is handed on with the least delay; NEED_MORE only
    while they still could; OTHER past ``MAX_REQUEST_LINE`` bytes without a line end. Never
    raises.
    """
    head = bytes(data[:MAX_REQUEST_LINE])
    nl = head.find(b"\n")
    if nl >= 0:
        line = head[:nl].removesuffix(b"\r")
        return Sniff.ATTACH if _REQUEST_LINE.fullmatch(line) else Sniff.OTHER
    if len(head) >= MAX_REQUEST_LINE or not _could_be_attach(head):
        return Sniff.OTHER
    return Sniff.NEED_MORE


def _could_be_attach(head: bytes) -> bool:
    """True while ``head`` (no LF in it) is a prefix of some attach request line."""
    n = len(head)
    pos = 0
    for kind, arg in _STEPS:
        if pos == n:
            return True
        if kind == "literal":
            k = min(len(arg), n - pos)
            if head[pos : pos + k] != arg[:k]:
                return False
            pos += k
        elif kind == "id":
            start = pos
            while pos < n and head[pos] in _ID_BYTES:
                pos += 1
            if pos == start:
                return False
        elif kind == "query":
            if head[pos] == 0x3F:  # "?"
                pos += 1
                while pos < n and head[pos] in _QUERY_BYTES:
                    pos += 1
        elif head[pos] in arg:  # "one of"
            pos += 1
        else:
            return False
    return pos == n


def parse_attach(data: bytes, max_body: int = 4096) -> AttachRequest | None:
    """Parse an attach from the start of ``data``; None while the head or body is incomplete.

    LF and CRLF line ends are both accepted, header names in any case, and both
    ``Content-Length: N`` and ``Content-Length:N`` (one original client omits the space;
    COMPAT.md, Cometa, "Device side", point 1). Without a Content-Length the body is empty.
    Everything after ``consumed`` bytes is the device's chunk stream, not HTTP.

    Args:
        data: every byte received on the connection so far.
        max_body: the largest platform string accepted, in bytes.

    Returns:
        The attach, or None when more bytes are needed.

    Raises:
        MalformedAttach: the request line is not an attach, a header line is broken, the
            Content-Length is not a non-negative integer or exceeds ``max_body``, a
            Transfer-Encoding is present, the head exceeds ``MAX_ATTACH_HEAD`` bytes, or a
            decoded id is not valid UTF-8 or contains "/" or a control character.
    """
    end = _HEAD_END.search(data, 0, MAX_ATTACH_HEAD)
    if end is None:
        if len(data) >= MAX_ATTACH_HEAD:
            raise MalformedAttach(f"attach head longer than {MAX_ATTACH_HEAD} bytes")
        return None
    lines = data[: end.start()].split(b"\n")
    request = _REQUEST_LINE.fullmatch(lines[0].removesuffix(b"\r"))
    if request is None:
        raise MalformedAttach("not a Cometa attach request line")
    headers = _parse_headers(lines[1:])
    if "transfer-encoding" in headers:
        # The chunk stream starts right after the body, so the body's end must be known.
        raise MalformedAttach("an attach body must have a Content-Length, not a Transfer-Encoding")
    length = _content_length(headers, max_body)
    consumed = end.end() + length
    if len(data) < consumed:
        return None
    return AttachRequest(
        app_id=_decode_id(request["app_id"]),
        device_id=_decode_id(request["device_id"]),
        platform=data[end.end() : consumed].decode("utf-8", "replace").strip(),
        headers=headers,
        consumed=consumed,
    )


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    """Header lines to a dict with lower-case names; repeated headers are joined with ", "."""
    headers: dict[str, str] = {}
    for raw in lines:
        line = raw.removesuffix(b"\r")
        name, colon, value = line.partition(b":")
        # No space before the colon and no obsolete line folding (RFC 9112 section 5).
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedAttach(f"broken header line {line[:40]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise MalformedAttach(f"control character in header {name[:40]!r}")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise MalformedAttach("conflicting Content-Length headers")
            if key != "content-length":
                headers[key] += ", " + text
        else:
            headers[key] = text
    return headers


def _content_length(headers: dict[str, str], max_body: int) -> int:
    """The body length; 0 when absent."""
    text = headers.get("content-length")
    if text is None:
        return 0
    if not _DIGITS.fullmatch(text):
        raise MalformedAttach(f"Content-Length is not a non-negative integer: {text[:20]!r}")
    # Compare the digit count first: int() refuses strings of more than 4300 digits.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(max_body)) or int(digits) > max_body:
        raise MalformedAttach(f"attach body longer than {max_body} bytes")
    return int(digits)


def _decode_id(raw: bytes) -> str:
    """Percent-decode one id segment (``%3A`` is ":") and check what it decodes to."""
    try:
        text = unquote(raw.decode("ascii"), errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedAttach(f"id {raw[:40]!r} is not UTF-8 once percent-decoded") from exc
    # "/" would make the id unreachable through the REST routes; control characters would
    # end up in logs and presence objects.
    if _BAD_ID.search(text):
        raise MalformedAttach(f"id {raw[:40]!r} decodes to a '/' or a control character")
    return text


def accept_head(heartbeat: int, timestamp: int) -> bytes:
    """The 200 response head plus its first chunk, as one bytes value for one write.

    The first chunk must start exactly ``{"msg":"200"`` and carry an integer timestamp; a newer
    client rejects ``"200 OK"`` (COMPAT.md, Cometa, "Device side", point 2). The response is
    chunked and never ends.
    """
    payload = b'{"msg":"200","heartbeat":%d,"timestamp":%d}' % (heartbeat, timestamp)
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n" + encode_chunk(payload)
    )


def reject(status: int, reason: str) -> bytes:
    """A complete refusal, e.g. ``reject(403, "Forbidden")``, after which the server closes.

    The body is ``{"msg":"<status> <reason>"}``, the form the clients know (COMPAT.md, point 2).

    Raises:
        LocalProtocolError: ``status`` is not 100-599 or ``reason`` is not printable ASCII.
    """
    if not 100 <= status <= 599:
        raise LocalProtocolError(f"not an HTTP status: {status}")
    if not (reason.isascii() and reason.isprintable()):
        raise LocalProtocolError(f"an HTTP reason must be printable ASCII: {reason!r}")
    body = json.dumps({"msg": f"{status} {reason}"}, separators=(",", ":")).encode()
    return (
        b"HTTP/1.1 %d %b\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n%b" % (status, reason.encode("ascii"), len(body), body)
    )
