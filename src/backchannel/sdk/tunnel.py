"""HTTP tunnels: give a local HTTP service a public URL through the device connection.

A :class:`Tunnel` wraps a :class:`~backchannel.sdk.device.Device` (its connection, backoff
and heartbeats), asks the server for a tunnel with the ``X-Backchannel-Tunnel`` header, and
answers each public request, which arrives as a server-opened stream (docs/protocol.md,
"HTTP tunnels"), by forwarding it to the local service:

- the request body streams from the stream to the local service and the response body
  from the local service to the stream, under stream credit, so a 1 GiB transfer never
  sits in memory and a slow public reader slows the reading from the local service;
- the answer goes back as the local service sent it: no decompression, no redirects
  followed, no cookies kept, no headers added;
- WebSocket upgrades open a WebSocket to the local service and carry messages both ways.

Use it on its own (``Tunnel(server, app, device, key, 3000)``) or on a device that also
answers calls (``device.expose(3000)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import ssl as ssl_module
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp import WSMsgType
from multidict import CIMultiDict

from backchannel.sdk._link import call_hook
from backchannel.sdk._streams import (
    RESET_FAILED,
    RESET_REFUSED,
    RESET_UNREACHABLE,
    StreamChannel,
    StreamResetError,
)
from backchannel.sdk.device import TUNNEL_HEADER, Device
from backchannel.wire.errors import ProtocolError
from backchannel.wire.native.tunnel import (
    WS_BINARY,
    WS_CLOSE,
    WS_TEXT,
    RequestHead,
    ResponseHead,
    WsMessageReader,
    encode_response_head,
    encode_ws_message,
    parse_request_meta,
    strip_hop_by_hop,
)

log = logging.getLogger("backchannel.sdk.tunnel")

__all__ = ["TUNNEL_HEADER", "LocalTarget", "RequestHook", "Tunnel", "tunnel_options"]

#: ``on_request(method, path, status, duration_s, bytes_out)``, sync or async; ``path`` is
#: the request target (path and query). Status 502 when the local service could not be
#: reached, 499 when the caller went away before the answer's head.
RequestHook = Callable[[str, str, int, float, int], Any]

STATUS_UNREACHABLE = 502
STATUS_CALLER_GONE = 499  # the caller went away before the head (nginx's convention)

LOCAL_CONNECT_TIMEOUT = 15.0  # dialling the local service; answers may take any time
WS_MAX_MESSAGE = 64 * 1024 * 1024  # one WebSocket message, either direction
WS_CLOSE_GRACE = 5.0  # after one side closed, how long the other has to close too

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_U16 = struct.Struct("!H")
# Headers aiohttp would add on its own; the caller's, when present, are forwarded as is.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
#: Answers of at most this many bytes, with a Content-Length, are sent in one frame.
_WHOLE_ANSWER = 64 * 1024
# The WebSocket handshake fields the local handshake replaces (RFC 6455).
_WS_HANDSHAKE = "sec-websocket-"


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """The local service: scheme, host, port and an optional path prefix."""

    url: yarl.URL

    @classmethod
    def parse(cls, target: int | str) -> LocalTarget:
        """A port (``3000``, ``"3000"``), ``host:port``, or an ``http(s)://`` URL.

        Raises:
            ValueError: not a port or an http(s) URL with a host.
        """
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            port = int(target)
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
            return cls(yarl.URL.build(scheme="http", host="localhost", port=port))
        text = target.strip()
        if "://" not in text:
            text = "http://" + text
        try:
            url = yarl.URL(text)
            url.port  # noqa: B018 - parses the port, raising on a bad one
        except ValueError as exc:
            raise ValueError(f"invalid target {target!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"target must be a port or an http(s):// URL, got {target!r}")
        if url.query_string or url.fragment or url.user or url.password:
            raise ValueError(f"target {target!r} must not have a query, fragment or user")
        return cls(url)

    @property
    def base(self) -> str:
        """The URL that request targets are appended to: no trailing slash."""
        url = self.url
        return f"{url.scheme}://{url.host_port_subcomponent}{url.raw_path.rstrip('/')}"

    @property
    def host_header(self) -> str:
        """``host[:port]`` of the local service (the Host header with ``rewrite_host``)."""
        return str(self.url.host_port_subcomponent)

    def http_url(self, target: str) -> yarl.URL:
        """The local URL of a request target, byte for byte (nothing re-encoded)."""
        return yarl.URL(self.base + target, encoded=True)

    def ws_url(self, target: str) -> yarl.URL:
        """The local WebSocket URL of a request target."""
        scheme = "wss" if self.url.scheme == "https" else "ws"
        return yarl.URL(scheme + self.base[len(self.url.scheme) :] + target, encoded=True)

    def __str__(self) -> str:
        return self.base or str(self.url)


def tunnel_options(
    *,
    name: str | None = None,
    basic_auth: str | None = None,
    bearer: str | None = None,
    allow_ip: Iterable[str] = (),
    deny_ip: Iterable[str] = (),
    rate_limit: float | None = None,
) -> dict[str, Any]:
    """The ``X-Backchannel-Tunnel`` object, checked here so mistakes show before dialling.

    The server checks again and closes with 4006 when it disagrees.

    Raises:
        ValueError: an option is invalid (the message names it).
    """
    options: dict[str, Any] = {}
    if name is not None:
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"invalid tunnel name {name!r}: use 1-63 lower-case letters, digits and "
                "inner hyphens"
            )
        options["name"] = name
    if basic_auth is not None:
        if ":" not in basic_auth or basic_auth.startswith(":"):
            raise ValueError("basic auth must be 'user:password'")
        options["basic_auth"] = basic_auth
    if bearer is not None:
        if not bearer:
            raise ValueError("the bearer token must not be empty")
        options["bearer"] = bearer
    for key, values in (("allow_ip", allow_ip), ("deny_ip", deny_ip)):
        networks = [str(v).strip() for v in values]
        for value in networks:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{key}: {value!r} is not an IP address or CIDR") from None
        if networks:
            options[key] = networks
    if rate_limit is not None:
        if isinstance(rate_limit, bool) or not 0 < rate_limit < 1e6:
            raise ValueError("the rate limit must be a positive number of requests per second")
        options["rate_limit"] = int(rate_limit) if float(rate_limit).is_integer() else rate_limit
    return options


def _http_base(ws_url: str) -> str:
    """The server's base URL (http or https) from the device's ``/v1/connect`` URL."""
    url = yarl.URL(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    path = url.path.removesuffix("/v1/connect").rstrip("/")
    return str(url.with_scheme(scheme).with_path(path or "/")).rstrip("/")


# -- the tunnel --------------------------------------------------------------------------------


class Tunnel:
    """A public URL for a local HTTP service, kept up across network drops.

    ``target`` is a port (``3000``: ``http://localhost:3000``) or an ``http(s)://`` URL,
    possibly with a path prefix that every request target is appended to. The access
    options are the server's (docs/protocol.md, "HTTP tunnels"): ``basic_auth``
    (``"user:password"``) and/or ``bearer`` credentials callers must send, ``allow_ip`` /
    ``deny_ip`` CIDR lists, and ``rate_limit`` in requests per second per caller address.
    With ``rewrite_host`` the local service sees its own ``host:port`` as Host instead of
    the public one (the public host is in ``X-Forwarded-Host`` either way).

    Raises:
        ValueError: the target or an option is invalid.
    """

    def __init__(
        self,
        server: str,
        app_id: str,
        device_id: str,
        key: str | None,
        target: int | str,
        *,
        name: str | None = None,
        basic_auth: str | None = None,
        bearer: str | None = None,
        allow_ip: Iterable[str] = (),
        deny_ip: Iterable[str] = (),
        rate_limit: float | None = None,
        rewrite_host: bool = False,
        on_request: RequestHook | None = None,
        verify_local_tls: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        ssl: ssl_module.SSLContext | bool | None = None,
        on_connect: Callable[[], Any] | None = None,
        on_disconnect: Callable[[int | None], Any] | None = None,
    ) -> None:
        device = Device(
            server,
            app_id,
            device_id,
            key,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            ssl=ssl,
            info="tunnel",
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        )
        self._setup(
            device,
            target,
            tunnel_options(
                name=name,
                basic_auth=basic_auth,
                bearer=bearer,
                allow_ip=allow_ip,
                deny_ip=deny_ip,
                rate_limit=rate_limit,
            ),
            rewrite_host=rewrite_host,
            on_request=on_request,
            verify_local_tls=verify_local_tls,
        )

    @classmethod
    def _on_device(
        cls,
        device: Device,
        target: int | str,
        options: dict[str, Any],
        *,
        rewrite_host: bool,
        on_request: RequestHook | None,
        verify_local_tls: bool,
    ) -> Tunnel:
        """A tunnel riding on an existing device (:meth:`Device.expose`)."""
        tunnel = cls.__new__(cls)
        tunnel._setup(
            device,
            target,
            options,
            rewrite_host=rewrite_host,
            on_request=on_request,
            verify_local_tls=verify_local_tls,
        )
        return tunnel

    def _setup(
        self,
        device: Device,
        target: int | str,
        options: dict[str, Any],
        *,
        rewrite_host: bool,
        on_request: RequestHook | None,
        verify_local_tls: bool,
    ) -> None:
        self._device = device
        self._target = LocalTarget.parse(target)
        self._options = options
        self._base = _http_base(device.url)
        self.service = _TunnelService(self._target, rewrite_host, on_request, verify_local_tls)
        device._attach_tunnel(self, json.dumps(options, separators=(",", ":")))

    # -- state ---------------------------------------------------------------------------

    @property
    def device(self) -> Device:
        """The device the tunnel rides on (it may answer calls and emit events too)."""
        return self._device

    @property
    def target(self) -> str:
        """The local service's base URL."""
        return str(self._target)

    @property
    def ready(self) -> bool:
        """True while the tunnel is up (connected, and the server granted it)."""
        return self._device.connected and self._device._tunnel_info is not None

    @property
    def name(self) -> str | None:
        """The tunnel's name: the server's once granted, before that the one asked for."""
        info = self._device._tunnel_info
        if info is not None and isinstance(info.get("name"), str):
            return str(info["name"])
        name = self._options.get("name")
        return str(name) if name is not None else None

    @property
    def public_url(self) -> str | None:
        """``{server}/go/{token}/``: stable across reconnects; None until first granted."""
        info = self._device._tunnel_info
        path = info.get("path") if info is not None else None
        if not isinstance(path, str):
            return None
        return self._base + (path if path.startswith("/") else "/" + path)

    @property
    def host_url(self) -> str | None:
        """``{scheme}://{name}.{domain}/`` when the server has a domain, else None."""
        info = self._device._tunnel_info
        host = info.get("host") if info is not None else None
        if not isinstance(host, str) or not host:
            return None
        base = yarl.URL(self._base)
        if ":" not in host and base.explicit_port is not None:
            host = f"{host}:{base.explicit_port}"
        return f"{base.scheme}://{host}/"

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self.service.in_flight

    async def wait_ready(self, timeout: float | None = None) -> str:
        """Wait until the tunnel is up; return its public URL.

        Raises:
            TunnelRefused: the server refused the tunnel (close 4006), e.g. name taken.
            AuthenticationFailed: the credentials were refused (4001).
            TimeoutError: not up within ``timeout`` seconds.
        """
        await self._device.wait_connected(timeout)
        url = self.public_url
        assert url is not None  # the device checks HELLO's tunnel map before it connects
        return url

    # -- running -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Keep the tunnel up until :meth:`stop` (see :meth:`Device.serve` for errors)."""
        await self._device.serve()

    async def stop(self) -> None:
        """Close the connection and local requests; :meth:`serve` returns."""
        await self._device.stop()

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (KeyboardInterrupt propagates), blocking."""
        self._device.run()

    def __repr__(self) -> str:
        return f"<Tunnel {self.name or '?'} -> {self._target} ({self.public_url or 'not ready'})>"


# -- forwarding ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    status: int = STATUS_CALLER_GONE
    sent: int = 0


def _decode_header(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _close_payload(code: int, reason: str = "") -> bytes:
    return _U16.pack(code) + _clip_reason(reason.encode())


def _clip_reason(reason: bytes) -> bytes:
    """A close reason cut to the 123 bytes a close frame allows, on a character boundary."""
    return reason[:123].decode(errors="ignore").encode()


def _sendable_close_code(code: int | None, default: int = 1000) -> int:
    """A close code a WebSocket endpoint may send (RFC 6455 section 7.4)."""
    if code is None:
        return default
    if code == 1006:  # abnormal closure: the connection dropped without a close frame
        return 1011
    if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return default


class _TunnelService:
    """Answers tunnel request streams by forwarding them to the local service."""

    def __init__(
        self,
        target: LocalTarget,
        rewrite_host: bool,
        on_request: RequestHook | None,
        verify_local_tls: bool,
    ) -> None:
        self._target = target
        self._rewrite_host = rewrite_host
        self._on_request = on_request
        self._ssl: bool = verify_local_tls
        self._http: aiohttp.ClientSession | None = None
        self.in_flight = 0

    def _session(self) -> aiohttp.ClientSession:
        http = self._http
        if http is None or http.closed:
            http = self._http = aiohttp.ClientSession(
                # The answer goes back exactly as the local service sent it.
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=LOCAL_CONNECT_TIMEOUT, sock_read=None
                ),
                trust_env=False,
                max_line_size=64 * 1024,
                max_field_size=64 * 1024,
                max_headers=1024,
            )
        return http

    async def close(self) -> None:
        """Close the local connections (serving ended)."""
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def _forward_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = strip_hop_by_hop(headers)
        if self._rewrite_host:
            out = [(k, v) for k, v in out if k.lower() != "host"]
            out.insert(0, ("Host", self._target.host_header))
        return out

    async def handle(self, stream: StreamChannel) -> None:
        """Answer one public request."""
        started = time.monotonic()
        try:
            head = parse_request_meta(stream.meta)
        except ProtocolError as exc:
            await stream.reset(RESET_REFUSED, f"bad tunnel request: {exc}")
            return
        outcome = _Outcome()
        self.in_flight += 1
        try:
            if head.websocket:
                await self._websocket(stream, head, outcome)
            else:
                await self._http_exchange(stream, head, outcome)
        finally:
            self.in_flight -= 1
            duration = time.monotonic() - started
            await call_hook(
                self._on_request, head.method, head.target, outcome.status, duration, outcome.sent
            )

    # -- plain HTTP ----------------------------------------------------------------------

    async def _http_exchange(
        self, stream: StreamChannel, head: RequestHead, outcome: _Outcome
    ) -> None:
        body = None if stream.remote_fin else _request_body(stream)
        try:
            response = await self._session().request(
                head.method,
                self._target.http_url(head.target),
                headers=CIMultiDict(self._forward_headers(head.headers)),
                skip_auto_headers=_SKIP_AUTO,
                data=body,
                allow_redirects=False,
                ssl=self._ssl,
            )
        except aiohttp.ClientConnectorError as exc:
            # Refused, DNS, TLS: nothing reached the local service.
            outcome.status = STATUS_UNREACHABLE
            await stream.reset(RESET_UNREACHABLE, f"cannot reach {self._target}: {exc}")
            return
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if stream.error is not None:
                return  # the body failed because the stream ended: nothing to answer
            outcome.status = STATUS_UNREACHABLE
            await stream.reset(RESET_FAILED, f"the local service failed: {_describe(exc)}")
            return
        async with response:
            outcome.status = response.status
            headers = strip_hop_by_hop(
                [(_decode_header(k), _decode_header(v)) for k, v in response.raw_headers]
            )
            head_bytes = encode_response_head(ResponseHead(response.status, headers))
            length = response.content_length
            if length is not None and length <= _WHOLE_ANSWER:
                # A small answer of known size goes out as one frame, head, body and FIN
                # together: one WebSocket message for the relay to read instead of three.
                try:
                    data = await response.read()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    await stream.reset(RESET_FAILED, f"the local service failed: {_describe(exc)}")
                    return
                outcome.sent += len(data)
                await stream.send(head_bytes + data, fin=True)
                return
            await stream.send(head_bytes)
            try:
                # As it arrives, so server-sent events and long polls flow as produced.
                async for chunk in response.content.iter_any():
                    await stream.send(chunk)
                    outcome.sent += len(chunk)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                await stream.reset(RESET_FAILED, f"the local service failed: {_describe(exc)}")
                return
            await stream.send(b"", fin=True)

    # -- WebSocket -----------------------------------------------------------------------

    async def _websocket(self, stream: StreamChannel, head: RequestHead, outcome: _Outcome) -> None:
        offered = [
            p.strip()
            for k, v in head.headers
            if k.lower() == "sec-websocket-protocol"
            for p in v.split(",")
            if p.strip()
        ]
        headers = [
            (k, v)
            for k, v in self._forward_headers(head.headers)
            if not k.lower().startswith(_WS_HANDSHAKE)
        ]
        try:
            local = await self._session().ws_connect(
                self._target.ws_url(head.target),
                protocols=offered,
                headers=CIMultiDict(headers),
                autoping=True,
                compress=0,
                max_msg_size=WS_MAX_MESSAGE,
                ssl=self._ssl,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101:  # upgraded, but the handshake was wrong
                await self._answer_unreachable(stream, outcome, f"bad handshake: {exc.message}")
                return
            # The local service answered without upgrading: pass its status and headers on
            # (aiohttp has dropped the body).
            outcome.status = exc.status
            headers = [
                (k, v)
                for k, v in strip_hop_by_hop(list((exc.headers or {}).items()))
                if k.lower() not in ("content-length", "content-encoding")
            ]
            headers.append(("Content-Length", "0"))
            await stream.send(encode_response_head(ResponseHead(exc.status, headers)), fin=True)
            return
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            await self._answer_unreachable(stream, outcome, _describe(exc))
            return
        try:
            outcome.status = 101
            answer = [("Sec-WebSocket-Protocol", local.protocol)] if local.protocol else []
            await stream.send(encode_response_head(ResponseHead(101, answer)))
            await _pump_websocket(stream, local, outcome)
        finally:
            await local.close()

    async def _answer_unreachable(
        self, stream: StreamChannel, outcome: _Outcome, detail: str
    ) -> None:
        outcome.status = STATUS_UNREACHABLE
        body = json.dumps(
            {"error": "local_unreachable", "detail": f"cannot reach {self._target}: {detail}"}
        ).encode()
        head = ResponseHead(
            STATUS_UNREACHABLE,
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        await stream.send(encode_response_head(head) + body, fin=True)


async def _request_body(stream: StreamChannel) -> AsyncIterator[bytes]:
    """The request body as it arrives; each chunk is credited back once taken."""
    while chunk := await stream.receive():
        yield chunk


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _pump_websocket(
    stream: StreamChannel, local: aiohttp.ClientWebSocketResponse[bool], outcome: _Outcome
) -> None:
    """Carry messages both ways until both sides closed (or one did and the other lags)."""
    loop = asyncio.get_running_loop()
    to_local = loop.create_task(_caller_to_local(stream, local))
    to_caller = loop.create_task(_local_to_caller(stream, local, outcome))
    tasks = {to_local, to_caller}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # A caller direction that ended without a close message (a FIN alone) says nothing
        # about the local side: keep carrying its messages until it closes.
        if to_local in done and not to_local.exception() and not to_local.result():
            await asyncio.wait({to_caller})
        await asyncio.wait(tasks, timeout=WS_CLOSE_GRACE)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, StreamResetError):
            # Mostly races with a closing side (writing to a closed socket).
            log.debug("tunnel WebSocket ended with %r", result)


async def _caller_to_local(
    stream: StreamChannel, local: aiohttp.ClientWebSocketResponse[bool]
) -> bool:
    """Messages from the caller to the local service; True once the caller closed."""
    reader = WsMessageReader(WS_MAX_MESSAGE)
    while True:
        data = await stream.receive()
        if not data:
            return False
        try:
            messages = reader.feed(data)
        except ProtocolError as exc:
            await stream.reset(RESET_FAILED, f"bad WebSocket message from the server: {exc}")
            return True
        for kind, payload in messages:
            if kind == WS_TEXT:
                await local.send_str(payload.decode(errors="replace"))
            elif kind == WS_BINARY:
                await local.send_bytes(payload)
            else:
                code = _U16.unpack_from(payload)[0] if len(payload) >= 2 else None
                await local.close(
                    code=_sendable_close_code(code), message=_clip_reason(payload[2:])
                )
                return True


async def _local_to_caller(
    stream: StreamChannel, local: aiohttp.ClientWebSocketResponse[bool], outcome: _Outcome
) -> None:
    """Messages from the local service to the caller, then its close message and FIN."""
    reason = ""
    while True:
        msg = await local.receive()
        if msg.type is WSMsgType.TEXT:
            data = encode_ws_message(WS_TEXT, msg.data.encode())
        elif msg.type is WSMsgType.BINARY:
            data = encode_ws_message(WS_BINARY, msg.data)
        else:
            if msg.type is WSMsgType.CLOSE and isinstance(msg.extra, str):
                reason = msg.extra
            elif msg.type is WSMsgType.ERROR:
                reason = _describe(msg.data) if isinstance(msg.data, BaseException) else ""
            break
        await stream.send(data)
        outcome.sent += len(data)
    code = _sendable_close_code(local.close_code)
    with contextlib.suppress(StreamResetError):
        await stream.send(encode_ws_message(WS_CLOSE, _close_payload(code, reason)), fin=True)
