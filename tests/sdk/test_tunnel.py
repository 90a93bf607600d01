"""The tunnel agent (``backchannel.Tunnel``) against a real in-process server.

Every request is a real public HTTP request to the server's ``/go/{token}/...`` URL; the
server opens a stream to the agent, which forwards it to the real local service
(tests/tunnel_service.py). What is under test is the agent: how it parses targets and
options, forwards requests and answers (byte for byte, nothing added or decoded), reports
failures, follows the caller going away, carries WebSockets, and stays up.

The server's own side (access rules, limits, host routing, big transfers and memory) is
tested in tests/e2e/test_tunnels*.py; flow control itself, with tiny windows, in
tests/sdk/test_streams.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yarl

from backchannel import AsyncClient, Device, Tunnel
from backchannel.sdk import AuthenticationFailed, TunnelRefused
from backchannel.sdk.tunnel import LocalTarget, _http_base, tunnel_options
from backchannel.transports.native_streams import StreamReset
from backchannel.wire.native.tunnel import RequestHead, request_meta
from tests.conftest import ADMIN_TOKEN, RunningServer, ServerFactory, free_port, wait_for
from tests.tunnel_service import (
    GZIP_TEXT,
    LocalService,
    bytes_sha256,
    expected_bytes,
    tunnel_service,
)

Requests = list[tuple[str, str, int, float, int]]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# What a bare public request carries: no client defaults the test did not ask for.
BARE = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Setup:
    """A real server with one application; device keys issued on first use."""

    def __init__(self, server: RunningServer, app_id: str, secret: str) -> None:
        self.server = server
        self.url = server.url
        self.app_id = app_id
        self.secret = secret
        self._keys: dict[str, str] = {}

    @classmethod
    async def on(cls, server: RunningServer) -> Setup:
        app_id, secret = await server.create_app()
        return cls(server, app_id, secret)

    async def key(self, device_id: str) -> str:
        if device_id not in self._keys:
            self._keys[device_id] = await self.server.provision(self.app_id, device_id)
        return self._keys[device_id]

    async def tunnel(self, target: int | str, device_id: str = "dev1", **kwargs: Any) -> Tunnel:
        key = kwargs.pop("key", None) or await self.key(device_id)
        return Tunnel(
            self.url,
            self.app_id,
            device_id,
            key,
            target,
            backoff_initial=0.01,
            backoff_max=0.1,
            **kwargs,
        )

    async def tunnels(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """The live tunnels, from the admin API."""
        async with http.get(f"{self.url}/admin/v1/tunnels", headers=ADMIN) as resp:
            assert resp.status == 200
            tunnels: list[dict[str, Any]] = (await resp.json())["tunnels"]
            return tunnels


@pytest.fixture
async def local() -> AsyncIterator[LocalService]:
    async with tunnel_service() as svc:
        yield svc


@pytest.fixture
async def relay(server: RunningServer) -> Setup:
    return await Setup.on(server)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The public caller: answers kept as sent (no decompression, no cookies)."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@contextlib.asynccontextmanager
async def serving(tunnel: Tunnel, timeout: float = 5.0) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(tunnel.serve())
    try:
        await tunnel.wait_ready(timeout)
        yield task
    finally:
        await tunnel.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def up(relay: Setup, target: int | str, **kwargs: Any) -> AsyncIterator[Tunnel]:
    tunnel = await relay.tunnel(target, **kwargs)
    async with serving(tunnel):
        yield tunnel


def public(tunnel: Tunnel, target: str) -> yarl.URL:
    """The public URL of a request target, byte for byte (nothing re-encoded)."""
    assert tunnel.public_url is not None and target.startswith("/")
    return yarl.URL(tunnel.public_url.rstrip("/") + target, encoded=True)


async def fetch(
    http: aiohttp.ClientSession, url: yarl.URL | str, method: str = "GET", **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    kwargs.setdefault("skip_auto_headers", BARE)
    kwargs.setdefault("allow_redirects", False)
    async with http.request(method, url, **kwargs) as resp:
        return resp, await resp.read()


# -- options and URLs (no relay needed) ------------------------------------------------------


def test_targets() -> None:
    assert LocalTarget.parse(3000).base == "http://localhost:3000"
    assert LocalTarget.parse("8080").base == "http://localhost:8080"
    assert LocalTarget.parse("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    t = LocalTarget.parse("https://example.test:8443/api/")
    assert t.base == "https://example.test:8443/api"
    assert str(t.http_url("/a%2Fb?x=%20y+z")) == "https://example.test:8443/api/a%2Fb?x=%20y+z"
    assert str(t.ws_url("/ws?x=1")) == "wss://example.test:8443/api/ws?x=1"
    assert LocalTarget.parse("http://[::1]:3000").host_header == "[::1]:3000"
    assert LocalTarget.parse("http://localhost").host_header == "localhost"
    for bad in (0, 70000, "ftp://x", "http://", "http://h/?q=1", "http://h/#f", "http://h:99999"):
        with pytest.raises(ValueError):
            LocalTarget.parse(bad)


def test_public_base_url() -> None:
    assert _http_base("ws://127.0.0.1:8080/v1/connect") == "http://127.0.0.1:8080"
    assert _http_base("wss://relay.example/base/v1/connect") == "https://relay.example/base"


def test_options() -> None:
    assert tunnel_options() == {}
    assert tunnel_options(
        name="my-app",
        basic_auth="u:p",
        bearer="t",
        allow_ip=["10.0.0.0/8", "::1"],
        deny_ip=["10.1.2.3"],
        rate_limit=5.0,
    ) == {
        "name": "my-app",
        "basic_auth": "u:p",
        "bearer": "t",
        "allow_ip": ["10.0.0.0/8", "::1"],
        "deny_ip": ["10.1.2.3"],
        "rate_limit": 5,
    }
    assert tunnel_options(rate_limit=0.5) == {"rate_limit": 0.5}
    for bad in (
        {"name": "Bad_Name"},
        {"name": "-x"},
        {"name": "a" * 64},
        {"basic_auth": "nocolon"},
        {"basic_auth": ":p"},
        {"bearer": ""},
        {"allow_ip": ["nope"]},
        {"deny_ip": ["10.0.0.0/33"]},
        {"rate_limit": 0},
        {"rate_limit": -1},
    ):
        with pytest.raises(ValueError):
            tunnel_options(**bad)


# -- asking for the tunnel -------------------------------------------------------------------


async def test_options_reach_the_server(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    options = {"bearer": "s3cret", "allow_ip": ["127.0.0.0/8"], "deny_ip": ["10.1.2.3"]}
    async with up(relay, local.port, name="demo", rate_limit=50, **options):
        # What the agent sent in X-Backchannel-Tunnel, as the server understood it (read
        # before any public request: the rules are the tunnel's from the start).
        (listed,) = await relay.tunnels(http)
        assert listed["name"] == "demo" and listed["device_id"] == "dev1"
        assert listed["access"] == {
            "credentials": True,
            "allow_ip": ["127.0.0.0/8"],
            "deny_ip": ["10.1.2.3/32"],
            "rate_limit": 50,
        }


async def test_urls_and_access_options_work(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    relay = await Setup.on(await make_server(domain="tunnels.test"))
    tunnel = await relay.tunnel(
        local.port, name="demo", bearer="s3cret", allow_ip=["127.0.0.0/8"], rate_limit=50
    )
    assert tunnel.public_url is None and tunnel.host_url is None and not tunnel.ready
    assert tunnel.name == "demo"
    assert tunnel.target == f"http://localhost:{local.port}"
    async with serving(tunnel):
        assert tunnel.ready and tunnel.name == "demo"
        url = tunnel.public_url
        assert url is not None and url.startswith(f"{relay.url}/go/") and url.endswith("/")
        port = yarl.URL(relay.url).port
        assert tunnel.host_url == f"http://demo.tunnels.test:{port}/"
        bearer = {"Authorization": "Bearer s3cret"}
        resp, _ = await fetch(http, url + "status/200")
        assert resp.status == 401
        resp, body = await fetch(http, url + "status/200", headers=bearer)
        assert resp.status == 200 and json.loads(body) == {"status": 200}
        # The host URL reaches the same tunnel (no DNS here: the Host header says it).
        resp, body = await fetch(
            http, relay.url + "/echo", headers={**bearer, "Host": "demo.tunnels.test"}
        )
        assert resp.status == 200 and json.loads(body)["path"] == "/echo"
        assert local.requests == 2


async def test_default_name_and_no_host_url_without_a_domain(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        assert tunnel.host_url is None
        assert tunnel.name  # the server's default name, derived from the app and device
        (listed,) = await relay.tunnels(http)
        assert listed["name"] == tunnel.name
        resp, _ = await fetch(http, public(tunnel, "/status/200"))
        assert resp.status == 200


async def test_refused_tunnel_stops_with_an_error(relay: Setup, local: LocalService) -> None:
    async with up(relay, local.port, name="demo"):
        pass  # dev1 now holds the name, connected or not
    tunnel = await relay.tunnel(local.port, "dev2", name="demo")
    with pytest.raises(TunnelRefused) as info:
        await asyncio.wait_for(tunnel.serve(), 5)  # returns: no retry
    assert info.value.close_code == 4006 and "reserved" in str(info.value)
    with pytest.raises(TunnelRefused):
        await tunnel.wait_ready(1)
    assert not tunnel.ready and tunnel.public_url is None


async def test_auth_failure_stops(relay: Setup, local: LocalService) -> None:
    await relay.key("dev1")
    tunnel = await relay.tunnel(local.port, key="not-the-key")
    with pytest.raises(AuthenticationFailed):
        await asyncio.wait_for(tunnel.serve(), 5)


# -- plain HTTP ------------------------------------------------------------------------------


async def test_request_target_and_headers_pass_byte_for_byte(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    headers = [
        ("Host", "demo.tunnels.test"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("Cookie", "a=1; b=2"),
        ("X-Forwarded-For", "203.0.113.9"),
    ]
    target = "/echo/a%2Fb/%C3%A9?x=%20y+z&x=2&empty=&q=%zz"
    async with up(relay, local.port) as tunnel:
        resp, body = await fetch(http, public(tunnel, target), headers=headers)
    assert resp.status == 200
    seen = json.loads(body)
    assert seen["method"] == "GET"
    assert seen["path"] == "/echo/a%2Fb/%C3%A9"
    assert seen["query"] == "x=%20y+z&x=2&empty=&q=%zz"
    # Exactly what the caller sent and the server's X-Forwarded-* (appended to the chain
    # the caller brought), in order: the agent adds nothing (no client defaults).
    assert seen["headers"] == [
        ["Host", "demo.tunnels.test"],
        ["X-Multi", "1"],
        ["X-Multi", "2"],
        ["Cookie", "a=1; b=2"],
        ["X-Forwarded-For", "203.0.113.9, 127.0.0.1"],
        ["X-Forwarded-Proto", "http"],
        ["X-Forwarded-Host", "demo.tunnels.test"],
    ]
    assert seen["length"] == 0


async def test_rewrite_host(relay: Setup, local: LocalService, http: aiohttp.ClientSession) -> None:
    target = f"http://127.0.0.1:{local.port}"
    async with up(relay, target, rewrite_host=True) as tunnel:
        _, body = await fetch(http, public(tunnel, "/echo"), headers={"Host": "demo.tunnels.test"})
    headers = json.loads(body)["headers"]
    assert [v for k, v in headers if k.lower() == "host"] == [f"127.0.0.1:{local.port}"]
    assert ["X-Forwarded-Host", "demo.tunnels.test"] in headers  # the public host stays known


async def test_path_prefix(relay: Setup, local: LocalService, http: aiohttp.ClientSession) -> None:
    async with up(relay, f"http://127.0.0.1:{local.port}/echo/") as tunnel:
        resp, body = await fetch(http, public(tunnel, "/x/y?z=1"), "POST", data=b"abc")
        assert resp.status == 200
        seen = json.loads(body)
        assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/echo/x/y", "z=1")
        assert seen["length"] == 3 and seen["sha256"] == hashlib.sha256(b"abc").hexdigest()
        # The tunnel's root is the prefix itself.
        _, body = await fetch(http, tunnel.public_url or "")
        assert json.loads(body)["path"] == "/echo/"


async def test_answers_pass_as_sent(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        resp, body = await fetch(http, public(tunnel, "/headers"))
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
        assert resp.headers.getall("X-Multi") == ["one", "two"]
        assert resp.headers["Content-Length"] == "2" and body == b"ok"

        resp, _ = await fetch(http, public(tunnel, "/redirect"))  # not followed by the agent
        assert resp.status == 302 and resp.headers["Location"] == "/echo"
        assert local.requests == 2  # the agent did not fetch /echo

        resp, body = await fetch(http, public(tunnel, "/gzip"), headers={"Accept-Encoding": "gzip"})
        assert resp.headers["Content-Encoding"] == "gzip"  # not decompressed on the way
        assert resp.headers["Content-Length"] == str(len(body))
        assert gzip.decompress(body) == GZIP_TEXT

        for code in (404, 500, 503):
            resp, body = await fetch(http, public(tunnel, f"/status/{code}"))
            assert resp.status == code and json.loads(body) == {"status": code}
        resp, body = await fetch(http, public(tunnel, "/status/204"), "DELETE")
        assert resp.status == 204 and body == b""

        resp, body = await fetch(http, public(tunnel, "/bytes/1000"), "HEAD")
        assert resp.status == 200 and body == b""
        assert resp.headers["Content-Length"] == "1000"

        # A chunked local answer: its framing is the agent's business, not the caller's;
        # the caller gets the server's own framing once, and the exact bytes.
        # (A small answer that is complete when its head arrives leaves with a
        # Content-Length in one write; a longer one is streamed chunked.)
        resp, body = await fetch(http, public(tunnel, "/bytes/100000?chunked=1"))
        framing = (resp.headers.getall("Transfer-Encoding", []), resp.headers.get("Content-Length"))
        assert framing in ((["chunked"], None), ([], "100000"))
        assert body == expected_bytes(100000)


async def test_on_request_reports_each_request(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    seen: Requests = []
    async with up(relay, local.port, on_request=lambda *a: seen.append(a)) as tunnel:
        await fetch(http, public(tunnel, "/bytes/5000?x=1"))
        await fetch(http, public(tunnel, "/status/404"), "POST", data=b"x")
        await wait_for(lambda: len(seen) == 2)
    (m1, p1, s1, d1, n1), (m2, p2, s2, _, n2) = seen
    assert (m1, p1, s1, n1) == ("GET", "/bytes/5000?x=1", 200, 5000)
    assert (m2, p2, s2) == ("POST", "/status/404", 404) and n2 == len(b'{"status": 404}')
    assert 0 <= d1 < 5


async def test_async_on_request(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    seen: Requests = []

    async def hook(*args: Any) -> None:
        await asyncio.sleep(0)
        seen.append(args)

    async with up(relay, local.port, on_request=hook) as tunnel:
        await fetch(http, public(tunnel, "/status/201"))
        await wait_for(lambda: len(seen) == 1)
    assert seen[0][2] == 201


async def test_uploads_stream_with_and_without_a_length(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    body = expected_bytes(4 << 20)
    digest = hashlib.sha256(body).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    async with up(relay, local.port) as tunnel:
        resp, answer = await fetch(http, public(tunnel, "/upload"), "PUT", data=body)
        assert resp.status == 200
        assert json.loads(answer) == {"length": len(body), "sha256": digest}
        # Without Content-Length the caller sends chunked; the agent streams it on.
        resp, answer = await fetch(
            http, public(tunnel, "/upload?delay=0.001"), "POST", data=chunks()
        )
        assert resp.status == 200
        assert json.loads(answer) == {"length": len(body), "sha256": digest}
        await wait_for(lambda: tunnel.in_flight == 0)


async def test_download_is_exact(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    n = 6 << 20
    async with up(relay, local.port) as tunnel:
        async with http.get(public(tunnel, f"/bytes/{n}")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(n)
            assert resp.headers["X-SHA256"] == bytes_sha256(n)
            h, got = hashlib.sha256(), 0
            async for chunk in resp.content.iter_any():
                h.update(chunk)
                got += len(chunk)
        assert got == n and h.hexdigest() == bytes_sha256(n)
        await wait_for(lambda: tunnel.in_flight == 0)


async def test_slow_reader_slows_the_local_read(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    """A caller that stops reading stops the agent reading the local service."""
    n = 256 << 20
    seen: Requests = []
    async with up(relay, local.port, on_request=lambda *a: seen.append(a)) as tunnel:
        async with http.get(public(tunnel, f"/bytes/{n}")) as resp:
            assert resp.status == 200
            # Let every buffer on the way fill up, until the local service's writes block.
            last = -1
            while local.bytes_out != last:
                last = local.bytes_out
                await asyncio.sleep(0.3)
            # Socket buffers and stream windows, a few MiB each at most, not the body.
            assert local.bytes_out < 32 << 20, local.bytes_out
            # Reading again resumes it.
            await resp.content.readexactly(8 << 20)
            await wait_for(lambda: local.bytes_out > last)
            resp.close()  # the caller goes away mid-answer
        await wait_for(lambda: tunnel.in_flight == 0)
        await wait_for(lambda: len(seen) == 1)
        assert seen[0][2] == 200 and seen[0][4] < n


async def test_sse_flows_event_by_event(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        started = time.monotonic()
        async with http.get(public(tunnel, "/sse?n=4&delay=0.3")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            data = b""
            while b"event 0" not in data:
                data += await resp.content.readany()
            assert time.monotonic() - started < 0.25  # long before the last event (0.9 s)
            data += await resp.read()
    assert [line for line in data.split(b"\n") if line.startswith(b"data:")] == [
        f"data: event {i}".encode() for i in range(4)
    ]


# -- failures and their statuses -------------------------------------------------------------


async def test_unreachable_local_service_is_a_502_naming_the_cause(
    relay: Setup, http: aiohttp.ClientSession
) -> None:
    seen: Requests = []
    port = free_port()
    async with up(relay, port, on_request=lambda *a: seen.append(a)) as tunnel:
        resp, body = await fetch(http, public(tunnel, "/anything"))
        # Reset code 2 before the head: the server answers 502 with the agent's reason.
        assert resp.status == 502
        answer = json.loads(body)
        assert answer["error"] == "local_service_failed"
        assert f"cannot reach http://localhost:{port}" in answer["detail"]
        await wait_for(lambda: len(seen) == 1)
        assert seen[0][:3] == ("GET", "/anything", 502)


@contextlib.asynccontextmanager
async def raw_local(answer: bytes) -> AsyncIterator[int]:
    """A local service that reads a request head, writes ``answer`` and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_local_failure_before_the_head_is_a_502(
    relay: Setup, http: aiohttp.ClientSession
) -> None:
    # Reset code 3 before the head: the local service hung up without answering.
    async with raw_local(b"") as port, up(relay, f"http://127.0.0.1:{port}") as tunnel:
        resp, body = await fetch(http, public(tunnel, "/"))
    assert resp.status == 502
    answer = json.loads(body)
    assert answer["error"] == "local_service_failed"
    assert "the local service failed" in answer["detail"]


async def test_local_failure_mid_body_cuts_the_answer(
    relay: Setup, http: aiohttp.ClientSession
) -> None:
    # Reset code 3 after the head: a local service that promises 1 MB and dies after 10 bytes.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789"
    async with raw_local(answer) as port, up(relay, f"http://127.0.0.1:{port}") as tunnel:
        async with http.get(public(tunnel, "/")) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "1000000"
            data = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                while chunk := await resp.content.readany():
                    data += chunk
        assert data == b"0123456789"  # what came, and no made-up ending
        await wait_for(lambda: tunnel.in_flight == 0)


async def test_caller_going_away_aborts_the_local_request(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    seen: Requests = []
    async with up(relay, local.port, on_request=lambda *a: seen.append(a)) as tunnel:
        url = public(tunnel, "/slow?delay=30")
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}\r\n\r\n".encode())
        await writer.drain()
        await wait_for(lambda: local.requests == 1)
        writer.close()  # the caller gives up before the head
        gone = time.monotonic()
        await wait_for(lambda: local.cancelled == ["/slow?delay=30"], timeout=3)
        # The server checks its callers every 0.5 s; the agent aborts at once on the reset.
        assert time.monotonic() - gone < 1.5
        await wait_for(lambda: len(seen) == 1)
        assert seen[0][:3] == ("GET", "/slow?delay=30", 499)
        assert tunnel.in_flight == 0
        # The tunnel still works afterwards.
        resp, _ = await fetch(http, public(tunnel, "/status/200"))
        assert resp.status == 200


async def test_many_concurrent_requests(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        answers = await asyncio.gather(
            *(
                fetch(http, public(tunnel, f"/echo?i={i}"), "POST", data=bytes([i]) * 1000)
                for i in range(50)
            )
        )
    for i, (resp, body) in enumerate(answers):
        seen = json.loads(body)
        assert resp.status == 200 and seen["query"] == f"i={i}"
        assert seen["sha256"] == hashlib.sha256(bytes([i]) * 1000).hexdigest()


async def test_max_frame_is_respected(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    # The server's max_frame (HELLO) is its body limit plus a header: about 4 KiB here. A
    # frame larger than that would close the connection (1009) and fail the request.
    relay = await Setup.on(await make_server(max_body_size=4096))
    connects: list[int] = []
    async with up(relay, local.port, on_connect=lambda: connects.append(1)) as tunnel:
        upload = expected_bytes(300000)
        resp, body = await fetch(http, public(tunnel, "/upload"), "POST", data=upload)
        assert json.loads(body)["sha256"] == hashlib.sha256(upload).hexdigest()
        # The agent's frames: as large as allowed, never larger.
        resp, body = await fetch(http, public(tunnel, "/bytes/300000"))
        assert resp.status == 200 and body == expected_bytes(300000)
        async with http.ws_connect(public(tunnel, "/ws"), max_msg_size=0) as ws:
            big = bytes(range(256)) * 1024  # 256 KiB: one message, many frames
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=5) == big
        assert tunnel.ready and connects == [1]  # never dropped


async def test_reconnects_with_the_same_url(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    connects: list[int] = []
    async with up(relay, local.port, on_connect=lambda: connects.append(1)) as tunnel:
        url = tunnel.public_url
        # The application detaches the device (close 4003): the agent comes back by itself.
        async with AsyncClient(relay.url, relay.app_id, relay.secret) as client:
            await client.detach("dev1")
        await wait_for(lambda: len(connects) == 2)
        await tunnel.wait_ready(5)
        assert tunnel.public_url == url
        resp, body = await fetch(http, public(tunnel, "/echo/after"))
        assert resp.status == 200 and json.loads(body)["path"] == "/echo/after"


# -- streams that are not requests -----------------------------------------------------------


def stream_to(server: RunningServer, app_id: str, device_id: str, meta: dict[str, Any]) -> Any:
    """A stream the server opens to a connected device, as it does for a tunnel request.

    The server itself only opens well-formed request streams, and only to a device with a
    tunnel; this reaches past its front door to check how the agent refuses the others.
    """
    session = server.relay.hub.get(app_id, device_id)
    assert session is not None
    return session.open_stream(meta, fin=False)  # type: ignore[attr-defined]


async def test_streams_are_refused_without_a_tunnel(
    relay: Setup, http: aiohttp.ClientSession
) -> None:
    device = Device(relay.url, relay.app_id, "dev1", await relay.key("dev1"))
    task = asyncio.get_running_loop().create_task(device.serve())
    try:
        await device.wait_connected(5)
        assert await relay.tunnels(http) == []  # no X-Backchannel-Tunnel: no tunnel asked
        meta = request_meta(RequestHead("GET", "/", [], "203.0.113.9", False))
        stream = stream_to(relay.server, relay.app_id, "dev1", meta)
        with pytest.raises(StreamReset) as info:
            await stream.receive()
        assert info.value.code == 1 and "no tunnel" in info.value.reason
    finally:
        await device.stop()
        await task


async def test_unknown_stream_kind_is_refused(relay: Setup, local: LocalService) -> None:
    async with up(relay, local.port) as tunnel:
        stream = stream_to(relay.server, relay.app_id, "dev1", {"t": "tcp"})
        with pytest.raises(StreamReset) as info:
            await stream.receive()
        assert info.value.code == 1 and "unknown stream kind" in info.value.reason
        bad = stream_to(relay.server, relay.app_id, "dev1", {"t": "http", "m": "GET", "u": "x"})
        with pytest.raises(StreamReset) as info:
            await bad.receive()
        assert info.value.code == 1 and "bad tunnel request" in info.value.reason
        assert tunnel.ready and local.requests == 0


async def test_expose_on_a_device_with_handlers(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    device = Device(relay.url, relay.app_id, "dev1", await relay.key("dev1"), backoff_initial=0.01)

    @device.handler("ping")
    async def ping(body: bytes) -> bytes:
        return b"pong:" + body

    tunnel = device.expose(local.port, name="demo")
    assert device.tunnel is tunnel and tunnel.device is device
    with pytest.raises(RuntimeError):
        device.expose(local.port)
    async with serving(tunnel), AsyncClient(relay.url, relay.app_id, relay.secret) as client:
        resp, _ = await fetch(http, public(tunnel, "/status/200"))
        assert resp.status == 200
        assert await client.send("dev1", b"x", method="ping") == b"pong:x"
        (listed,) = await relay.tunnels(http)
        assert listed["name"] == "demo" and listed["device_id"] == "dev1"


# -- WebSocket -------------------------------------------------------------------------------


async def test_websocket_round_trip(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    seen: Requests = []
    async with up(relay, local.port, on_request=lambda *a: seen.append(a)) as tunnel:
        async with http.ws_connect(
            public(tunnel, "/ws?room=1"), protocols=("other", "superchat"), max_msg_size=0
        ) as ws:
            assert ws.protocol == "superchat"  # the local service's choice, passed on
            await ws.send_str("héllo")
            assert await ws.receive_str(timeout=5) == "héllo"
            big = bytes(range(256)) * 4096  # 1 MiB: crosses many frames and credit rounds
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=5) == big
            # The caller closes: the local service sees the caller's code.
            await ws.close(code=4001, message=b"bye")
        await wait_for(lambda: local.ws_closes == [4001])
        await wait_for(lambda: len(seen) == 1)
    assert seen[0][:3] == ("GET", "/ws?room=1", 101)


async def test_websocket_closed_by_the_local_service(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        async with http.ws_connect(public(tunnel, "/ws")) as ws:
            assert ws.protocol is None  # none offered
            await ws.send_str("close:4321:done here")
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4321, "done here")
        await wait_for(lambda: tunnel.in_flight == 0)


async def test_websocket_local_refusal_is_an_http_answer(
    relay: Setup, local: LocalService, http: aiohttp.ClientSession
) -> None:
    async with up(relay, local.port) as tunnel:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(public(tunnel, "/status/403"))
        assert info.value.status == 403


async def test_websocket_unreachable_is_a_502(relay: Setup, http: aiohttp.ClientSession) -> None:
    port = free_port()
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with up(relay, port) as tunnel:
        resp, body = await fetch(http, public(tunnel, "/ws"), headers=handshake)
    assert resp.status == 502
    answer = json.loads(body)
    assert answer["error"] == "local_unreachable"
    assert f"cannot reach http://localhost:{port}" in answer["detail"]


async def test_websocket_caller_going_away_closes_the_local_socket(
    relay: Setup, local: LocalService
) -> None:
    async with up(relay, local.port) as tunnel:
        url = public(tunnel, "/ws")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            f"GET {url.raw_path} HTTP/1.1\r\nHost: {url.host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.transport.abort()  # no close message: the connection just drops
        await wait_for(lambda: len(local.ws_closes) == 1)
        await wait_for(lambda: tunnel.in_flight == 0)
