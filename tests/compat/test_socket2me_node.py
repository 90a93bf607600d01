"""Socket2me against the real Node ``socket.io-client`` 4.x (COMPAT.md, "Socket2me").

Every test runs an in-process server and ``node/socket2me_client.js`` as a subprocess; the
client answers each request according to its path (see the header of that file). Expected
query and form values are what Node's ``qs`` 6 (Express 4's extended parser) produces.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from tests.compat.node_client import NodeClient, NodeClientFactory, node_client, node_runtime
from tests.conftest import RunningServer, ServerFactory

__all__ = ["node_client", "node_runtime"]  # the fixtures, re-exported for pytest

TEXT = "text/html; charset=utf-8"
JSON = "application/json; charset=utf-8"
PAYLOAD_KEYS = {"headers", "method", "url", "query", "body", "rawBody"}


async def new_token(server: RunningServer, http: aiohttp.ClientSession) -> str:
    async with http.get(f"{server.url}/new") as resp:
        assert resp.status == 200
        token = json.loads(await resp.text())
    assert isinstance(token, str)
    return token


class Tunnel:
    """A server, a token and one connected Node client."""

    def __init__(
        self, server: RunningServer, token: str, client: NodeClient, http: aiohttp.ClientSession
    ) -> None:
        self.server = server
        self.token = token
        self.client = client
        self.http = http

    def url(self, rest: str = "") -> URL:
        """The public URL ``/go/{token}`` + ``rest``, sent exactly as written (no requoting)."""
        return URL(f"{self.server.url}/go/{self.token}{rest}", encoded=True)

    async def request(
        self, method: str, rest: str = "", **kwargs: Any
    ) -> tuple[int, bytes, CIMultiDictProxy[str]]:
        async with self.http.request(method, self.url(rest), **kwargs) as resp:
            return resp.status, await resp.read(), resp.headers

    async def echo(self, method: str = "GET", rest: str = "/echo", **kwargs: Any) -> dict[str, Any]:
        """The payload the client received, with ``rawBody`` decoded back to bytes."""
        async with self.http.request(method, self.url(rest), **kwargs) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"] == JSON
            assert resp.headers["X-Provided-By"] == "Socket2Me"
            # rawBody reached the client as a binary attachment, not as a string.
            assert resp.headers["X-RawBody-Type"] in ("Buffer", "ArrayBuffer")
            payload: dict[str, Any] = await resp.json()
        assert set(payload) <= PAYLOAD_KEYS
        assert set(payload) >= PAYLOAD_KEYS - {"url"}
        payload["rawBody"] = base64.b64decode(payload["rawBody"])
        return payload


@pytest.fixture
async def tunnel(
    make_server: ServerFactory, http: aiohttp.ClientSession, node_client: NodeClientFactory
) -> Tunnel:
    server = await make_server()
    token = await new_token(server, http)
    return Tunnel(server, token, await node_client(server.url, token), http)


# --- REST ---------------------------------------------------------------------------------


async def test_new_answers_a_json_string_token(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.get(f"{server.url}/new") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        text = await resp.text()
    assert text.startswith('"') and text.endswith('"')
    token = json.loads(text)
    assert re.fullmatch(r"[A-Za-z0-9_-]{48}", token)
    assert token != await new_token(server, http)


async def test_refresh(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server()
    token = await new_token(server, http)
    async with http.get(f"{server.url}/refresh/{token}") as resp:
        assert (resp.status, await resp.text()) == (200, "OK")
    async with http.get(f"{server.url}/refresh/{'x' * 48}") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert (await resp.json())["Error"] == "invalid token"


async def test_unknown_token_is_refused_to_the_node_client(
    make_server: ServerFactory, node_client: NodeClientFactory
) -> None:
    server = await make_server()
    client = await node_client(server.url, "x" * 48, wait="connect_error")
    assert client.seen("connect_error")[0]["message"] == "invalid token"
    assert not client.seen("connect")


# --- the request payload ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_payload_fields_over_each_transport(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    node_client: NodeClientFactory,
    transport: str,
) -> None:
    server = await make_server()
    token = await new_token(server, http)
    client = await node_client(server.url, token, transport=transport)
    assert client.seen("connect")[0]["transport"] == transport
    t = Tunnel(server, token, client, http)
    payload = await t.echo("POST", "/echo/x?q=1", json={"k": [1, None]})
    assert payload["method"] == "POST"
    assert payload["url"] == "echo/x"
    assert payload["query"] == {"q": "1"}
    assert payload["body"] == {"k": [1, None]}
    assert payload["rawBody"] == b'{"k": [1, null]}'


async def test_headers_are_lower_case_with_forwarded_headers(tunnel: Tunnel) -> None:
    payload = await tunnel.echo(headers={"X-Custom-Header": "Value", "Accept": "text/plain"})
    headers = payload["headers"]
    assert all(name == name.lower() for name in headers)
    assert headers["x-custom-header"] == "Value"
    assert headers["accept"] == "text/plain"
    host = URL(tunnel.server.url).raw_authority
    assert headers["host"] == host
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == host


async def test_forwarded_for_appends_to_a_proxy_chain(tunnel: Tunnel) -> None:
    payload = await tunnel.echo(headers={"X-Forwarded-For": "203.0.113.7"})
    assert payload["headers"]["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


URL_CASES = [
    ("", None),
    ("/", None),
    ("?x=1", None),
    ("/echo", "echo"),
    ("/echo/help/me?x=1", "echo/help/me"),
    ("/echo/a%20b/c", "echo/a b/c"),
    ("/echo/trailing/", "echo/trailing/"),
]


async def test_url_has_no_leading_slash_and_is_absent_at_the_root(tunnel: Tunnel) -> None:
    for rest, url in URL_CASES:
        payload = await tunnel.echo(rest=rest)
        assert payload.get("url", None) == url, rest
        assert url is not None or "url" not in payload, rest


QUERY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("", {}),
    ("a[b]=1&x[y][z]=2", {"a": {"b": "1"}, "x": {"y": {"z": "2"}}}),
    ("a[b]=1&a[b][c]=2", {"a": {"b": ["1", {"c": "2"}]}}),
    ("c=1&c=2&g[]=1&g[]=2", {"c": ["1", "2"], "g": ["1", "2"]}),
    ("d=%20x%2Fy&e=caf%C3%A9&f=a+b&h=", {"d": " x/y", "e": "café", "f": "a b", "h": ""}),
]


async def test_query_is_parsed_like_qs_extended(tunnel: Tunnel) -> None:
    for query, expected in QUERY_CASES:
        assert (await tunnel.echo(rest=f"/echo?{query}"))["query"] == expected, query


BODY_CASES: list[tuple[str | None, bytes, Any]] = [
    (
        "application/json",
        '{"a":[1,{"b":null}],"s":"é"}'.encode(),
        {"a": [1, {"b": None}], "s": "é"},
    ),
    (
        "application/x-www-form-urlencoded",
        b"a=1&b[c]=2&d=x&d=y&e=%C3%A9+z",
        {"a": "1", "b": {"c": "2"}, "d": ["x", "y"], "e": "é z"},
    ),
    ("text/plain", "hello, wörld\n".encode(), {}),
    ("application/octet-stream", bytes(range(256)) * 4, {}),
    (None, b"", {}),
]


async def test_bodies(tunnel: Tunnel) -> None:
    for content_type, raw, body in BODY_CASES:
        headers = {"Content-Type": content_type} if content_type else {}
        payload = await tunnel.echo("POST", data=raw, headers=headers)
        assert payload["body"] == body, content_type
        assert payload["rawBody"] == raw, content_type


async def test_every_method_reaches_the_client(tunnel: Tunnel) -> None:
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]:
        payload = await tunnel.echo(method.lower(), data=b"x" if method != "GET" else None)
        assert payload["method"] == method


async def test_head(tunnel: Tunnel) -> None:
    status, body, headers = await tunnel.request("HEAD", "/respond/full")
    assert status == 201
    assert body == b""
    assert headers["Content-Type"] == TEXT
    assert headers["X-Test"] == "a"
    assert headers["X-Provided-By"] == "Socket2Me"
    assert (await tunnel.client.wait_event("request", method="HEAD"))["url"] == "respond/full"


# --- respond(...) -------------------------------------------------------------------------


RESPOND_CASES: list[tuple[str, int, bytes, str | None]] = [
    ("full", 201, b"text", TEXT),
    ("body-only", 200, b"only body", TEXT),
    ("object", 200, b'{"a":1}', JSON),
    ("array", 200, b"[1,2]", JSON),
    ("status-only", 204, b"", None),
    ("null", 200, b"", None),
    ("nothing", 200, b"OK", TEXT),
    ("bad-headers", 200, b"x", TEXT),
    ("content-type", 200, b"<a/>", "application/xml"),
    ("list-header", 200, b"x", TEXT),
]


async def test_respond_forms(tunnel: Tunnel) -> None:
    for case, status, body, content_type in RESPOND_CASES:
        got_status, got_body, headers = await tunnel.request("GET", f"/respond/{case}")
        assert (got_status, got_body) == (status, body), case
        assert headers.get("Content-Type") == content_type, case
        assert headers.getall("X-Provided-By") == ["Socket2Me"], case
        if case == "full":
            assert headers["X-Test"] == "a"
        if case == "list-header":
            assert headers.getall("X-Multi") == ["a", "b"]


async def test_respond_status_only_keeps_the_default_body(tunnel: Tunnel) -> None:
    for status in [200, 302, 404, 500]:
        got, body, headers = await tunnel.request("GET", f"/status/{status}", allow_redirects=False)
        assert (got, body, headers["Content-Type"]) == (status, b"OK", TEXT)


async def test_binary_round_trip_is_byte_exact(tunnel: Tunnel) -> None:
    for size in [0, 1, 1 << 20]:
        data = os.urandom(size)
        status, body, headers = await tunnel.request("POST", "/respond/binary", data=data)
        assert status == 200
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["X-Provided-By"] == "Socket2Me"
        assert len(body) == size
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


# --- clients, concurrency and errors -----------------------------------------------------


async def test_takeover_by_a_second_client(
    make_server: ServerFactory, http: aiohttp.ClientSession, node_client: NodeClientFactory
) -> None:
    server = await make_server()
    token = await new_token(server, http)
    first = await node_client(server.url, token, name="first")
    t = Tunnel(server, token, first, http)
    assert (await t.request("GET", "/echo"))[2]["X-Client-Name"] == "first"

    second = await node_client(server.url, token, name="second")
    assert (await first.wait_event("disconnect"))["reason"] == "io server disconnect"
    assert (await t.request("GET", "/echo"))[2]["X-Client-Name"] == "second"
    # Once the first client is gone for good (its process exited, so the server has seen
    # its connection close too), the second must still be the token's client: the old
    # socket's disconnect must not unregister the new one. Keep asking for a while.
    assert await first.wait_exit() == 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        status, _, headers = await t.request("GET", "/echo")
        assert (status, headers["X-Client-Name"]) == (200, "second")
    assert not second.seen("disconnect")


async def test_concurrent_requests_through_one_token(tunnel: Tunnel) -> None:
    async def one(i: int) -> None:
        # Varying delays make the answers come back out of order.
        status, body, _ = await tunnel.request("POST", f"/slow/{(i * 7) % 50}?i={i}", data=b"z")
        assert status == 200
        assert json.loads(body) == {"url": f"slow/{(i * 7) % 50}", "query": {"i": str(i)}}

    await asyncio.gather(*(one(i) for i in range(200)))
    assert len(tunnel.client.seen("request")) == 200


async def test_502_when_the_client_dies_mid_request(
    make_server: ServerFactory, http: aiohttp.ClientSession, node_client: NodeClientFactory
) -> None:
    server = await make_server()  # tunnel_timeout stays 30 s
    token = await new_token(server, http)
    client = await node_client(server.url, token, transport="websocket")
    t = Tunnel(server, token, client, http)
    pending = asyncio.create_task(t.request("GET", "/never"))
    await client.wait_event("request", url="never")
    started = time.monotonic()
    await client.kill()
    status, body, _ = await asyncio.wait_for(pending, 5)
    assert time.monotonic() - started < 5
    assert status == 502
    assert json.loads(body)["Error"] == "client disconnected"
    # And the token now has no client: 502 at once.
    status, body, _ = await t.request("GET", "/echo")
    assert status == 502
    assert json.loads(body)["Error"] == "client not connected"


async def test_504_on_timeout(
    make_server: ServerFactory, http: aiohttp.ClientSession, node_client: NodeClientFactory
) -> None:
    server = await make_server(tunnel_timeout=0.3)
    token = await new_token(server, http)
    t = Tunnel(server, token, await node_client(server.url, token), http)
    status, body, _ = await t.request("GET", "/never")
    assert status == 504
    assert json.loads(body)["Error"] == "client timeout"
    # The client stays usable.
    assert (await t.request("GET", "/echo"))[0] == 200


async def test_404_unknown_token_and_502_without_client(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.get(f"{server.url}/go/{'x' * 48}/echo") as resp:
        assert resp.status == 404
        assert (await resp.json())["Error"] == "invalid token"
    token = await new_token(server, http)
    async with http.post(f"{server.url}/go/{token}/echo", data=b"x") as resp:
        assert resp.status == 502
        assert (await resp.json())["Error"] == "client not connected"


async def test_413_for_a_body_over_the_limit(
    make_server: ServerFactory, http: aiohttp.ClientSession, node_client: NodeClientFactory
) -> None:
    server = await make_server(tunnel_max_body_size=4096)
    token = await new_token(server, http)
    client = await node_client(server.url, token)
    t = Tunnel(server, token, client, http)
    assert (await t.request("POST", "/respond/nothing", data=b"a" * 4096))[0] == 200
    status, body, _ = await t.request("POST", "/respond/nothing", data=b"a" * 4097)
    assert status == 413
    assert json.loads(body)["Error"] == "request too large"
    assert len(client.seen("request")) == 1  # the 413 never reached the client


async def test_429_over_the_rate_limit(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(tunnel_rate_limit=1, tunnel_rate_burst=2)
    statuses = []
    for _ in range(3):
        async with http.get(f"{server.url}/go/{'x' * 48}") as resp:
            statuses.append(resp.status)
            retry_after = resp.headers.get("Retry-After")
    assert statuses == [404, 404, 429]
    assert retry_after is not None and int(retry_after) >= 1
