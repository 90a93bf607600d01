"""The payload of the Socket.IO ``request`` event: one public HTTP request, as Socket2me sent it.

The original server ran Express 4 with the extended (``qs``) query parser and body-parser's
``json()`` and ``urlencoded({extended: true})`` middleware, so its clients receive exactly what
those produce (COMPAT.md, Socket2me, "Socket.IO side"). This module rebuilds that shape from
the raw request, and adds ``rawBody`` so that bodies body-parser did not understand still
reach the client.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterable
from typing import Any

from qs_codec import Charset, DecodeOptions, decode

REQUEST_EVENT = "request"
"""The Socket.IO event the server emits, with an acknowledgement, for each public request."""

# Node's http module keeps only the first of these when a request repeats them (the
# documentation of ``IncomingMessage.headers``); every other repeated header is joined.
_FIRST_ONLY = frozenset(
    {
        "age",
        "authorization",
        "content-length",
        "content-type",
        "etag",
        "expires",
        "from",
        "host",
        "if-modified-since",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "proxy-authorization",
        "referer",
        "retry-after",
        "server",
        "user-agent",
    }
)

# Express 4's "extended" query parser is ``qs.parse(str, {allowPrototypes: true})``: qs's own
# limits. qs_codec's defaults are the same today; they are spelled out so that a change of
# default in a later qs_codec cannot silently change what clients receive.
_QUERY_OPTIONS = DecodeOptions(depth=5, list_limit=20, parameter_limit=1000)

# body-parser's urlencoded parser refuses (413/400) a form with more parameters or deeper
# nesting than this, so such a form never reached a client; here it becomes ``{}`` instead
# (the raw bytes still go through as ``rawBody``).
_FORM_PARAMETER_LIMIT = 1000
_FORM_DEPTH = 32
# body-parser raises qs's list limit to the number of parameters, with a floor of 100.
_FORM_LIST_FLOOR = 100

# Charsets that body-parser (via qs) decodes forms in; anything else is read as UTF-8.
_LATIN1_NAMES = frozenset({"iso-8859-1", "latin1", "latin-1", "iso8859-1", "l1"})

# Numbers with more digits than this are parsed as floats, as JavaScript would, instead of
# as exact ints: int() refuses strings of more than 4300 digits.
_MAX_INT_DIGITS = 300


def build_request(
    method: str,
    path: str,
    query_string: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> dict[str, Any]:
    """Build the ``request`` event payload for one public request; never raises.

    Args:
        method: the HTTP method, in any case.
        path: the part of the path after ``/go/{token}/``, already percent-decoded, without
            the query; one leading "/" is tolerated and removed.
        query_string: the raw query string, without the "?".
        headers: the request's header lines in arrival order, repeated names included.
        body: the raw request body.

    Returns:
        A dict with the keys ``headers``, ``method``, ``url`` (absent when the path is
        empty), ``query``, ``body`` and ``rawBody``, in that order.
    """
    joined = _join_headers(headers)
    payload: dict[str, Any] = {"headers": joined, "method": method.upper()}
    url = path.removeprefix("/")
    if url:
        payload["url"] = url
    payload["query"] = _parse_query(query_string)
    content_type = joined.get("content-type")
    payload["body"] = _parse_body(content_type if isinstance(content_type, str) else "", body)
    payload["rawBody"] = bytes(body)
    return payload


def _join_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Merge header lines the way Node's ``IncomingMessage.headers`` does."""
    out: dict[str, str | list[str]] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        previous = out.get(name)
        if name == "set-cookie":
            # Node always gives set-cookie as a list, even for a single line.
            out[name] = [*previous, value] if isinstance(previous, list) else [value]
        elif previous is None:
            out[name] = value
        elif name in _FIRST_ONLY:
            continue
        elif name == "cookie":
            out[name] = f"{previous}; {value}"
        else:
            out[name] = f"{previous}, {value}"
    return out


def _parse_query(query_string: str) -> dict[str, Any]:
    """The query string parsed like ``qs`` in extended mode; ``{}`` if it cannot be parsed."""
    try:
        return _plain_dict(decode(query_string, _QUERY_OPTIONS))
    except Exception:
        # Whatever qs_codec trips over, the request must still reach the client.
        return {}


def _parse_body(content_type: str, body: bytes) -> Any:
    """The ``body`` field: what body-parser would have produced, or ``{}``."""
    if not body:
        return {}
    media_type, charset = _media_type(content_type)
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return _parse_json(body, charset)
    if media_type == "application/x-www-form-urlencoded":
        return _parse_form(body, charset)
    return {}


def _media_type(content_type: str) -> tuple[str, str | None]:
    """Split a Content-Type value into its lower-case media type and its charset, if any."""
    media_type, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        key, eq, value = param.partition("=")
        if eq and key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower() or None
    return media_type.strip().lower(), charset


def _parse_json(body: bytes, charset: str | None) -> Any:
    """Parse a JSON body like body-parser's strict ``json()``; ``{}`` on any failure."""
    encoding = "utf-8" if charset is None else charset
    if not encoding.startswith("utf-"):
        # body-parser answers 415 to any other charset, so such a body never reached a client.
        return {}
    try:
        # "utf-8-sig" drops a leading BOM, as body-parser's decoder does.
        if codecs.lookup(encoding).name == "utf-8":
            encoding = "utf-8-sig"
        text = body.decode(encoding, errors="replace")
        parsed = json.loads(
            text,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except (LookupError, ValueError, RecursionError):
        return {}
    # body-parser's strict mode (its default) only accepts objects and arrays.
    return parsed if isinstance(parsed, dict | list) else {}


def _json_int(text: str) -> int | float | None:
    """A JSON integer; a float (or None past the double range) when too long for int()."""
    return int(text) if len(text) <= _MAX_INT_DIGITS else _json_float(text)


def _json_float(text: str) -> float | None:
    """A JSON number with a fraction or exponent; None when it overflows.

    JavaScript parses ``1e400`` as Infinity, which JSON.stringify then sends as null; Python's
    json would send Infinity, which the client cannot parse.
    """
    value = float(text)
    return value if math.isfinite(value) else None


def _json_constant(text: str) -> float:
    """Refuse NaN and Infinity, which JSON.parse does not accept."""
    raise ValueError(f"not JSON: {text}")


def _parse_form(body: bytes, charset: str | None) -> dict[str, Any]:
    """Parse a urlencoded body like body-parser's ``urlencoded({extended: true})``."""
    latin1 = charset in _LATIN1_NAMES
    text = body.decode("latin-1") if latin1 else body.decode("utf-8", errors="replace")
    parameters = text.count("&") + 1
    if parameters > _FORM_PARAMETER_LIMIT:
        return {}
    options = DecodeOptions(
        charset=Charset.LATIN1 if latin1 else Charset.UTF8,
        depth=_FORM_DEPTH,
        strict_depth=True,
        list_limit=max(_FORM_LIST_FLOOR, parameters),
        parameter_limit=_FORM_PARAMETER_LIMIT,
    )
    try:
        return _plain_dict(decode(text, options))
    except Exception:
        # Includes the IndexError strict_depth raises past _FORM_DEPTH levels.
        return {}


def _plain_dict(value: dict[str, Any]) -> dict[str, Any]:
    """Copy qs_codec's result into plain dicts and lists.

    qs_codec marks list overflows with a dict subclass; plain types serialise the same way
    whichever JSON encoder the transport uses.
    """
    return {str(k): _plain(v) for k, v in value.items()}


def _plain(value: Any) -> Any:
    """One value of a qs_codec result, with its containers made plain."""
    if isinstance(value, dict):
        return _plain_dict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
