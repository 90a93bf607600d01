"""Socket2me over Socket.IO on the server's one port (COMPAT.md, Socket2me).

The client is python-socketio's AsyncClient, connected with the websocket or the polling
transport to real in-process servers (and, for restarts, to ``backchannel serve``).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import socketio  # type: ignore[import-untyped]
from multidict import CIMultiDictProxy
from prometheus_client import REGISTRY

from backchannel.app import TUNNELS
from backchannel.core.tokens import token_hash
from backchannel.core.tunnels import TunnelRegistry
from tests.conftest import ADMIN_TOKEN, RunningServer, ServerFactory, wait_for

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
TRANSPORTS = ["websocket", "polling"]
# Short Engine.IO pings for tests with polling clients that leave: python-engineio's server
# does not end a long-poll when its client says goodbye (CLOSE), so that poll lingers until
# ping_interval + ping_timeout (here 1 s) and would hold up the server's shutdown.
QUICK_POLLS = {"heartbeat_interval": 0.25, "heartbeat_timeout": 1.0}


async def echo(request: dict[str, Any]) -> Any:
    """Answer with what arrived."""
    return 200, {k: v for k, v in request.items() if k != "rawBody"}


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Tunnel:
    """A Socket2me client: one AsyncClient on the namespace ``/{token}``."""

    def __init__(
        self, url: str, token: str, handler: Handler, transport: str, **client: Any
    ) -> None:
        self.url = url
        self.token = token
        self.namespace = f"/{token}"
        self.transport = transport
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.sio = socketio.AsyncClient(**{"reconnection": False, **client})
        self.sio.on("request", self._on_request, namespace=self.namespace)
        self._closing: asyncio.Task[None] | None = None

    async def _on_request(self, request: dict[str, Any]) -> Any:
        self.requests.append(request)
        return await self.handler(request)

    async def connect(self) -> Tunnel:
        await self.sio.connect(
            self.url, namespaces=[self.namespace], transports=[self.transport], wait_timeout=5
        )
        return self

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    @property
    def sid(self) -> str | None:
        sid: str | None = self.sio.get_sid(self.namespace)
        return sid

    def disconnect(self) -> None:
        """Start a clean disconnect; ``connected`` turns False at once.

        Not awaited: with the polling transport, python-engineio's client then waits for its
        pending long-poll, which the server only ends at its next ping or its shutdown.
        """
        self._closing = asyncio.ensure_future(self.sio.disconnect())

    async def close(self) -> None:
        if self._closing is not None:
            await asyncio.wait_for(self._closing, 10)
        await asyncio.wait_for(self.sio.disconnect(), 10)


class Socket2me:
    """Servers, tokens and clients for one test; cleans up after itself."""

    def __init__(self, make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
        self._make_server = make_server
        self.http = http
        self.servers: list[RunningServer] = []
        self.tunnels: list[Tunnel] = []

    async def server(self, **overrides: Any) -> RunningServer:
        srv = await self._make_server(**overrides)
        self.servers.append(srv)
        return srv

    async def get(self, url: str, **kw: Any) -> Reply:
        return await self.request("GET", url, **kw)

    async def request(self, method: str, url: str, **kw: Any) -> Reply:
        async with self.http.request(method, url, **kw) as r:
            return Reply(r.status, r.headers, await r.read())

    async def new_token(self, srv: RunningServer, **kw: Any) -> str:
        reply = await self.get(f"{srv.url}/new", **kw)
        assert reply.status == 200, reply.body
        token = reply.json()
        assert isinstance(token, str)
        return token

    async def connect(
        self,
        srv: RunningServer | str,
        token: str | None = None,
        handler: Handler = echo,
        transport: str = "websocket",
        **client: Any,
    ) -> Tunnel:
        url = srv if isinstance(srv, str) else srv.url
        if token is None:
            assert not isinstance(srv, str)
            token = await self.new_token(srv)
        tunnel = Tunnel(url, token, handler, transport, **client)
        self.tunnels.append(tunnel)
        return await tunnel.connect()

    async def go(
        self, srv: RunningServer | str, token: str, path: str = "", method: str = "GET", **kw: Any
    ) -> Reply:
        url = srv if isinstance(srv, str) else srv.url
        return await self.request(method, f"{url}/go/{token}{path}", **kw)

    async def close(self) -> None:
        # Websocket clients leave before their server stops: a server stopping with one
        # connected waits 2 x its shutdown timeout (see test_graceful_stop_with_a_client).
        # Polling clients leave after: the shutdown ends the long-polls they wait on.
        for tunnel in self.tunnels:
            if tunnel.transport == "websocket":
                await tunnel.close()
        for srv in self.servers:
            if srv.runner.server is not None:
                await srv.stop()
        for tunnel in self.tunnels:
            await tunnel.close()


@pytest.fixture
async def s2m(make_server: ServerFactory, http: aiohttp.ClientSession) -> AsyncIterator[Socket2me]:
    helper = Socket2me(make_server, http)
    yield helper
    await helper.close()


def registry(srv: RunningServer) -> TunnelRegistry:
    return srv.runner.app[TUNNELS]


def tunnel_requests(outcome: str) -> float:
    return REGISTRY.get_sample_value("backchannel_tunnel_requests_total", {"outcome": outcome}) or 0


def tunnel_clients() -> float:
    return REGISTRY.get_sample_value("backchannel_tunnel_clients", {"kind": "socket2me"}) or 0


def assert_error(reply: Reply, status: int, error: str, original: str) -> None:
    """An honest status, backchannel's error code, and Socket2me's ``Error`` string."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["error"] == error
    assert body["Error"] == original


class Gate:
    """A handler that holds requests until released, and says when one is held."""

    def __init__(self, answer: Any = (200, "released")) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.answer = answer

    async def __call__(self, request: dict[str, Any]) -> Any:
        self.held.set()
        await self.release.wait()
        return self.answer


class TestTokens:
    async def test_new_and_refresh(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        reply = await s2m.get(f"{srv.url}/new")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/json")
        assert re.fullmatch(rb'"[A-Za-z0-9_-]{48}"', reply.body)
        token = reply.json()
        assert token != await s2m.new_token(srv)
        reply = await s2m.get(f"{srv.url}/refresh/{token}")
        assert (reply.status, reply.body) == (200, b"OK")

    async def test_refresh_unknown(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        for token in ("A" * 48, "short", "A" * 47 + "%0A"):
            assert_error(
                await s2m.get(f"{srv.url}/refresh/{token}"), 404, "token_not_found", "invalid token"
            )

    async def test_new_has_its_own_rate_limit(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        statuses = [(await s2m.get(f"{srv.url}/new")).status for _ in range(20)]
        assert statuses == [200] * 20
        reply = await s2m.get(f"{srv.url}/new")
        assert_error(reply, 429, "rate_limited", "too many requests")
        assert reply.headers["Retry-After"] == "1"

    async def test_admin_mode(self, s2m: Socket2me) -> None:
        srv = await s2m.server(socket2me="admin")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
            reply = await s2m.get(f"{srv.url}/new", headers=headers)
            assert_error(reply, 401, "unauthorized", "unauthorized")
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        token = await s2m.new_token(srv, headers=admin)
        assert re.fullmatch(r"[A-Za-z0-9_-]{48}", token)
        assert (await s2m.get(f"{srv.url}/refresh/{token}", headers=admin)).status == 200
        # The public URL itself needs no credentials.
        await s2m.connect(srv, token)
        assert (await s2m.go(srv, token, "/x")).status == 200

    async def test_admin_mode_refresh_needs_only_the_token(self, s2m: Socket2me) -> None:
        srv = await s2m.server(socket2me="admin")
        token = await s2m.new_token(srv, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        reply = await s2m.get(f"{srv.url}/refresh/{token}")
        assert (reply.status, reply.body) == (200, b"OK")

    async def test_off(self, s2m: Socket2me) -> None:
        srv = await s2m.server(socket2me="off")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert (await s2m.get(f"{srv.url}/new")).status == 404
        assert (await s2m.get(f"{srv.url}/new", headers=admin)).status == 404
        assert (await s2m.get(f"{srv.url}/refresh/{'A' * 48}")).status == 404
        assert (await s2m.go(srv, "A" * 48)).status == 404
        with pytest.raises(socketio.exceptions.ConnectionError):
            await s2m.connect(srv, "A" * 48)


class TestFlow:
    @pytest.mark.parametrize("transport", TRANSPORTS)
    async def test_full_flow(self, s2m: Socket2me, transport: str) -> None:
        srv = await s2m.server(**QUICK_POLLS)
        token = await s2m.new_token(srv)

        async def handler(request: dict[str, Any]) -> Any:
            url = request.get("url")
            if url == "help/me":
                return 201, {"seen": url}, {"X-Reply": "1"}
            if url == "bin":
                return request["rawBody"][::-1]
            if request["method"] == "DELETE":
                return "gone"
            if request["method"] == "HEAD":
                return 200, "", {"X-Head": "yes"}
            return "OK"

        tunnel = await s2m.connect(srv, token, handler, transport)
        assert registry(srv).get(token_hash(token)) is not None

        reply = await s2m.go(
            srv, token, "/help/me?x=1&a[b]=2&x=3", headers={"X-Test": "yes", "Cookie": "c=1"}
        )
        assert reply.status == 201
        assert reply.json() == {"seen": "help/me"}
        assert reply.headers["X-Reply"] == "1"
        assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
        assert reply.headers["X-Provided-By"] == "Socket2Me"
        request = tunnel.requests[-1]
        assert list(request) == ["headers", "method", "url", "query", "body", "rawBody"]
        assert request["method"] == "GET"
        assert request["url"] == "help/me"
        assert request["query"] == {"x": ["1", "3"], "a": {"b": "2"}}
        assert request["body"] == {}
        assert request["rawBody"] == b""
        headers = request["headers"]
        assert all(name == name.lower() for name in headers)
        assert headers["x-test"] == "yes"
        assert headers["cookie"] == "c=1"
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-host"] == srv.url.removeprefix("http://")

        # The root, with or without its slash, has no "url" key; JSON and forms are parsed.
        reply = await s2m.go(srv, token, "", "POST", json={"a": [1, {"b": None}]})
        assert (reply.status, reply.body) == (200, b"OK")
        assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        request = tunnel.requests[-1]
        assert "url" not in request
        assert request["method"] == "POST"
        assert request["body"] == {"a": [1, {"b": None}]}
        assert json.loads(request["rawBody"]) == {"a": [1, {"b": None}]}
        await s2m.go(srv, token, "/", "PUT", data={"a": "1", "b[c]": "2"})
        request = tunnel.requests[-1]
        assert "url" not in request
        assert request["method"] == "PUT"
        assert request["body"] == {"a": "1", "b": {"c": "2"}}

        # Binary both ways, every byte value.
        data = bytes(range(256)) * 4
        reply = await s2m.go(
            srv, token, "/bin", "PATCH", data=data, headers={"Content-Type": "image/png"}
        )
        assert reply.status == 200
        assert reply.body == data[::-1]
        assert reply.headers["Content-Type"] == "application/octet-stream"
        assert tunnel.requests[-1]["body"] == {}
        assert tunnel.requests[-1]["rawBody"] == data

        reply = await s2m.go(srv, token, "/thing", "DELETE")
        assert (reply.status, reply.body) == (200, b"gone")
        reply = await s2m.go(srv, token, "", "HEAD")
        assert (reply.status, reply.body, reply.headers["X-Head"]) == (200, b"", "yes")
        assert tunnel.requests[-1]["method"] == "HEAD"
        reply = await s2m.go(srv, token, "/x", "OPTIONS")
        assert reply.status == 200
        assert [r["method"] for r in tunnel.requests] == [
            "GET",
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "HEAD",
            "OPTIONS",
        ]

        assert (await s2m.get(f"{srv.url}/refresh/{token}")).body == b"OK"

    async def test_disconnect_unregisters(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        before = tunnel_clients()
        tunnel = await s2m.connect(srv)
        assert tunnel_clients() == before + 1
        await tunnel.close()
        await wait_for(lambda: registry(srv).get(token_hash(tunnel.token)) is None)
        assert tunnel_clients() == before
        assert_error(await s2m.go(srv, tunnel.token), 502, "tunnel_offline", "client not connected")
        # The token outlives its client: the same client comes back on the same URL.
        await tunnel.connect()
        assert (await s2m.go(srv, tunnel.token, "/back")).status == 200

    async def test_concurrent_requests(self, s2m: Socket2me) -> None:
        srv = await s2m.server()

        async def slow_echo(request: dict[str, Any]) -> Any:
            await asyncio.sleep(0.05)
            return request["url"]

        tunnel = await s2m.connect(srv, handler=slow_echo)
        replies = await asyncio.gather(*(s2m.go(srv, tunnel.token, f"/{i}") for i in range(50)))
        assert [r.body for r in replies] == [str(i).encode() for i in range(50)]

    async def test_unknown_namespace_is_refused(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        for namespace in ("A" * 48, "short"):
            with pytest.raises(socketio.exceptions.ConnectionError):
                await s2m.connect(srv, namespace)
        assert len(registry(srv)) == 0


class TestErrors:
    async def test_unknown_token_404(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        for token in ("A" * 48, "short", "A" * 47 + "%0A"):
            for path in ("", "/", "/x?y=1"):
                assert_error(
                    await s2m.go(srv, token, path, "POST", data=b"x"),
                    404,
                    "tunnel_not_found",
                    "invalid token",
                )

    async def test_no_client_502(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        token = await s2m.new_token(srv)
        assert_error(await s2m.go(srv, token, "/x"), 502, "tunnel_offline", "client not connected")

    @pytest.mark.parametrize("transport", TRANSPORTS)
    async def test_client_disconnects_mid_request_502(self, s2m: Socket2me, transport: str) -> None:
        srv = await s2m.server(tunnel_timeout=20, **QUICK_POLLS)
        gate = Gate()
        tunnel = await s2m.connect(srv, handler=gate, transport=transport)
        started = time.monotonic()
        pending = asyncio.ensure_future(s2m.go(srv, tunnel.token, "/slow"))
        await asyncio.wait_for(gate.held.wait(), 5)
        tunnel.disconnect()
        reply = await asyncio.wait_for(pending, 5)
        assert_error(reply, 502, "tunnel_disconnected", "client disconnected")
        assert time.monotonic() - started < 5
        gate.release.set()

    async def test_transport_drop_mid_request_502(self, s2m: Socket2me) -> None:
        """The websocket closes without a goodbye from Socket.IO or Engine.IO."""
        srv = await s2m.server(tunnel_timeout=20)
        gate = Gate()
        tunnel = await s2m.connect(srv, handler=gate)
        pending = asyncio.ensure_future(s2m.go(srv, tunnel.token))
        await asyncio.wait_for(gate.held.wait(), 5)
        await tunnel.sio.eio.ws.close()
        reply = await asyncio.wait_for(pending, 5)
        assert_error(reply, 502, "tunnel_disconnected", "client disconnected")
        await wait_for(lambda: len(registry(srv)) == 0)
        gate.release.set()

    async def test_timeout_504(self, s2m: Socket2me) -> None:
        srv = await s2m.server(tunnel_timeout=0.3)
        gate = Gate()

        async def handler(request: dict[str, Any]) -> Any:
            if request.get("url") == "slow":
                return await gate(request)
            return "fast"

        tunnel = await s2m.connect(srv, handler=handler)
        started = time.monotonic()
        reply = await s2m.go(srv, tunnel.token, "/slow")
        elapsed = time.monotonic() - started
        assert_error(reply, 504, "tunnel_timeout", "client timeout")
        assert 0.29 <= elapsed < 3
        # The late answer is dropped; the tunnel goes on serving.
        gate.release.set()
        await asyncio.sleep(0.05)
        assert (await s2m.go(srv, tunnel.token, "/next")).body == b"fast"
        assert tunnel.connected

    async def test_busy_503(self, s2m: Socket2me) -> None:
        srv = await s2m.server(max_inflight_per_device=1)
        gate = Gate()
        tunnel = await s2m.connect(srv, handler=gate)
        pending = asyncio.ensure_future(s2m.go(srv, tunnel.token))
        await asyncio.wait_for(gate.held.wait(), 5)
        reply = await s2m.go(srv, tunnel.token)
        assert_error(reply, 503, "tunnel_busy", "client busy")
        assert reply.headers["Retry-After"] == "1"
        gate.release.set()
        assert (await pending).body == b"released"

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    async def test_request_too_large_413(self, s2m: Socket2me, chunked: bool) -> None:
        srv = await s2m.server(tunnel_max_body_size=1024)
        tunnel = await s2m.connect(srv)

        def body(size: int) -> Any:
            if not chunked:
                return b"x" * size

            async def gen() -> AsyncIterator[bytes]:
                for _ in range(size // 100):
                    yield b"x" * 100
                yield b"x" * (size % 100)

            return gen()

        reply = await s2m.go(srv, tunnel.token, "/up", "POST", data=body(1024))
        assert reply.status == 200
        assert tunnel.requests[-1]["rawBody"] == b"x" * 1024
        for size in (1025, 100_000):
            reply = await s2m.go(srv, tunnel.token, "/up", "POST", data=body(size))
            assert_error(reply, 413, "request_too_large", "request too large")
        assert len(tunnel.requests) == 1
        assert (await s2m.go(srv, tunnel.token, "/after")).status == 200

    async def test_response_too_large_413(self, s2m: Socket2me) -> None:
        srv = await s2m.server(tunnel_max_body_size=1024)
        answers = {
            "str": "x" * 1025,
            "bytes": b"x" * 1025,
            "json": ["x" * 1021],  # 1025 bytes once encoded
            "fits": "x" * 1024,
        }

        async def handler(request: dict[str, Any]) -> Any:
            return answers[request["url"]]

        tunnel = await s2m.connect(srv, handler=handler)
        for name in ("str", "bytes", "json"):
            reply = await s2m.go(srv, tunnel.token, f"/{name}")
            assert_error(reply, 413, "response_too_large", "response too large")
        reply = await s2m.go(srv, tunnel.token, "/fits")
        assert (reply.status, len(reply.body)) == (200, 1024)
        assert tunnel.connected

    async def test_response_over_the_socketio_buffer_drops_the_client(self, s2m: Socket2me) -> None:
        # Documented limit (docs/socket2me.md): Engine.IO refuses a message over its buffer
        # (2 x limit + 64 KiB) by closing the connection, so such an answer is a 502.
        srv = await s2m.server(tunnel_max_body_size=1024)

        async def handler(request: dict[str, Any]) -> Any:
            return "x" * 200_000

        tunnel = await s2m.connect(srv, handler=handler)
        reply = await s2m.go(srv, tunnel.token)
        assert_error(reply, 502, "tunnel_disconnected", "client disconnected")

    @pytest.mark.parametrize(
        "answer",
        [
            (999, "x"),
            (100, "x"),
            (200.5, "x"),
            (200, "x", {"X-Evil": "a\r\nSet-Cookie: b=c"}),
            (200, "x", {"X-Evil": "a\nb"}),
            (200, "x", {"Bad Name": "v"}),
            (200, "x", {"X-List": ["ok", "a\rb"]}),
        ],
        ids=[
            "status-999",
            "status-100",
            "status-fraction",
            "crlf-value",
            "lf-value",
            "bad-name",
            "cr-in-list",
        ],
    )
    async def test_malformed_respond_502(self, s2m: Socket2me, answer: tuple[Any, ...]) -> None:
        srv = await s2m.server()

        async def handler(request: dict[str, Any]) -> Any:
            return answer if request.get("url") == "bad" else "fine"

        tunnel = await s2m.connect(srv, handler=handler)
        reply = await s2m.go(srv, tunnel.token, "/bad")
        assert_error(reply, 502, "bad_tunnel_response", "bad client response")
        assert "Set-Cookie" not in reply.headers
        assert "X-Evil" not in reply.headers
        assert (await s2m.go(srv, tunnel.token, "/good")).body == b"fine"

    async def test_rate_limit_429(self, s2m: Socket2me) -> None:
        srv = await s2m.server(tunnel_rate_limit=0.5, tunnel_rate_burst=2)
        tunnel = await s2m.connect(srv)
        assert [(await s2m.go(srv, tunnel.token)).status for _ in range(2)] == [200, 200]
        for token in (tunnel.token, "A" * 48):
            reply = await s2m.go(srv, token)
            assert_error(reply, 429, "rate_limited", "too many requests")
            assert reply.headers["Retry-After"] == "2"
        assert len(tunnel.requests) == 2
        # Token requests have their own bucket.
        assert (await s2m.get(f"{srv.url}/new")).status == 200

    async def test_rate_limit_zero_is_off(self, s2m: Socket2me) -> None:
        srv = await s2m.server(tunnel_rate_limit=0, tunnel_rate_burst=1)
        tunnel = await s2m.connect(srv)
        replies = [await s2m.go(srv, tunnel.token) for _ in range(30)]
        assert {r.status for r in replies} == {200}


class TestTakeover:
    async def test_second_client_replaces_the_first(self, s2m: Socket2me) -> None:
        srv = await s2m.server(tunnel_timeout=20)
        before = tunnel_clients()
        gate = Gate()
        first = await s2m.connect(srv, handler=gate)
        pending = asyncio.ensure_future(s2m.go(srv, first.token, "/in-flight"))
        await asyncio.wait_for(gate.held.wait(), 5)

        async def second_handler(request: dict[str, Any]) -> Any:
            return "second"

        second = await s2m.connect(srv, first.token, second_handler, "polling")
        # The first one's request in flight fails at once, and the first one is let go.
        reply = await asyncio.wait_for(pending, 5)
        assert_error(reply, 502, "tunnel_disconnected", "client disconnected")
        await wait_for(lambda: not first.connected)
        # Its disconnect has run on the server (the gauge counts one client again)...
        await wait_for(lambda: tunnel_clients() == before + 1)
        await asyncio.sleep(0.1)
        # ...and did not unregister its successor.
        client = registry(srv).get(token_hash(first.token))
        assert client is not None
        assert getattr(client, "sid", None) == second.sid
        assert len(registry(srv)) == 1
        assert (await s2m.go(srv, first.token, "/x")).body == b"second"
        assert [r.get("url") for r in first.requests] == ["in-flight"]
        assert [r.get("url") for r in second.requests] == ["x"]
        gate.release.set()

    async def test_the_first_client_leaving_later_changes_nothing(self, s2m: Socket2me) -> None:
        srv = await s2m.server()
        first = await s2m.connect(srv)
        second = await s2m.connect(srv, first.token)
        await wait_for(lambda: not first.connected)
        first.disconnect()  # a no-op on a closed client, but not on the server's side
        await asyncio.sleep(0.1)
        assert second.connected
        assert (await s2m.go(srv, first.token, "/still")).status == 200
        assert [r.get("url") for r in second.requests] == ["still"]


class TestExpiry:
    async def test_expiry_disconnects_and_forgets(self, s2m: Socket2me) -> None:
        srv = await s2m.server(token_expire_seconds=1.5)
        started = time.monotonic()
        tunnel = await s2m.connect(srv)
        assert (await s2m.go(srv, tunnel.token)).status == 200
        await asyncio.sleep(max(0.0, started + 1.2 - time.monotonic()))
        assert tunnel.connected
        assert (await s2m.go(srv, tunnel.token)).status == 200
        await wait_for(lambda: not tunnel.connected, timeout=5)
        assert time.monotonic() - started >= 1.45
        assert len(registry(srv)) == 0
        assert_error(await s2m.go(srv, tunnel.token), 404, "tunnel_not_found", "invalid token")
        assert_error(
            await s2m.get(f"{srv.url}/refresh/{tunnel.token}"),
            404,
            "token_not_found",
            "invalid token",
        )
        with pytest.raises(socketio.exceptions.ConnectionError):
            await s2m.connect(srv, tunnel.token)

    async def test_refresh_keeps_a_token_alive(self, s2m: Socket2me) -> None:
        srv = await s2m.server(token_expire_seconds=1.0, **QUICK_POLLS)
        started = time.monotonic()
        kept = await s2m.connect(srv)
        left = await s2m.connect(srv, transport="polling")
        await asyncio.sleep(max(0.0, started + 0.5 - time.monotonic()))
        assert (await s2m.get(f"{srv.url}/refresh/{kept.token}")).body == b"OK"
        refreshed = time.monotonic()
        # The token not refreshed goes at its first expiry; the refreshed one stays.
        await wait_for(lambda: not left.connected, timeout=5)
        assert kept.connected
        assert (await s2m.go(srv, kept.token, "/alive")).status == 200
        assert (await s2m.go(srv, left.token)).status == 404
        await asyncio.sleep(max(0.0, started + 1.2 - time.monotonic()))
        assert kept.connected  # past its first expiry
        assert (await s2m.go(srv, kept.token, "/alive")).status == 200
        await wait_for(lambda: not kept.connected, timeout=5)
        assert time.monotonic() - refreshed >= 0.95
        assert (await s2m.go(srv, kept.token)).status == 404


class TestRestart:
    async def test_token_survives_a_restart(self, s2m: Socket2me, server_process: Any) -> None:
        sp = server_process()
        flags = ("--store", "sqlite", "--tunnel-timeout", "5")
        await asyncio.to_thread(sp.start, *flags)
        async with s2m.http.get(f"{sp.url}/new") as r:
            token = await r.json()

        async def handler(request: dict[str, Any]) -> Any:
            return f"hello from {request.get('url')}"

        # A client that reconnects by itself, quickly.
        tunnel = await s2m.connect(
            sp.url,
            token,
            handler,
            reconnection=True,
            reconnection_delay=0.05,
            reconnection_delay_max=0.2,
        )
        assert (await s2m.go(sp.url, token, "/a")).body == b"hello from a"

        # A crash: the client comes back to the new process, on the same URL.
        await asyncio.to_thread(sp.stop, signal.SIGKILL)
        await wait_for(lambda: not tunnel.connected)
        await asyncio.to_thread(sp.start, *flags)
        await wait_for(lambda: tunnel.connected, timeout=10)
        assert (await s2m.go(sp.url, token, "/b")).body == b"hello from b"

        # A clean stop with the client gone: after the restart the token is known (502,
        # not 404), and works again as soon as a client connects with it.
        await tunnel.close()
        # Off the event loop: the test's Socket.IO client must stay responsive while the
        # server shuts down, or the server waits for a close handshake nobody answers.
        await asyncio.to_thread(sp.stop)
        await asyncio.to_thread(sp.start, *flags)
        assert_error(await s2m.go(sp.url, token), 502, "tunnel_offline", "client not connected")
        assert (await s2m.get(f"{sp.url}/refresh/{token}")).body == b"OK"
        again = await s2m.connect(sp.url, token, handler)
        assert (await s2m.go(sp.url, token, "/c")).body == b"hello from c"
        assert again.requests[-1]["url"] == "c"
        await asyncio.to_thread(sp.stop, signal.SIGKILL)

    async def test_graceful_stop_with_a_client(self, s2m: Socket2me, server_process: Any) -> None:
        sp = server_process()
        sp.start("--store", "memory", "--shutdown-grace", "0")
        async with s2m.http.get(f"{sp.url}/new") as r:
            token = await r.json()
        tunnel = await s2m.connect(sp.url, token)
        assert sp.proc is not None
        sp.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: not tunnel.connected)
        started = time.monotonic()
        await wait_for(lambda: sp.proc.poll() is not None, timeout=2)
        assert time.monotonic() - started < 2


async def test_metrics(s2m: Socket2me) -> None:
    srv = await s2m.server()
    outcomes = ("ok", "tunnel_not_found", "tunnel_offline")
    before = {o: tunnel_requests(o) for o in outcomes}
    token = await s2m.new_token(srv)
    assert (await s2m.go(srv, token)).status == 502
    assert (await s2m.go(srv, "A" * 48)).status == 404
    await s2m.connect(srv, token)
    for _ in range(3):
        assert (await s2m.go(srv, token)).status == 200
    async with s2m.http.get(f"{srv.url}/metrics") as r:
        text = await r.text()
    for outcome, delta in zip(outcomes, (3, 1, 1), strict=True):
        match = re.search(
            rf'^backchannel_tunnel_requests_total{{outcome="{outcome}"}} (\S+)$', text, re.M
        )
        assert match is not None, outcome
        assert float(match.group(1)) == before[outcome] + delta
    assert re.search(r'^backchannel_tunnel_clients\{kind="socket2me"\} ', text, re.M)
