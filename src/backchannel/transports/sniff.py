"""One port for everything: route each new connection by its first bytes.

A Cometa device opens with ``POST /v1/applications/{app}/devices/{device}`` and then stops
speaking HTTP (COMPAT.md, "Device side"), so no HTTP parser may see its stream. The sniffer
holds the first bytes until the request line decides: a Cometa attach goes to the Cometa
transport, anything else to aiohttp with the bytes already read. After the decision the
transport's protocol is swapped, so the sniffer costs nothing on later reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from backchannel.wire.cometa import Sniff, sniff

log = logging.getLogger(__name__)

SNIFF_TIMEOUT = 30.0  # a connection that never completes its request line is dropped


class SniffingProtocol(asyncio.Protocol):
    """The first protocol of every connection; hands the connection on once it knows."""

    __slots__ = ("_buffer", "_cometa", "_http", "_timer", "_transport")

    def __init__(
        self,
        http: Callable[[], asyncio.Protocol],
        cometa: Callable[[], asyncio.Protocol],
    ) -> None:
        self._http = http
        self._cometa = cometa
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wait for the first bytes."""
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._timer = asyncio.get_running_loop().call_later(SNIFF_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        """Decide as soon as the request line allows, then hand over."""
        self._buffer += data
        verdict = sniff(bytes(self._buffer))
        if verdict is Sniff.NEED_MORE:
            return
        self._hand_over(self._cometa() if verdict is Sniff.ATTACH else self._http())

    def _hand_over(self, protocol: asyncio.Protocol) -> None:
        transport = self._transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        data, self._buffer = bytes(self._buffer), bytearray()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_closing():
            protocol.data_received(data)

    def eof_received(self) -> bool | None:
        """The peer sent nothing decisive before closing its side."""
        if self._buffer:
            self._hand_over(self._http())
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed while still sniffing."""
        if self._timer is not None:
            self._timer.cancel()


class SniffingSite(web.BaseSite):
    """A TCP site like aiohttp's ``TCPSite`` whose connections go through the sniffer."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        cometa: Callable[[], asyncio.Protocol],
        *,
        ssl_context: object = None,
        backlog: int = 4096,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)  # type: ignore[arg-type]
        self._host = host
        self._port = port
        self._cometa = cometa

    @property
    def name(self) -> str:
        """The URL the site serves."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen; every accepted connection starts with a :class:`SniffingProtocol`."""
        await super().start()
        http = self._runner.server
        assert http is not None
        cometa = self._cometa
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SniffingProtocol(http, cometa),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
        )
