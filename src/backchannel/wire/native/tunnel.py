"""HTTP tunnels over native streams: the request metadata, the response head, WebSocket messages.

A public request is one server-opened stream (docs/protocol.md, "HTTP tunnels"):

- ``STREAM_OPEN`` metadata is the request head (:func:`request_meta` / :func:`parse_request_meta`);
- the server's ``STREAM_DATA`` frames carry the request body, FIN at its end;
- the device's first bytes on the stream are the response head, length-prefixed msgpack
  (:func:`encode_response_head` / :class:`ResponseHeadReader`), then the response body,
  FIN at its end.

For a WebSocket upgrade the head says ``ws``; after a ``101`` response head both directions
carry WebSocket messages, each one ``u8 kind, u32 length, data`` (:func:`encode_ws_message`,
:class:`WsMessageReader`). Stream data boundaries mean nothing: heads and messages may be
split across frames, or share one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from backchannel.wire.errors import MalformedFrame

KIND_HTTP = "http"

# RFC 9110 section 7.6.1: connection-specific fields that a proxy must not forward, plus
# those named in Connection. Content-Length is framing, recomputed by each hop that needs it.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

WS_TEXT = 1
WS_BINARY = 2
WS_CLOSE = 8
_WS_KINDS = frozenset({WS_TEXT, WS_BINARY, WS_CLOSE})
_WS_HEADER = struct.Struct("!BI")
_HEAD_LENGTH = struct.Struct("!I")

MAX_HEAD = 1 << 20  # a response head (status and headers) larger than this is refused
MAX_WS_MESSAGE = 1 << 30


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop fields, including those the Connection field names."""
    kept: list[tuple[str, str]] = []
    named: set[str] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                named = named or set()
                named.update(token.strip().lower() for token in value.split(","))
            continue
        kept.append((name, value))
    if named:
        kept = [(k, v) for k, v in kept if k.lower() not in named]
    return kept


@dataclass(slots=True)
class RequestHead:
    """A public request as the device sees it."""

    method: str
    # Path and query relative to the tunnel's root, byte for byte as received ("/a?b=1").
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    remote: str = ""
    websocket: bool = False


def request_meta(head: RequestHead) -> dict[str, Any]:
    """The STREAM_OPEN metadata of a tunnel request."""
    meta: dict[str, Any] = {
        "t": KIND_HTTP,
        "m": head.method,
        "u": head.target,
        "h": [[k, v] for k, v in head.headers],
        "r": head.remote,
    }
    if head.websocket:
        meta["ws"] = True
    return meta


def parse_request_meta(meta: dict[str, Any]) -> RequestHead:
    """Read STREAM_OPEN metadata back into a :class:`RequestHead`."""
    if meta.get("t") != KIND_HTTP:
        raise MalformedFrame(f"tunnel stream: unknown kind {meta.get('t')!r}")
    method, target, headers = meta.get("m"), meta.get("u"), meta.get("h", [])
    if not isinstance(method, str) or not method or not isinstance(target, str):
        raise MalformedFrame("tunnel stream: method and target must be strings")
    if not target.startswith("/"):
        raise MalformedFrame("tunnel stream: the target must start with '/'")
    return RequestHead(
        method=method,
        target=target,
        headers=_header_list(headers, "request"),
        remote=str(meta.get("r", "")),
        websocket=bool(meta.get("ws", False)),
    )


@dataclass(slots=True)
class ResponseHead:
    """The device's answer head."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)


def encode_response_head(head: ResponseHead) -> bytes:
    """The bytes that start the device's side of a tunnel stream."""
    packed: bytes = msgpack.packb({"s": head.status, "h": [[k, v] for k, v in head.headers]})
    return _HEAD_LENGTH.pack(len(packed)) + packed


class ResponseHeadReader:
    """Collects the response head from the first bytes of the device's side of a stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[ResponseHead | None, bytes]:
        """Feed stream data; return the head once complete, and the body bytes after it."""
        self._buffer += data
        if len(self._buffer) < 4:
            return None, b""
        (length,) = _HEAD_LENGTH.unpack_from(self._buffer)
        if length > MAX_HEAD:
            raise MalformedFrame(f"tunnel response head of {length} bytes is too large")
        if len(self._buffer) < 4 + length:
            return None, b""
        try:
            data_map = msgpack.unpackb(bytes(self._buffer[4 : 4 + length]))
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedFrame("tunnel response head is not msgpack") from exc
        rest = bytes(self._buffer[4 + length :])
        self._buffer = bytearray()
        if not isinstance(data_map, dict):
            raise MalformedFrame("tunnel response head is not a map")
        status = data_map.get("s")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise MalformedFrame(f"tunnel response status {status!r} is not 100-599")
        return ResponseHead(status, _header_list(data_map.get("h", []), "response")), rest


def encode_ws_message(kind: int, data: bytes) -> bytes:
    """One WebSocket message (text as UTF-8) framed for a tunnel stream."""
    return _WS_HEADER.pack(kind, len(data)) + data


class WsMessageReader:
    """Splits a tunnel stream's data back into WebSocket messages."""

    def __init__(self, max_message: int = MAX_WS_MESSAGE) -> None:
        self._buffer = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed stream data; return the complete messages as (kind, data)."""
        self._buffer += data
        out: list[tuple[int, bytes]] = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= _WS_HEADER.size:
            kind, length = _WS_HEADER.unpack_from(buf, pos)
            if kind not in _WS_KINDS:
                raise MalformedFrame(f"tunnel WebSocket message of unknown kind {kind}")
            if length > self._max:
                raise MalformedFrame(f"tunnel WebSocket message of {length} bytes is too large")
            end = pos + _WS_HEADER.size + length
            if len(buf) < end:
                break
            out.append((kind, bytes(buf[pos + _WS_HEADER.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def _header_list(raw: Any, what: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise MalformedFrame(f"tunnel {what} headers must be a list")
    headers: list[tuple[str, str]] = []
    for item in raw:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise MalformedFrame(f"tunnel {what} header {item!r} is not a [name, value] pair")
        headers.append((item[0], item[1]))
    return headers
