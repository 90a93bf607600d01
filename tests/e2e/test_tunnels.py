"""Native HTTP tunnels end to end (issue 5): real sockets, a real server, the SDK's ``Tunnel``
as the agent, and the local test service (tests/tunnel_service.py) behind it.

The 1 GiB transfers and the slow reader are in test_tunnels_big.py; the agent as a process
(``backchannel expose``, and killed mid-download) in test_tunnels_process.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yarl

from backchannel.sdk import SessionReplaced, TunnelRefused
from tests.conftest import RunningServer, ServerFactory, ServerProcess, free_port, wait_for
from tests.e2e.tunnel_helpers import (
    ADMIN,
    MiB,
    admin_setup,
    async_body,
    make_tunnel,
    random_body,
    serving,
    sha256,
    tunnel_up,
)
from tests.tunnel_service import (
    GZIP_TEXT,
    WS_PROTOCOLS,
    LocalService,
    bytes_sha256,
    expected_bytes,
    tunnel_service,
)

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture
async def local() -> AsyncIterator[LocalService]:
    async with tunnel_service() as svc:
        yield svc


async def credentials(server: RunningServer, *devices: str) -> tuple[str, list[str]]:
    """An app and a key for each device."""
    app_id, _ = await server.create_app()
    return app_id, [await server.provision(app_id, d) for d in devices]


@pytest.fixture
async def agent(server: RunningServer, local: LocalService) -> AsyncIterator[Any]:
    """A factory of tunnels on ``server`` to ``local`` (one device per tunnel)."""
    app_id, _ = await server.create_app()
    async with contextlib.AsyncExitStack() as stack:

        async def up(device: str = "dev", **kw: Any) -> Any:
            key = await server.provision(app_id, device)
            target = kw.pop("target", local.port)
            return await stack.enter_async_context(
                tunnel_up(server.url, app_id, device, key, target, **kw)
            )

        yield up


async def get_json(
    http: aiohttp.ClientSession, url: str | yarl.URL, method: str = "GET", **kw: Any
) -> tuple[int, dict[str, Any], Any]:
    """(status, headers, decoded JSON body)."""
    async with http.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def basic(user: str, password: str) -> dict[str, str]:
    """An HTTP basic Authorization header."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def header_values(pairs: list[list[str]], name: str) -> list[str]:
    """Values of ``name`` in the echo's ``[[name, value], ...]``, in order."""
    return [v for k, v in pairs if k.lower() == name.lower()]


# -- raw HTTP/1.1, for what clients would normalise ------------------------------------------


async def raw_request(
    url: str, head: str, body: bytes = b""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send ``head`` (request line and headers, without the blank line) as is; read one
    answer framed by Content-Length or chunked."""
    u = yarl.URL(url)
    assert u.host is not None and u.port is not None
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = [
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            ]
            names = {k.lower(): v for k, v in headers}
            if "content-length" in names:
                data = await reader.readexactly(int(names["content-length"]))
            elif names.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    data += await reader.readexactly(size)
                    await reader.readexactly(2)
                await reader.readuntil(b"\r\n")
            else:
                data = b""
        return status, headers, data
    finally:
        writer.close()


def host_port(url: str) -> str:
    u = yarl.URL(url)
    return f"{u.host}:{u.port}"


# -- bodies ----------------------------------------------------------------------------------


async def test_binary_round_trips_checked_by_sha256(
    agent: Any, local: LocalService, http: aiohttp.ClientSession
) -> None:
    base = (await agent()).public_url
    body = random_body(3 * MiB + 123, seed=2)
    # Upload with a Content-Length, and chunked (an async generator).
    status, _, answer = await get_json(http, base + "upload", "POST", data=body)
    assert status == 200
    assert answer == {"length": len(body), "sha256": sha256(body)}
    digest = hashlib.sha256()
    block = random_body(MiB, seed=3)
    status, _, answer = await get_json(
        http, base + "upload", "PUT", data=async_body(5 * MiB + 11, block, digest)
    )
    assert status == 200
    assert answer == {"length": 5 * MiB + 11, "sha256": digest.hexdigest()}
    # Download, with a Content-Length (passed on) and chunked (streamed chunked).
    n = 5 * MiB + 7
    for query in ("", "?chunked=1"):
        async with http.get(base + f"bytes/{n}{query}") as r:
            assert r.status == 200
            data = await r.read()
            if query:
                assert "Content-Length" not in r.headers
                assert r.headers["Transfer-Encoding"] == "chunked"
            else:
                assert r.headers["Content-Length"] == str(n)
            assert r.headers["X-SHA256"] == bytes_sha256(n)
        assert len(data) == n
        assert sha256(data) == bytes_sha256(n)
        assert data == expected_bytes(n)
    # A compressed answer passes as sent: same bytes, same Content-Encoding.
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.get(base + "gzip") as r,
    ):
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()) == GZIP_TEXT


async def test_every_method_reaches_the_local_service(
    agent: Any, http: aiohttp.ClientSession
) -> None:
    base = (await agent()).public_url
    body = random_body(1000, seed=4)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        data = None if method in ("GET", "OPTIONS") else body
        status, _, answer = await get_json(http, base + "echo/m", method, data=data)
        assert status == 200, method
        assert answer["method"] == method
        assert answer["length"] == (len(body) if data else 0)
        if data:
            assert answer["sha256"] == sha256(body)
    async with http.head(base + f"bytes/{MiB}") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(MiB)
        assert await r.read() == b""
    # Extension methods (WebDAV and others) are methods too: "every method" (issue 5).
    status, _, answer = await get_json(http, base + "echo/dav", "PROPFIND")
    assert status == 200, answer
    assert answer["method"] == "PROPFIND"


async def test_request_body_limit(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    # A short head timeout, so that a request stuck waiting fails in seconds, not 30.
    server = await make_server(expose_max_body_size=MiB, tunnel_timeout=3)
    app_id, (key,) = await credentials(server, "dev")
    async with tunnel_up(server.url, app_id, "dev", key, local.port) as tunnel:
        base = tunnel.public_url
        status, _, answer = await get_json(http, base + "upload", "POST", data=b"x" * MiB)
        assert status == 200 and answer["length"] == MiB
        # Declared too large: refused before anything is forwarded.
        before = local.requests
        status, _, answer = await get_json(http, base + "upload", "POST", data=b"x" * (MiB + 1))
        assert status == 413
        assert answer["error"] == "request_too_large"
        assert local.requests == before
        # Chunked, found too large on the way: still a 413 naming the limit.
        digest = hashlib.sha256()
        try:
            status, _, answer = await get_json(
                http, base + "upload", "POST", data=async_body(2 * MiB, b"y" * MiB, digest)
            )
        except aiohttp.ClientError as exc:  # the server may stop reading the body
            pytest.fail(f"chunked over-limit upload: {exc!r} instead of a 413")
        assert status == 413, answer
        assert answer["error"] == "request_too_large"


async def test_caller_going_away_mid_upload_ends_the_request_promptly(
    server: RunningServer, agent: Any, local: LocalService
) -> None:
    """The caller sends part of a declared body and disconnects: the server must end the
    exchange (and the agent its local request) at once, not hold it until a timeout."""
    tunnel = await agent()
    base = tunnel.public_url
    listing = server.url + "/admin/v1/tunnels"

    async def in_flight() -> int:
        async with aiohttp.ClientSession() as s, s.get(listing, headers=ADMIN) as r:
            return int((await r.json())["tunnels"][0]["in_flight"])

    u = yarl.URL(base)
    assert u.host is not None and u.port is not None
    _, writer = await asyncio.open_connection(u.host, u.port)
    writer.write(
        f"POST {u.raw_path}upload?delay=0.01 HTTP/1.1\r\nHost: {host_port(base)}\r\n"
        f"Content-Length: {100 * MiB}\r\n\r\n".encode()
        + b"z" * MiB
    )
    await writer.drain()
    await wait_for(lambda: tunnel.in_flight == 1)
    assert await in_flight() == 1
    writer.close()
    start = time.monotonic()
    deadline = start + 5
    while await in_flight():
        assert time.monotonic() < deadline, "the server still holds the request after 5 s"
        await asyncio.sleep(0.05)
    server_side = time.monotonic() - start
    await wait_for(lambda: tunnel.in_flight == 0, 5)
    print(f"\ncaller gone mid-upload: server released the request in {server_side:.2f} s")
    assert server_side < 2.0


# -- streaming -------------------------------------------------------------------------------


async def test_sse_events_arrive_as_sent(agent: Any, http: aiohttp.ClientSession) -> None:
    base = (await agent()).public_url
    n, delay = 5, 0.25
    arrivals: list[tuple[float, str]] = []
    start = time.monotonic()
    async with http.get(base + f"sse?n={n}&delay={delay}") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in r.headers
        async for line in r.content:
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic() - start, line.decode().strip()))
    assert [text for _, text in arrivals] == [f"data: event {i}" for i in range(n)]
    times = [t for t, _ in arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Spread like the sending (0.25 s apart), not bunched at the end.
    assert times[0] < delay * (n - 1) / 2, times
    assert all(gap > delay * 0.5 for gap in gaps), gaps
    assert times[-1] - times[0] > delay * (n - 1) * 0.8, times


async def test_websocket_echo_and_close_propagation(
    agent: Any, local: LocalService, http: aiohttp.ClientSession
) -> None:
    base = (await agent()).public_url
    blob = random_body(256 * 1024, seed=5)
    async with http.ws_connect(base + "ws?x=1", protocols=("nope", WS_PROTOCOLS[1])) as ws:
        assert ws.protocol == WS_PROTOCOLS[1]  # the local service chose it
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob
        await ws.send_bytes(b"")
        assert await ws.receive_bytes(timeout=5) == b""
        # The caller closes: the local service sees the caller's code.
        await ws.close(code=4001, message=b"caller done")
    await wait_for(lambda: 4001 in local.ws_closes)
    # The local service closes: the caller sees its code and reason.
    async with http.ws_connect(base + "ws") as ws:
        assert ws.protocol is None  # none offered, none chosen
        await ws.send_str("close:4321:going away")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4321
        assert msg.extra == "going away"
    assert ws.close_code == 4321


async def test_websocket_refused_by_the_local_service_is_an_http_answer(
    agent: Any, http: aiohttp.ClientSession
) -> None:
    base = (await agent()).public_url
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(base + "status/403")
    assert info.value.status == 403


# -- headers and targets ---------------------------------------------------------------------


async def test_repeated_headers_both_ways(agent: Any, http: aiohttp.ClientSession) -> None:
    base = (await agent()).public_url
    async with http.get(base + "headers") as r:
        assert r.status == 200
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
        assert r.headers.getall("X-Multi") == ["one", "two"]
    status, _, answer = await raw_request(
        base,
        f"GET {yarl.URL(base).raw_path}echo HTTP/1.1\r\nHost: {host_port(base)}\r\n"
        "X-Rep: 1\r\nCookie: a=1\r\nX-Rep: 2\r\nCookie: b=2\r\nX-Rep: three, four",
    )
    assert status == 200
    pairs = json.loads(answer)["headers"]
    assert header_values(pairs, "X-Rep") == ["1", "2", "three, four"]
    assert header_values(pairs, "Cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize(
    "target",
    [
        "/echo?a=1&a=2&b=%2F%20+x&c",
        "/echo?x=&=y&&z=&",
        "/echo?q=%E2%9C%93&e=%c3%a9&s=%F0%9F%98%80",
        "/echo/a%2Fb/%7e/c;p=1?%00=%ff",
        "/echo/sp%20ace/+plus+?k=v=w&semi=1;2",
    ],
)
async def test_targets_pass_byte_for_byte(agent: Any, target: str) -> None:
    base = (await agent()).public_url
    root = yarl.URL(base).raw_path.rstrip("/")
    status, _, answer = await raw_request(
        base, f"GET {root}{target} HTTP/1.1\r\nHost: {host_port(base)}"
    )
    assert status == 200, answer
    echo = json.loads(answer)
    path, _, query = target.partition("?")
    assert (echo["path"], echo["query"]) == (path, query)


async def test_hop_by_hop_removed_and_forwarded_headers_added(
    agent: Any, http: aiohttp.ClientSession
) -> None:
    base = (await agent()).public_url
    status, _, answer = await raw_request(
        base,
        f"GET {yarl.URL(base).raw_path}echo HTTP/1.1\r\nHost: {host_port(base)}\r\n"
        "Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: secret\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic eDp5\r\n"
        "Proxy-Connection: keep-alive\r\nX-Forwarded-For: 10.9.8.7\r\n"
        "X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Kept: yes",
    )
    assert status == 200
    pairs = json.loads(answer)["headers"]
    names = {k.lower() for k, _ in pairs}
    for gone in ("connection", "x-drop-me", "keep-alive", "te", "trailer"):
        assert gone not in names, (gone, pairs)
    assert not any(n.startswith("proxy-") for n in names), pairs
    assert header_values(pairs, "X-Kept") == ["yes"]
    # Appended to the chain; Proto and Host describe this hop.
    assert header_values(pairs, "X-Forwarded-For") == ["10.9.8.7, 127.0.0.1"]
    assert header_values(pairs, "X-Forwarded-Proto") == ["http"]
    assert header_values(pairs, "X-Forwarded-Host") == [host_port(base)]
    assert header_values(pairs, "Host") == [host_port(base)]


async def test_hop_by_hop_response_headers_removed(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    """A local service answering with hop-by-hop fields (a raw socket server)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                    b"Connection: keep-alive, X-Private\r\nX-Private: secret\r\n"
                    b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\n"
                    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    raw = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    app_id, (key,) = await credentials(server, "dev")
    try:
        target = f"http://127.0.0.1:{port}"
        async with (
            tunnel_up(server.url, app_id, "dev", key, target) as t,
            http.get(t.public_url + "x") as r,
        ):
            assert r.status == 200
            assert await r.read() == b"ok"
            names = {k.lower() for k in r.headers}
            assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert r.headers["X-Kept"] == "yes"
        for gone in ("x-private", "proxy-authenticate", "keep-alive"):
            assert gone not in names, (gone, names)
        assert "x-private" not in r.headers.get("Connection", "").lower()
    finally:
        raw.close()
        await raw.wait_closed()


# -- access control --------------------------------------------------------------------------


async def test_basic_auth(agent: Any, http: aiohttp.ClientSession) -> None:
    base = (await agent(basic_auth="alice:s3cret pass")).public_url
    status, headers, answer = await get_json(http, base + "echo")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert answer["error"] == "tunnel_auth_required"
    assert (await get_json(http, base + "echo", headers=basic("alice", "nope")))[0] == 401
    bearer = {"Authorization": "Bearer alice:s3cret pass"}
    assert (await get_json(http, base + "echo", headers=bearer))[0] == 401
    status, _, answer = await get_json(http, base + "echo", headers=basic("alice", "s3cret pass"))
    assert status == 200
    # The tunnel's credentials stay at the tunnel.
    assert header_values(answer["headers"], "Authorization") == []


async def test_bearer_and_either_credential(agent: Any, http: aiohttp.ClientSession) -> None:
    base = (await agent("dev1", bearer="tok-123")).public_url
    status, headers, _ = await get_json(http, base + "echo")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    bad = {"Authorization": "Bearer tok-1234"}
    assert (await get_json(http, base + "echo", headers=bad))[0] == 401
    status, _, answer = await get_json(
        http, base + "echo", headers={"Authorization": "Bearer tok-123"}
    )
    assert status == 200
    assert header_values(answer["headers"], "Authorization") == []
    both = (await agent("dev2", basic_auth="u:p", bearer="tok-b")).public_url
    assert (await get_json(http, both + "echo", headers=basic("u", "p")))[0] == 200
    ok = {"Authorization": "Bearer tok-b"}
    assert (await get_json(http, both + "echo", headers=ok))[0] == 200
    assert (await get_json(http, both + "echo"))[0] == 401
    # Without tunnel credentials, Authorization is the local service's business: passed on.
    open_ = (await agent("dev3")).public_url
    mine = {"Authorization": "Bearer for-the-app"}
    _, _, answer = await get_json(http, open_ + "echo", headers=mine)
    assert header_values(answer["headers"], "Authorization") == ["Bearer for-the-app"]


async def test_ip_allow_and_deny_lists(agent: Any, http: aiohttp.ClientSession) -> None:
    spoof = {"X-Forwarded-For": "10.1.2.3"}  # not trusted: the socket's address counts
    elsewhere = (await agent("dev1", allow_ip=["10.0.0.0/8"])).public_url
    status, _, answer = await get_json(http, elsewhere + "echo", headers=spoof)
    assert status == 403
    assert answer["error"] == "ip_not_allowed"
    assert "127.0.0.1" in answer["detail"]
    here = (await agent("dev2", allow_ip=["10.0.0.0/8", "127.0.0.1/32"])).public_url
    assert (await get_json(http, here + "echo"))[0] == 200
    denied = (await agent("dev3", deny_ip=["127.0.0.0/8"])).public_url
    status, _, answer = await get_json(http, denied + "echo")
    assert status == 403 and answer["error"] == "ip_denied"
    # Deny wins over allow.
    both = (await agent("dev4", allow_ip=["127.0.0.0/8"], deny_ip=["127.0.0.1"])).public_url
    status, _, answer = await get_json(http, both + "echo")
    assert status == 403 and answer["error"] == "ip_denied"
    # The refusal comes before any authentication question.
    auth = (await agent("dev5", deny_ip=["127.0.0.1"], bearer="t")).public_url
    assert (await get_json(http, auth + "echo"))[0] == 403


async def test_per_tunnel_rate_limit(
    agent: Any, local: LocalService, http: aiohttp.ClientSession
) -> None:
    limited = (await agent("dev1", rate_limit=2)).public_url  # bursts of 4
    other = (await agent("dev2")).public_url
    statuses = []
    refusal: tuple[int, dict[str, Any], Any] | None = None
    for _ in range(10):
        result = await get_json(http, limited + "echo")
        statuses.append(result[0])
        if result[0] == 429:
            refusal = result
    assert statuses[:4] == [200] * 4
    assert 429 in statuses and set(statuses) <= {200, 429}
    assert refusal is not None
    _, headers, answer = refusal
    assert int(headers["Retry-After"]) >= 1
    assert answer["error"] == "rate_limited"
    # Per tunnel: another tunnel still answers the same caller.
    assert (await get_json(http, other + "echo"))[0] == 200
    # And the limited one again, once tokens came back (2 per second).
    deadline = time.monotonic() + 3
    while (await get_json(http, limited + "echo"))[0] != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


# -- outcomes --------------------------------------------------------------------------------


async def test_unknown_tunnel_is_404(server: RunningServer, http: aiohttp.ClientSession) -> None:
    status, _, answer = await get_json(http, server.url + "/go/no-such-token/echo")
    assert status == 404
    assert answer["error"] == "tunnel_not_found"
    async with http.get(server.url + "/go/no-such-token/", headers=HTML) as r:
        assert r.status == 404
        assert r.content_type == "text/html"
        page = await r.text()
    assert "<h1>404" in page and "tunnel_not_found" in page


async def test_agent_offline_is_502(
    server: RunningServer, local: LocalService, http: aiohttp.ClientSession
) -> None:
    app_id, (key,) = await credentials(server, "dev")
    async with tunnel_up(server.url, app_id, "dev", key, local.port) as tunnel:
        base = tunnel.public_url
        assert (await get_json(http, base + "echo"))[0] == 200
    status, _, answer = await get_json(http, base + "echo")
    assert status == 502
    assert answer["error"] == "tunnel_offline"
    assert "no client is connected" in answer["detail"]
    async with http.get(base + "echo", headers=HTML) as r:
        assert r.status == 502 and r.content_type == "text/html"
        assert "tunnel_offline" in await r.text()


async def test_local_service_down_is_502_naming_the_cause(
    agent: Any, http: aiohttp.ClientSession
) -> None:
    port = free_port()  # nothing listens there
    tunnel = await agent(target=f"http://127.0.0.1:{port}")
    status, _, answer = await get_json(http, tunnel.public_url + "echo")
    assert status == 502
    assert answer["error"] == "local_service_failed"
    assert f"127.0.0.1:{port}" in answer["detail"], answer
    async with http.get(tunnel.public_url + "echo", headers=HTML) as r:
        assert r.status == 502 and r.content_type == "text/html"
        page = await r.text()
    assert "local_service_failed" in page and f"127.0.0.1:{port}" in page
    # A WebSocket to it as well.
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(tunnel.public_url + "ws")
    assert info.value.status == 502


async def test_head_timeout_is_504_and_aborts_the_local_request(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    server = await make_server(tunnel_timeout=0.5)
    app_id, (key,) = await credentials(server, "dev")
    async with tunnel_up(server.url, app_id, "dev", key, local.port) as tunnel:
        start = time.monotonic()
        status, _, answer = await get_json(http, tunnel.public_url + "slow?delay=5")
        took = time.monotonic() - start
        assert status == 504
        assert answer["error"] == "tunnel_timeout"
        assert 0.4 < took < 2.5, took
        # The local request was abandoned, not left running.
        await wait_for(lambda: "/slow?delay=5" in local.cancelled)
        # The head timeout is not a body timeout: a slow stream may take longer.
        async with http.get(tunnel.public_url + "sse?n=4&delay=0.3") as r:
            assert r.status == 200
            assert (await r.read()).count(b"data:") == 4


# -- names, takeover, stable URLs ------------------------------------------------------------


async def test_takeover_of_a_name_and_refusal_for_another_credential(
    server: RunningServer, local: LocalService, http: aiohttp.ClientSession
) -> None:
    app_id, (key1, key2) = await credentials(server, "dev1", "dev2")
    async with tunnel_service() as local2:
        first = make_tunnel(server.url, app_id, "dev1", key1, local.port, name="web")
        first_task = asyncio.get_running_loop().create_task(first.serve())
        await first.wait_ready(5)
        url = first.public_url
        assert url is not None
        assert (await get_json(http, url + "echo"))[0] == 200
        assert local.requests == 1
        # Same credential, same name: takes over at once.
        second = make_tunnel(server.url, app_id, "dev1", key1, local2.port, name="web")
        start = time.monotonic()
        async with serving(second):
            assert second.public_url == url
            assert (await get_json(http, url + "echo"))[0] == 200
            assert time.monotonic() - start < 2
            assert local2.requests == 1 and local.requests == 1
            with pytest.raises(SessionReplaced):
                await asyncio.wait_for(first_task, 5)
            # Another credential asking for the name: 4006, no retry.
            third = make_tunnel(server.url, app_id, "dev2", key2, local.port, name="web")
            with pytest.raises(TunnelRefused) as info:
                await asyncio.wait_for(third.serve(), 5)
            assert info.value.close_code == 4006
            assert "reserved" in str(info.value)
            # The owner is undisturbed.
            assert (await get_json(http, url + "echo"))[0] == 200
            assert local2.requests == 2


async def test_url_is_stable_across_reconnects_and_server_restarts(
    server_process: Callable[[], ServerProcess],
    local: LocalService,
    http: aiohttp.ClientSession,
) -> None:
    sp = server_process()
    await asyncio.to_thread(sp.start, "--log-level", "warning")
    app_id, key = await admin_setup(http, sp.url)
    async with tunnel_up(sp.url, app_id, "agent", key, local.port, name="stable") as tunnel:
        url = tunnel.public_url
        assert url is not None
    async with tunnel_up(sp.url, app_id, "agent", key, local.port, name="stable") as tunnel:
        assert tunnel.public_url == url  # a new connection, the same URL
        await asyncio.to_thread(sp.stop)
        await wait_for(lambda: not tunnel.ready)
        await asyncio.to_thread(sp.start, "--log-level", "warning")
        await tunnel.wait_ready(10)  # it reconnects by itself (sqlite store)
        assert tunnel.public_url == url
        status, _, answer = await get_json(http, url + "echo/after")
        assert status == 200 and answer["path"] == "/echo/after"
    await asyncio.to_thread(sp.stop)


async def test_host_routing_with_a_domain(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    server = await make_server(domain="tunnels.test")
    app_id, (key,) = await credentials(server, "dev")
    port = yarl.URL(server.url).port
    async with tunnel_up(server.url, app_id, "dev", key, local.port, name="web") as tunnel:
        assert tunnel.host_url == f"http://web.tunnels.test:{port}/"
        host = {"Host": f"web.tunnels.test:{port}"}
        url = yarl.URL(server.url + "/echo/deep/path?a=1&a=2&b=%2F", encoded=True)
        status, _, answer = await get_json(http, url, headers=host)
        assert status == 200
        assert (answer["path"], answer["query"]) == ("/echo/deep/path", "a=1&a=2&b=%2F")
        assert header_values(answer["headers"], "X-Forwarded-Host") == [host["Host"]]
        # Any path, even the server's own routes, goes to the tunnel.
        for path in ("/healthz", "/admin/v1/tunnels", "/go/x/y", "/v1/connect"):
            before = local.requests
            async with http.get(server.url + path, headers=host) as r:
                assert r.status == 404, path  # the local service's own 404
                assert await r.text() == "404: Not Found"
            assert local.requests == before + 1, path
        # Methods and bodies too.
        body = random_body(100_000, seed=9)
        status, _, answer = await get_json(
            http, server.url + "/upload", "POST", data=body, headers=host
        )
        assert answer == {"length": len(body), "sha256": sha256(body)}
        # Any method too (here the host routing does not go through the router).
        status, _, answer = await get_json(http, server.url + "/echo", "PROPFIND", headers=host)
        assert status == 200 and answer["method"] == "PROPFIND"
        # Case and a trailing dot do not matter in host names.
        dotted = {"Host": f"WEB.Tunnels.Test.:{port}"}
        assert (await get_json(http, server.url + "/echo", headers=dotted))[0] == 200
        # An unknown name is a 404; the bare domain is the server itself.
        status, _, answer = await get_json(
            http, server.url + "/echo", headers={"Host": f"nope.tunnels.test:{port}"}
        )
        assert status == 404 and answer["error"] == "tunnel_not_found"
        async with http.get(server.url + "/healthz", headers={"Host": f"tunnels.test:{port}"}) as r:
            assert r.status == 200
        # /go/{token} keeps working next to host routing.
        assert (await get_json(http, tunnel.public_url + "echo"))[0] == 200


# -- load ------------------------------------------------------------------------------------


async def test_500_concurrent_requests_through_one_tunnel(
    make_server: ServerFactory, local: LocalService
) -> None:
    server = await make_server(tunnel_rate_limit=0)
    app_id, (key,) = await credentials(server, "dev")
    async with (
        tunnel_up(server.url, app_id, "dev", key, local.port) as tunnel,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
    ):
        base = tunnel.public_url

        async def one(i: int) -> None:
            if i % 10 == 0:  # some downloads among the echoes
                n = 100_000 + i
                async with client.get(base + f"bytes/{n}") as r:
                    assert r.status == 200
                    assert sha256(await r.read()) == bytes_sha256(n)
                return
            body = f"request {i} ".encode() * (i % 50 + 1)
            async with client.post(base + f"echo/{i}?i={i}", data=body) as r:
                assert r.status == 200, await r.text()
                echo = await r.json()
            assert (echo["path"], echo["query"]) == (f"/echo/{i}", f"i={i}")
            assert echo["sha256"] == sha256(body)

        start = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(500)), return_exceptions=True)
        took = time.monotonic() - start
    failures = [r for r in results if r is not None]
    assert not failures, failures[:5]
    print(f"\n500 concurrent requests through one tunnel in {took:.2f} s")
    assert tunnel.in_flight == 0


# -- admin -----------------------------------------------------------------------------------


async def test_admin_lists_tunnels(
    agent: Any, server: RunningServer, http: aiohttp.ClientSession
) -> None:
    listing = server.url + "/admin/v1/tunnels"
    await agent("dev1", name="web", bearer="sekrit-token", allow_ip=["127.0.0.0/8"], rate_limit=5)
    async with http.get(listing) as r:
        assert r.status == 401
    status, _, answer = await get_json(http, listing, headers=ADMIN)
    assert status == 200
    (entry,) = answer["tunnels"]
    assert entry["name"] == "web"
    assert entry["kind"] == "native"
    assert entry["device_id"] == "dev1"
    assert entry["in_flight"] == 0
    assert entry["access"]["credentials"] is True
    assert entry["access"]["allow_ip"] == ["127.0.0.0/8"]
    assert "sekrit-token" not in json.dumps(answer)
    assert entry["access"]["rate_limit"] == 5, entry


async def test_admin_delete_releases_the_name(
    server: RunningServer, local: LocalService, http: aiohttp.ClientSession
) -> None:
    app_id, (key1, key2) = await credentials(server, "dev1", "dev2")
    listing = server.url + "/admin/v1/tunnels"
    first = make_tunnel(server.url, app_id, "dev1", key1, local.port, name="web")
    first_task = asyncio.get_running_loop().create_task(first.serve())
    await first.wait_ready(5)
    try:
        url = first.public_url
        assert url is not None
        async with http.delete(listing + "/web") as r:
            assert r.status == 401
        # DELETE closes the tunnel and frees the name for another credential.
        async with http.delete(listing + "/web", headers=ADMIN) as r:
            assert r.status == 200
            assert await r.json() == {"released": "web"}
        with pytest.raises(TunnelRefused):  # 4006, ended for good: no reconnect to re-claim
            await asyncio.wait_for(first_task, 5)
        assert (await get_json(http, listing, headers=ADMIN))[2]["tunnels"] == []
        assert (await get_json(http, url + "echo"))[0] == 404
        async with tunnel_up(server.url, app_id, "dev2", key2, local.port, name="web") as t2:
            assert t2.public_url != url
            assert (await get_json(http, t2.public_url + "echo"))[0] == 200
            (entry,) = (await get_json(http, listing, headers=ADMIN))[2]["tunnels"]
            assert (entry["name"], entry["device_id"]) == ("web", "dev2")
        async with http.delete(listing + "/nope", headers=ADMIN) as r:
            assert r.status == 404
    finally:
        await first.stop()


async def test_behind_a_trusted_proxy(
    make_server: ServerFactory, local: LocalService, http: aiohttp.ClientSession
) -> None:
    server = await make_server(trusted_proxies=["127.0.0.1"])
    app_id, (key,) = await credentials(server, "dev1")
    async with tunnel_up(
        server.url, app_id, "dev1", key, local.port, allow_ip=["198.51.100.0/24"]
    ) as tunnel:
        url = tunnel.public_url + "echo"
        # IP rules see the client the proxy names; the chain gets the proxy appended.
        status, _, answer = await get_json(http, url, headers={"X-Forwarded-For": "198.51.100.4"})
        assert status == 200
        assert header_values(answer["headers"], "X-Forwarded-For") == ["198.51.100.4, 127.0.0.1"]
        status, _, answer = await get_json(http, url, headers={"X-Forwarded-For": "203.0.113.1"})
        assert (status, answer["error"]) == (403, "ip_not_allowed")
        assert "203.0.113.1" in answer["detail"]
