"""The device side: answer calls with Python functions over one native-protocol WebSocket.

:class:`Device` drives the same sans-I/O :class:`~backchannel.wire.native.NativeConnection`
as the server (``Role.CLIENT``), so there is one parser for both ends. It keeps the connection
alive: PING frames per HELLO's heartbeat, a dead-connection check, and reconnection with
exponential backoff and full jitter (``docs/protocol.md``, "Reconnecting"). One connection's
work lives in :mod:`backchannel.sdk._link`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import ssl as ssl_module
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import aiohttp
import yarl

import backchannel
from backchannel.sdk._link import Handler, Link, Route, Routes, call_hook, connect
from backchannel.sdk._topics import TopicHandler, TopicRoute
from backchannel.sdk.errors import (
    AuthenticationFailed,
    DeviceConnectionError,
    NotConnected,
    Revoked,
    SessionReplaced,
    SubscriptionRefused,
    TunnelRefused,
)
from backchannel.wire.native.topics import validate_pattern

if TYPE_CHECKING:
    from backchannel.sdk.tunnel import RequestHook, Tunnel

log = logging.getLogger(__name__)

H = TypeVar("H", bound=Handler)
TH = TypeVar("TH", bound=TopicHandler)

EVENT_ACK_TIMEOUT = 10.0

# Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes"): bad
# credentials stay bad, a revoked key stays revoked, and after a takeover another instance
# uses this device id, so reconnecting would steal the session back and forth forever.
_FATAL: dict[int, type[DeviceConnectionError]] = {
    4001: AuthenticationFailed,
    4002: SessionReplaced,
    4005: Revoked,
    4006: TunnelRefused,
}
_DETACHED = 4003
TUNNEL_HEADER = "X-Backchannel-Tunnel"


def _ws_url(server: str) -> str:
    url = yarl.URL(server)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"server must be an http(s):// or ws(s):// URL, got {server!r}")
    path = url.path.rstrip("/")
    if not path.endswith("/v1/connect"):
        path += "/v1/connect"
    return str(url.with_scheme(scheme).with_path(path).with_query(None).with_fragment(None))


class Device:
    """A device: register handlers, then :meth:`serve` (asyncio) or :meth:`run` (blocking)."""

    def __init__(
        self,
        server: str,
        app_id: str,
        device_id: str,
        key: str | None = None,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        ssl: ssl_module.SSLContext | bool | None = None,
        info: str | None = None,
        on_connect: Callable[[], Any] | None = None,
        on_disconnect: Callable[[int | None], Any] | None = None,
        on_push: Callable[[str, bytes], Any] | None = None,
    ) -> None:
        self.url = _ws_url(server)
        self.app_id = app_id
        self.device_id = device_id
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_push = on_push
        self._ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl
        agent = f"backchannel-python/{backchannel.__version__}"
        self._headers = {
            "X-Backchannel-App": app_id,
            "X-Backchannel-Device": device_id,
            "User-Agent": f"{agent} {info}" if info else agent,
        }
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._routes = Routes()
        self._link: Link | None = None
        self._serving = False
        self._stopping = False
        self._failure: Exception | None = None
        self._changed = asyncio.Event()  # replaced on every change; waiters re-check
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._tunnel: Tunnel | None = None
        # HELLO's tunnel map (name, token, path, host), kept across reconnects.
        self._tunnel_info: dict[str, Any] | None = None
        # A new connection while it re-sends the subscriptions, before it counts as up.
        self._joining: Link | None = None

    # -- handlers ------------------------------------------------------------------------

    @overload
    def handler(self, method: H) -> H: ...

    @overload
    def handler(self, method: str | None = None) -> Callable[[H], H]: ...

    def handler(self, method: str | H | None = None) -> H | Callable[[H], H]:
        """Decorator: ``@device.handler("name")`` for one method, ``@device.handler()`` for all."""
        if callable(method):  # used bare, as @device.handler
            self.add_handler(method)
            return method

        def register(fn: H) -> H:
            self.add_handler(fn, method)
            return fn

        return register

    def add_handler(self, fn: Handler, method: str | None = None) -> None:
        """Answer calls of ``method`` with ``fn`` (None: every method without its own)."""
        route = Route.of(fn)
        if method is None:
            self._routes.fallback = route
            return
        if len(method.encode()) > 255:
            raise ValueError("method names are at most 255 bytes")
        self._routes.by_method[method] = route

    # -- tunnel --------------------------------------------------------------------------

    def expose(
        self,
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
    ) -> Tunnel:
        """Give a local HTTP service a public URL through this device's connection.

        Call it before :meth:`serve`; the options are those of
        :class:`~backchannel.sdk.tunnel.Tunnel`. One tunnel per device.

        Raises:
            ValueError: the target or an option is invalid.
            RuntimeError: the device already has a tunnel, or is serving.
        """
        from backchannel.sdk.tunnel import Tunnel, tunnel_options

        options = tunnel_options(
            name=name,
            basic_auth=basic_auth,
            bearer=bearer,
            allow_ip=allow_ip,
            deny_ip=deny_ip,
            rate_limit=rate_limit,
        )
        return Tunnel._on_device(
            self,
            target,
            options,
            rewrite_host=rewrite_host,
            on_request=on_request,
            verify_local_tls=verify_local_tls,
        )

    def _attach_tunnel(self, tunnel: Tunnel, header: str) -> None:
        """Ask for ``tunnel`` on every connection from now on (the Tunnel calls this)."""
        if self._tunnel is not None:
            raise RuntimeError("this device already has a tunnel")
        if self._serving:
            raise RuntimeError("expose() must be called before serve()")
        self._tunnel = tunnel
        self._headers[TUNNEL_HEADER] = header
        self._routes.tunnel = tunnel.service

    @property
    def tunnel(self) -> Tunnel | None:
        """The device's tunnel (see :meth:`expose`), or None."""
        return self._tunnel

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a session is up (HELLO received)."""
        return self._link is not None

    @property
    def session_id(self) -> str | None:
        """The server's id of the current session, for logs and support requests."""
        return self._link.hello.session_id if self._link else None

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a session is up; raise the error that ended :meth:`serve`, if any.

        Raises:
            TimeoutError: no session within ``timeout`` seconds.
        """
        if self._link is None and not self._serving:
            # ``create_task(device.serve())`` then ``wait_connected()``: let that task start
            # (it clears the failure a previous run left) before reading the failure.
            await asyncio.sleep(0)
        async with asyncio.timeout(timeout):
            while self._link is None:
                if self._failure is not None:
                    raise self._failure
                await self._changed.wait()

    # -- running -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Stay connected and answer calls until :meth:`stop`.

        Raises:
            AuthenticationFailed: the server refused the credentials (close 4001).
            SessionReplaced: another connection took this device id over (close 4002).
            Revoked: the key was revoked or the application deleted (close 4005).
        """
        if self._serving:
            raise RuntimeError("this Device is already serving")
        self._serving, self._stopping, self._failure = True, False, None
        self._wake, self._done = asyncio.Event(), asyncio.Event()
        attempt = 0
        try:
            async with aiohttp.ClientSession() as http:
                while not self._stopping:
                    code, reason, lasted = await self._connect_once(http)
                    if self._stopping:
                        break
                    fatal = _FATAL.get(code) if code is not None else None
                    if fatal is not None:
                        raise fatal(reason or fatal.__doc__ or "", code)
                    if lasted:
                        attempt = 0
                    if code == _DETACHED:
                        # The application asked us off: wait the longest backoff (jittered
                        # so devices detached together do not return together).
                        delay = self.backoff_max * random.uniform(0.5, 1.0)
                    else:
                        cap = self.backoff_initial * 2 ** min(attempt, 60)
                        delay = random.uniform(0.0, min(self.backoff_max, cap))
                    attempt += 1
                    log.info("reconnecting in %.2f s (close code %s: %s)", delay, code, reason)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        except Exception as exc:
            self._failure = exc
            raise
        finally:
            self._serving = False
            if self._failure is None:
                self._failure = NotConnected("the device stopped serving")
            if self._routes.tunnel is not None:
                await self._routes.tunnel.close()
            self._done.set()
            self._notify()

    async def _connect_once(self, http: aiohttp.ClientSession) -> tuple[int | None, str, bool]:
        """One connection from dial to drop: (close code, reason, whether it lasted)."""
        link = await connect(http, self.url, self._headers, self._ssl, self._routes, self.on_push)
        if isinstance(link, tuple):
            return (*link, False)
        if self._stopping:  # stop() came while we were dialling
            await link.close(1000, b"device stopping")
            return link.close_code, "stopped", False
        if self._tunnel is not None:
            info = link.hello.tunnel
            if info is None or not isinstance(info.get("path"), str):
                await link.close(1000, b"no tunnel granted")
                raise TunnelRefused(
                    "the server granted no tunnel: it may not support tunnels", 4006
                )
            self._tunnel_info = info
        # The link runs before the device counts as connected: the subscriptions are re-sent
        # first, and their acks come through its receive loop.
        run = asyncio.get_running_loop().create_task(link.run())
        try:
            if self._routes.topics.routes:
                self._joining = link
                try:
                    await self._resubscribe(link)
                finally:
                    self._joining = None
            if self._stopping:  # stop() came while we were subscribing
                await link.close(1000, b"device stopping")
            elif not run.done():
                self._link = link
                log.info(
                    "connected as %s/%s (session %s)",
                    self.app_id,
                    self.device_id,
                    link.hello.session_id,
                )
                self._notify()
                await call_hook(self.on_connect)
            reason = await run
        finally:
            if not run.done():
                run.cancel()
                await asyncio.wait([run])
            self._link = None
            self._notify()
        code = link.close_code
        log.info("disconnected (close code %s: %s)", code, reason)
        await call_hook(self.on_disconnect, code)
        # docs/protocol.md: reset the backoff only after a session outlived `timeout`, so a
        # device refused right after HELLO does not reconnect in a tight loop.
        return code, reason, time.monotonic() - link.connected_at > link.conn.timeout

    # -- topics --------------------------------------------------------------------------

    async def subscribe(
        self, pattern: str, handler: TopicHandler, *, timeout: float = EVENT_ACK_TIMEOUT
    ) -> None:
        """Call ``handler(topic, data)`` for every message published on a matching topic.

        ``pattern`` is a topic with optional wildcards: ``+`` for one level, ``#`` as the
        last level for any number (docs/protocol.md, "Topics"). The handler may be sync (run
        in a thread) or async; messages reach it one at a time, in order. Subscribing to a
        pattern again replaces its handler. The device keeps its subscriptions and sends
        them again on every connection; while disconnected this only records.

        Raises:
            ValueError: the pattern is invalid.
            SubscriptionRefused: the server refused it (e.g. too many subscriptions).
            TimeoutError: the server did not answer within ``timeout`` seconds.
        """
        validate_pattern(pattern)
        routes = self._routes.topics.routes
        previous = routes.get(pattern)
        route = routes[pattern] = TopicRoute.of(pattern, handler)
        link = self._link
        if link is None:
            return  # the next connection sends it
        try:
            await link.subscription(pattern, True, timeout)
        except SubscriptionRefused:
            if routes.get(pattern) is route:
                if previous is None:
                    del routes[pattern]
                else:
                    routes[pattern] = previous
            raise
        except NotConnected:
            pass  # recorded: the next connection sends it

    def topic(self, pattern: str) -> Callable[[TH], TH]:
        """Decorator: ``@device.topic("cmd/+/set")`` subscribes the function before serving.

        For setting up before :meth:`serve` or :meth:`run` (plain synchronous code included);
        the subscription goes out with every connection. Once connected, use
        ``await device.subscribe(...)``, which waits for the server's answer.

        Raises:
            ValueError: the pattern is invalid.
            RuntimeError: the device is already connected.
        """
        validate_pattern(pattern)
        if self._link is not None:
            raise RuntimeError("the device is connected: use `await device.subscribe(...)`")

        def register(fn: TH) -> TH:
            self._routes.topics.routes[pattern] = TopicRoute.of(pattern, fn)
            return fn

        return register

    async def unsubscribe(self, pattern: str, *, timeout: float = EVENT_ACK_TIMEOUT) -> None:
        """Stop receiving ``pattern``'s messages; its handler is not called again.

        Raises:
            TimeoutError: the server did not confirm within ``timeout`` seconds (the
                handler is removed anyway).
        """
        if self._routes.topics.routes.pop(pattern, None) is None:
            return
        link = self._link
        if link is None:
            return
        with contextlib.suppress(NotConnected):  # the next connection will not send it
            await link.subscription(pattern, False, timeout)

    @property
    def subscriptions(self) -> list[str]:
        """The patterns the device subscribes to, in subscription order."""
        return list(self._routes.topics.routes)

    async def _resubscribe(self, link: Link) -> None:
        """Send every subscription on a new connection and wait for the server's answers."""
        routes = self._routes.topics.routes
        sent: set[str] = set()
        while True:
            # Again until nothing is new: subscribe() only records while we are joining.
            todo = [p for p in routes if p not in sent]
            if not todo:
                break
            sent.update(todo)
            results = await asyncio.gather(
                *(link.subscription(p, True, EVENT_ACK_TIMEOUT) for p in todo),
                return_exceptions=True,
            )
            for pattern, result in zip(todo, results, strict=True):
                if isinstance(result, NotConnected):
                    return
                if isinstance(result, SubscriptionRefused):
                    log.error("the server refused the subscription to %r: %s", pattern, result)
                elif isinstance(result, Exception):
                    log.warning("subscribing to %r failed: %r", pattern, result)
        for pattern in sent.difference(routes):  # unsubscribed meanwhile
            with contextlib.suppress(NotConnected, SubscriptionRefused, TimeoutError):
                await link.subscription(pattern, False, EVENT_ACK_TIMEOUT)

    # -- events --------------------------------------------------------------------------

    async def emit(
        self,
        name: str,
        data: bytes | str = b"",
        *,
        ack: bool = False,
        timeout: float = EVENT_ACK_TIMEOUT,
    ) -> None:
        """Send an event upstream; with ``ack``, wait until the server has stored it.

        Raises:
            NotConnected: there is no session, or it ended before the ack.
            TimeoutError: no ack within ``timeout`` seconds.
        """
        link = self._link
        if link is None:
            raise NotConnected("the device is not connected")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        await link.emit(name, payload, ack, timeout)

    # -- stopping ------------------------------------------------------------------------

    async def stop(self) -> None:
        """Close the connection (code 1000), cancel handlers, and wait for :meth:`serve` to end."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        link = self._link or self._joining
        if link is not None:
            await link.close(1000, b"device stopping")
        if self._serving and self._done is not None:
            await self._done.wait()

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (KeyboardInterrupt propagates), blocking; uses uvloop."""
        try:
            import uvloop
        except ImportError:
            asyncio.run(self._main())
        else:
            uvloop.run(self._main())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            self._stop_task = loop.create_task(self.stop())

        # Only possible in the main thread on Unix; elsewhere SIGTERM keeps its default.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        await self.serve()
