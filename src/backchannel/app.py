"""The composition root: store + broker + relay + transports + front doors on one aiohttp app.

This is the only module that imports every layer; everything else sees only the layers
below it (DESIGN.md, "Imports").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from backchannel import __version__
from backchannel.config import Config
from backchannel.core.apps import AppService
from backchannel.core.clock import Clock, SystemClock
from backchannel.core.events import EventLog, EventSettings
from backchannel.core.fanout import Fanout
from backchannel.core.messages import Messages, MessageSettings
from backchannel.core.networks import parse_networks
from backchannel.core.ratelimit import RateLimiter
from backchannel.core.relay import Relay, RelayLimits
from backchannel.core.tokens import TunnelTokens
from backchannel.core.tunnel_names import TunnelNames
from backchannel.core.tunnels import TunnelRegistry
from backchannel.core.webhooks import WebhookPlanner
from backchannel.frontdoors.admin import AdminApi
from backchannel.frontdoors.app_api import AppApi
from backchannel.frontdoors.app_websockets import AppWebSockets
from backchannel.frontdoors.errors import MAX_BODY, json_errors
from backchannel.frontdoors.event_stream import EventStream
from backchannel.frontdoors.fanout import FanoutApi
from backchannel.frontdoors.health import Health
from backchannel.frontdoors.messages import MessageApi
from backchannel.frontdoors.proxies import proxy_middleware
from backchannel.frontdoors.socket2me_tokens import Socket2meTokens
from backchannel.frontdoors.topics import TopicsApi
from backchannel.frontdoors.tunnel_ingress import TunnelIngress
from backchannel.frontdoors.webhooks import WebhookApi, Webhooks
from backchannel.routing.broker import Broker
from backchannel.routing.memory import MemoryBroker
from backchannel.state.memory import MemoryStore
from backchannel.state.sqlite import SqliteStore
from backchannel.state.store import Store
from backchannel.transports.cometa_raw import CometaSettings, CometaTransport
from backchannel.transports.native_tunnel import NativeTunnels
from backchannel.transports.native_ws import NativeSettings, NativeTransport
from backchannel.transports.sniff import SniffingSite
from backchannel.transports.socket2me import Socket2meSettings, Socket2meTransport

log = logging.getLogger("backchannel")

RELAY = web.AppKey("backchannel.relay", Relay)
APPS = web.AppKey("backchannel.apps", AppService)
WEBHOOKS = web.AppKey("backchannel.webhooks", Webhooks)
EVENTS = web.AppKey("backchannel.events", EventLog)
MESSAGES = web.AppKey("backchannel.messages", Messages)
EVENT_STREAM = web.AppKey("backchannel.event_stream", EventStream)
#: The protocol factory for Cometa device connections, which the sniffing site needs.
COMETA = web.AppKey("backchannel.cometa", CometaTransport)
#: Set at startup when the server generated the admin token (tests read it from here).
TUNNELS = web.AppKey("backchannel.tunnels", TunnelRegistry)
SOCKET2ME = web.AppKey("backchannel.socket2me", Socket2meTransport)
TOKENS = web.AppKey("backchannel.tokens", TunnelTokens)
GENERATED_ADMIN_TOKEN = web.AppKey("backchannel.generated_admin_token", str)
NEW_TOKEN_RATE = 1.0  # GET /new per second per client IP
NEW_TOKEN_BURST = 20
FRAME_OVERHEAD = 512  # room for the frame header and method name around a max-size body


def make_store(config: Config) -> Store:
    """The store the configuration names."""
    if config.store == "memory":
        return MemoryStore()
    return SqliteStore(config.data_dir / "backchannel.db")


def build_app(
    config: Config,
    *,
    store: Store | None = None,
    broker: Broker | None = None,
    clock: Clock | None = None,
) -> web.Application:
    """Wire every part onto one aiohttp application; state opens at startup."""
    clock = clock or SystemClock()
    store = store or make_store(config)
    broker = broker or MemoryBroker(config.node_id)
    apps = AppService(store, clock)
    relay = Relay(
        broker,
        clock,
        RelayLimits(
            default_timeout=config.default_timeout,
            max_timeout=config.max_timeout,
            heartbeat=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            max_inflight_per_device=config.max_inflight_per_device,
            shutdown_grace=config.shutdown_grace,
        ),
    )
    app = web.Application(client_max_size=config.max_body_size, middlewares=[json_errors])
    app[MAX_BODY] = config.max_body_size
    app[RELAY] = relay
    app[APPS] = apps

    tunnels = app[TUNNELS] = TunnelRegistry()
    names = TunnelNames(store, clock)
    NativeTransport(
        relay,
        apps,
        NativeSettings(
            max_frame=config.max_body_size + FRAME_OVERHEAD,
            heartbeat=config.heartbeat_interval,
            timeout=config.heartbeat_timeout,
            max_inflight=config.max_inflight_per_device,
            server_name=f"backchannel/{__version__}",
        ),
        NativeTunnels(
            names,
            tunnels,
            clock,
            domain=config.domain,
            max_inflight=config.max_inflight_per_device,
            body_limit=config.expose_max_body_size,
        ),
    ).add_routes(app)
    app[COMETA] = CometaTransport(
        relay,
        apps,
        CometaSettings(
            max_message=config.max_body_size,
            liveness=config.cometa_liveness,
            stale_grace=config.cometa_stale_grace,
            max_queue=config.max_inflight_per_device,
        ),
    )
    messages = app[MESSAGES] = Messages(
        store,
        relay,
        clock,
        MessageSettings(
            default_ttl=config.message_ttl,
            max_ttl=config.message_max_ttl,
            retention=config.message_retention_seconds,
            max_queued_per_device=config.max_queued_per_device,
            max_body=config.message_max_body_size,
        ),
    )
    api = AppApi(relay, apps, config.default_timeout, config.max_timeout, messages)
    api.add_routes(app)
    MessageApi(messages, api).add_routes(app)
    TopicsApi(relay, api, config.broadcast_max_bytes).add_routes(app)
    fanout = Fanout(relay, apps, config.fanout_max_devices)
    FanoutApi(fanout, api, messages, config.broadcast_max_bytes).add_routes(app)
    sockets = AppWebSockets(relay, apps, api, max_message=config.max_body_size)
    sockets.add_routes(app)
    sockets.attach()
    webhooks = app[WEBHOOKS] = Webhooks(
        store,
        apps,
        clock,
        timeout=config.webhook_timeout,
        backoff=config.webhook_backoff,
        max_backoff=config.webhook_max_backoff,
        max_attempts=config.webhook_max_attempts,
        concurrency=config.webhook_concurrency,
        poll_interval=config.webhook_poll_interval,
        retention=config.webhook_retention_seconds,
        denied=parse_networks(config.webhook_deny_networks),
    )
    planner = WebhookPlanner(store, apps, clock)
    planner.on_enqueued = webhooks.wake
    relay.on_call(planner.on_call)
    WebhookApi(store, api, webhooks, clock).add_routes(app)
    events = app[EVENTS] = EventLog(
        store,
        clock,
        EventSettings(
            retention_count=config.event_retention_count,
            retention_seconds=config.event_retention_seconds,
        ),
        outbox=planner,
    )
    events.attach(relay)
    messages.notify = events.record_message_status
    app[EVENT_STREAM] = EventStream(events, api)
    app[EVENT_STREAM].add_routes(app)
    AdminApi(relay, apps, tunnels, names).add_routes(app)
    tokens = app[TOKENS] = TunnelTokens(store, clock, config.token_expire_seconds, tunnels)
    socket2me = app[SOCKET2ME] = Socket2meTransport(
        tokens,
        tunnels,
        Socket2meSettings(
            max_body=config.tunnel_max_body_size,
            max_inflight=config.max_inflight_per_device,
            ping_interval=config.heartbeat_interval,
            ping_timeout=config.heartbeat_timeout - config.heartbeat_interval,
        ),
        clock,
    )
    socket2me.add_routes(app)
    # Creating a token writes the store, hence a stricter bucket of its own.
    token_limiter = RateLimiter(NEW_TOKEN_RATE, NEW_TOKEN_BURST, clock)
    Socket2meTokens(tokens, apps, token_limiter, config.socket2me).add_routes(app)
    TunnelIngress(
        tokens,
        names,
        tunnels,
        RateLimiter(config.tunnel_rate_limit, config.tunnel_rate_burst, clock),
        timeout=config.tunnel_timeout,
        domain=config.domain,
    ).add_routes(app)
    Health(relay).add_routes(app)
    if config.trusted_proxies:
        # First of all middlewares: everything after it sees the client, not the proxy.
        app.middlewares.insert(0, proxy_middleware(parse_networks(config.trusted_proxies)))

    admin_token = config.admin_token.get_secret_value() if config.admin_token else None

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await broker.start()
        generated = await apps.init_admin_token(admin_token)
        if generated is not None:
            app[GENERATED_ADMIN_TOKEN] = generated
        await names.init_secret()
        await planner.start()
        await events.start()
        await messages.start()
        relay.start()
        tokens.start()
        yield
        await tokens.stop()
        await messages.stop()
        # After the relay closed the sessions: their "offline" records are written too.
        await events.stop()
        await planner.stop()
        await broker.stop()
        await store.close()

    async def on_shutdown(app: web.Application) -> None:
        await relay.shutdown()
        # Streams get the shutdown's presence records, then end (aiohttp waits for them).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await events.drain()
        events.close_subscribers()
        await sockets.close_all()
        await socket2me.close_all("the server is shutting down")

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(webhooks.lifecycle)
    app.on_shutdown.append(on_shutdown)
    return app


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    app = build_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger("backchannel.access") if config.access_log else None,
        access_log_class=PathAccessLogger,
        shutdown_timeout=config.shutdown_grace + 5,
    )
    await runner.setup()
    site = SniffingSite(
        runner, config.host, config.port, app[COMETA], ssl_context=_ssl_context(config)
    )
    await site.start()
    token = app.get(GENERATED_ADMIN_TOKEN)
    if token:
        # Printed once, never logged: it is stored only as a hash.
        print(
            "\n  Admin token (shown once; store it safely):\n\n"
            f"    {token}\n\n  Use it as BACKCHANNEL_ADMIN_TOKEN or --admin-token.\n",
            file=sys.stdout,
            flush=True,
        )
    scheme = "https" if config.tls_cert else "http"
    for addr in runner.addresses:
        log.info("backchannel %s listening on %s://%s:%s", __version__, scheme, addr[0], addr[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down: finishing calls in flight (up to %gs)", config.shutdown_grace)
    finally:
        await graceful_stop(runner)
        log.info("stopped")


async def graceful_stop(runner: web.AppRunner) -> None:
    """Drain device calls and close sessions, then stop aiohttp.

    While the relay drains, the port stays open so load balancers can see ``/healthz``
    answer 503, and new calls and devices get a clear 503 instead of a refused connection.
    The drain must come before ``runner.cleanup()``: from its first step on, aiohttp drops
    every byte arriving on open connections, so replies to calls in flight would be lost.
    """
    await runner.app[RELAY].shutdown()
    # Tunnel clients too: after this point aiohttp would never read their goodbye, and
    # would wait out its shutdown timeout (twice) for each open Socket.IO connection.
    await runner.app[SOCKET2ME].close_all("the server is shutting down")
    await runner.cleanup()


class PathAccessLogger(AbstractAccessLogger):
    """One line per request with the path but never the query string (it may hold keys)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Log the request."""
        self.logger.info(
            '%s "%s %s" %s %s %.4f',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: every device holds a socket."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def run(config: Config) -> None:
    """Blocking entry point: uvloop when available, logging set up from the config."""
    raise_fd_limit()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX system
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
