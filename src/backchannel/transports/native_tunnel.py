"""A native device's HTTP tunnel: public requests as server-opened streams (docs/protocol.md).

Each request is one stream. The request body is sent as credit allows; the device's side
starts with the response head and continues with the body, which is written to the caller
as it arrives. Credit returns to the device only when the caller's connection took a chunk,
so memory stays bounded by the stream windows whatever the body sizes. WebSocket upgrades
carry framed messages both ways after a ``101`` head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import TYPE_CHECKING, Any

import orjson

from backchannel.core import metrics
from backchannel.core.clock import Clock
from backchannel.core.outcomes import (
    ForwardFailed,
    LocalServiceFailed,
    TunnelBusy,
    TunnelDisconnected,
    TunnelRefused,
    TunnelTimedOut,
)
from backchannel.core.tunnel_access import TunnelAccess, parse_access
from backchannel.core.tunnel_names import TunnelNames
from backchannel.core.tunnels import (
    BodySource,
    PublicSocket,
    ResponseSink,
    TunnelRegistry,
    TunnelRequest,
)
from backchannel.state.store import TunnelName
from backchannel.transports.native_streams import ServerStream, StreamReset
from backchannel.wire.errors import ProtocolError
from backchannel.wire.native.tunnel import (
    WS_CLOSE,
    RequestHead,
    ResponseHead,
    ResponseHeadReader,
    WsMessageReader,
    encode_ws_message,
    request_meta,
    strip_hop_by_hop,
)

if TYPE_CHECKING:
    from backchannel.transports.native_ws import NativeSession

log = logging.getLogger(__name__)

KIND = "native"
RESET_LOCAL_UNREACHABLE = 2
RESET_LOCAL_FAILED = 3
_CLOSE_CODE = struct.Struct("!H")


class NativeTunnelClient:
    """The tunnel of one native session; implements ``core.tunnels.TunnelClient``."""

    kind = KIND

    def __init__(
        self,
        session: NativeSession,
        name: str,
        token_hash: str,
        access: TunnelAccess,
        max_inflight: int,
        body_limit: int = 0,
    ) -> None:
        self._session = session
        self.body_limit = body_limit  # bodies stream: 0 means no limit
        self.name = name
        self.token_hash = token_hash
        self.access = access
        self.remote = session.stats.remote
        self.connected_at = session.stats.connected_at
        self._max_inflight = max_inflight
        self._active = 0

    @property
    def in_flight(self) -> int:
        """Requests being answered."""
        return self._active

    def close(self, reason: str, *, takeover: bool = False) -> None:
        """Close the device's connection (takeover of the name, release, shutdown)."""
        self._session.close_soon(reason, takeover=takeover)

    def describe(self) -> dict[str, Any]:
        """Facts for the admin API."""
        return {
            "kind": self.kind,
            "name": self.name,
            "app_id": self._session.app_id,
            "device_id": self._session.device_id,
            "remote": self.remote,
            "connected_at": self.connected_at,
            "in_flight": self._active,
            "access": {
                "credentials": self.access.needs_credentials,
                "allow_ip": [str(n) for n in self.access.allow],
                "deny_ip": [str(n) for n in self.access.deny],
                "rate_limit": (
                    self.access.limiter.rate if self.access.limiter is not None else None
                ),
            },
        }

    async def exchange(
        self, request: TunnelRequest, body: BodySource, sink: ResponseSink, timeout: float
    ) -> None:
        """Stream one request to the device and its answer to the caller."""
        if self._session.closed:
            raise TunnelDisconnected("the tunnel's device disconnected")
        if self._active >= self._max_inflight:
            raise TunnelBusy(f"the tunnel has {self._active} requests in flight")
        head = RequestHead(
            request.method,
            request.target,
            strip_hop_by_hop(request.headers),
            request.remote,
            request.websocket,
        )
        self._active += 1
        # A WebSocket upgrade has no body but needs its direction open for the messages.
        no_body = not request.has_body and not request.websocket
        stream = self._session.open_stream(request_meta(head), fin=no_body)
        uploader: asyncio.Task[None] | None = None
        try:
            if request.has_body and not request.websocket:
                uploader = asyncio.get_running_loop().create_task(_upload(body, stream))
            answer, rest = await self._read_head(stream, timeout)
            if request.websocket and answer.status == 101:
                await _pass_websocket(stream, sink, answer, rest)
                return
            tail = stream.take_rest_if_complete()
            if tail is not None:
                # The whole answer is already here (the common small response): one write.
                await sink.whole(answer.status, strip_hop_by_hop(answer.headers), rest + tail)
                return
            await sink.start(answer.status, strip_hop_by_hop(answer.headers))
            if rest:
                await sink.write(rest)
            while chunk := await stream.receive():
                await sink.write(chunk)
            await sink.finish()
        except StreamReset as exc:
            if uploader is not None and uploader.done() and not uploader.cancelled():
                failure = uploader.exception()
                if isinstance(failure, ForwardFailed) and not sink.started:
                    raise failure from None  # e.g. the body was over the limit: 413
            if sink.started:
                raise  # the ingress cuts the caller's response off
            if exc.code in (RESET_LOCAL_UNREACHABLE, RESET_LOCAL_FAILED):
                raise LocalServiceFailed(f"the local service failed: {exc.reason}") from None
            raise TunnelDisconnected(f"the tunnel's device ended the request: {exc}") from None
        except BaseException:
            stream.reset(0, "the caller went away")
            raise
        finally:
            self._active -= 1
            if uploader is not None and not uploader.done():
                uploader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await uploader
            if not stream.finished:
                # Answered before the request body ended, or a WebSocket closed from one
                # side: end the stream on both sides so nothing is left open.
                stream.reset(0, "the exchange is over")

    async def _read_head(self, stream: ServerStream, timeout: float) -> tuple[ResponseHead, bytes]:
        reader = ResponseHeadReader()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await stream.receive()
                    if not data:
                        raise StreamReset(RESET_LOCAL_FAILED, "the answer ended before its head")
                    try:
                        head, rest = reader.feed(data)
                    except ProtocolError as exc:
                        stream.reset(1, str(exc))
                        raise StreamReset(RESET_LOCAL_FAILED, str(exc)) from None
                    if head is not None:
                        return head, rest
        except TimeoutError:
            stream.reset(0, "no response head in time")
            raise TunnelTimedOut(timeout) from None


async def _upload(body: BodySource, stream: ServerStream) -> None:
    """Send the request body; a failure resets the stream, which ends the exchange.

    A ``ForwardFailed`` (the body is over the limit) is re-raised after the reset, so the
    exchange can answer the caller with it.
    """
    try:
        while chunk := await body.read():
            await stream.send(chunk)
        await stream.send(b"", fin=True)
    except StreamReset:
        pass  # the device reset the stream: the exchange sees it too
    except ForwardFailed as exc:
        stream.reset(0, str(exc))
        raise
    except Exception as exc:
        log.info("tunnel request body failed: %s", exc)
        stream.reset(0, "the request body failed")


async def _pass_websocket(
    stream: ServerStream, sink: ResponseSink, answer: ResponseHead, rest: bytes
) -> None:
    """After the device's 101: relay WebSocket messages both ways until either side closes."""
    protocol = next((v for k, v in answer.headers if k.lower() == "sec-websocket-protocol"), None)
    public = await sink.accept_websocket(protocol)
    reader = WsMessageReader()
    to_device = asyncio.get_running_loop().create_task(_caller_to_device(public, stream))
    try:
        pending = rest
        while True:
            for kind, data in reader.feed(pending):
                await public.send(kind, data)
                if kind == WS_CLOSE:
                    return
            pending = await stream.receive()
            if not pending:
                await public.send(WS_CLOSE, _CLOSE_CODE.pack(1000))
                return
    except StreamReset:
        await public.send(WS_CLOSE, _CLOSE_CODE.pack(1011) + b"tunnel closed")
    finally:
        to_device.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await to_device


async def _caller_to_device(public: PublicSocket, stream: ServerStream) -> None:
    try:
        while True:
            kind, data = await public.receive()
            await stream.send(encode_ws_message(kind, data), fin=kind == WS_CLOSE)
            if kind == WS_CLOSE:
                return
    except StreamReset:
        pass


class NativeTunnels:
    """Opens a session's tunnel from its ``X-Backchannel-Tunnel`` header."""

    def __init__(
        self,
        names: TunnelNames,
        registry: TunnelRegistry,
        clock: Clock,
        *,
        domain: str | None,
        max_inflight: int,
        body_limit: int = 0,
    ) -> None:
        self._names = names
        self._registry = registry
        self._clock = clock
        self._domain = domain
        self._max_inflight = max_inflight
        self._body_limit = body_limit

    async def prepare(
        self, app_id: str, device_id: str, header: str
    ) -> tuple[TunnelName, TunnelAccess, dict[str, Any]]:
        """Check the options and claim the name; return it, its rules and HELLO's map."""
        try:
            options = orjson.loads(header)
        except orjson.JSONDecodeError:
            raise TunnelRefused("X-Backchannel-Tunnel must be a JSON object") from None
        if not isinstance(options, dict):
            raise TunnelRefused("X-Backchannel-Tunnel must be a JSON object")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TunnelRefused(f"unknown tunnel options: {', '.join(sorted(unknown))}")
        name = options.get("name")
        if name is not None and not isinstance(name, str):
            raise TunnelRefused("name must be a string")
        access = parse_access(options, self._clock)
        record, token = await self._names.claim(app_id, device_id, name)
        hello = {
            "name": record.name,
            "token": token,
            "path": f"/go/{token}/",
            "host": f"{record.name}.{self._domain}" if self._domain else None,
        }
        return record, access, hello

    def attach(
        self, session: NativeSession, record: TunnelName, access: TunnelAccess
    ) -> NativeTunnelClient:
        """Route the tunnel's requests to ``session`` (replacing any older connection)."""
        client = NativeTunnelClient(
            session, record.name, record.token_hash, access, self._max_inflight, self._body_limit
        )
        self._registry.attach(record.token_hash, client)
        metrics.TUNNEL_CLIENTS.labels(KIND).inc()
        log.info("tunnel %r open for %s/%s", record.name, session.app_id, session.device_id)
        return client

    def detach(self, client: NativeTunnelClient) -> None:
        """The session ended."""
        self._registry.detach(client.token_hash, client)
        metrics.TUNNEL_CLIENTS.labels(KIND).dec()


_OPTIONS = frozenset({"name", "basic_auth", "bearer", "allow_ip", "deny_ip", "rate_limit"})
