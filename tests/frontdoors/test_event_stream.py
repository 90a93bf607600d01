"""GET /v1/applications/{app_id}/events: Server-Sent Events (docs/api.md, "Event stream")."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from prometheus_client import REGISTRY

from backchannel.app import EVENT_STREAM, EVENTS
from backchannel.sdk._events import SseMessage, SseParser
from tests.compat.cometa_device import CometaDevice
from tests.conftest import ADMIN_TOKEN, RunningServer, ServerFactory, wait_for
from tests.rawdevice import RawDevice, connect


class Stream:
    """One open event stream, parsed as it arrives."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.parser = SseParser()
        self.raw = b""
        self.messages: deque[SseMessage] = deque()
        self.ended = False

    @classmethod
    async def open(
        cls,
        http: aiohttp.ClientSession,
        server: RunningServer,
        app_id: str,
        secret: str,
        query: str = "",
        last_id: int | None = None,
    ) -> Stream:
        headers = {"Authorization": f"OAuth {secret}"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        resp = await http.get(
            f"{server.url}/v1/applications/{app_id}/events{query}", headers=headers
        )
        assert resp.status == 200, await resp.text()
        return cls(resp)

    async def _read(self, timeout: float) -> None:
        chunk = await asyncio.wait_for(self.resp.content.readany(), timeout)
        if not chunk:
            self.ended = True
            raise EOFError
        self.raw += chunk
        self.messages.extend(self.parser.feed(chunk))

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next event's JSON object."""
        while not self.messages:
            await self._read(timeout)
        message = self.messages.popleft()
        event: dict[str, Any] = orjson.loads(message.data)
        assert message.last_id == str(event["id"])
        assert unquote(message.event) == event["type"]
        return event

    async def take(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        return [await self.next(timeout) for _ in range(n)]

    async def until_end(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every event left, until the server ends the stream."""
        got = []
        try:
            while True:
                got.append(await self.next(timeout))
        except EOFError:
            return got

    def close(self) -> None:
        self.resp.close()


def data_of(event: dict[str, Any]) -> bytes:
    """The event's bytes, whichever field carries them."""
    if event["data"] is not None:
        assert event["data_b64"] is None
        return str(event["data"]).encode()
    return base64.b64decode(event["data_b64"])


def presence(event: dict[str, Any]) -> dict[str, Any]:
    assert event["type"] == "presence"
    data: dict[str, Any] = orjson.loads(data_of(event))
    return data


async def device(
    server: RunningServer, http: aiohttp.ClientSession, app_id: str, device_id: str = "d1"
) -> RawDevice:
    key = await server.provision(app_id, device_id)
    dev = await connect(http, server.ws_url, app_id, device_id, key)
    await wait_for(lambda: server.relay.hub.get(app_id, device_id) is not None)
    return dev


async def stored(server: RunningServer, last_id: int) -> None:
    """Wait until the server has stored every event up to ``last_id``."""
    events = server.runner.app[EVENTS]
    await wait_for(lambda: events.last_id >= last_id)


async def page(
    http: aiohttp.ClientSession, server: RunningServer, app_id: str, secret: str, query: str = ""
) -> dict[str, Any]:
    url = f"{server.url}/v1/applications/{app_id}/events?format=json{query}"
    async with http.get(url, headers={"Authorization": f"OAuth {secret}"}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await r.json()
        return body


class TestStream:
    async def test_headers_position_and_order(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        stream = await Stream.open(http, server, app_id, secret)
        h = stream.resp.headers
        assert h["Content-Type"] == "text/event-stream"
        assert h["X-Accel-Buffering"] == "no"
        assert h["Cache-Control"] == "no-store"
        dev = await device(server, http, app_id)
        online = await stream.next()
        assert stream.raw.startswith(b"retry: 2000\nid: 0\n\nid: 1\nevent: presence\ndata: {")
        assert online["id"] == 1 and online["device_id"] == "d1"
        blob = bytes(range(256)) * 3
        for n in range(200):
            await dev.emit("temp", b"%d" % n)
        await dev.emit("", blob)
        await dev.emit("température", "21,5 °C".encode())
        got = await stream.take(202)
        assert [e["id"] for e in got] == list(range(2, 204))
        assert [data_of(e) for e in got[:200]] == [b"%d" % n for n in range(200)]
        assert got[200]["type"] == "message"
        assert got[200]["data"] is None and base64.b64decode(got[200]["data_b64"]) == blob
        assert got[201]["type"] == "température" and got[201]["data"] == "21,5 °C"
        assert all(abs(e["ts"] - time.time()) < 10 for e in got)
        assert set(got[0]) == {"id", "device_id", "type", "ts", "data", "data_b64"}
        await dev.close()
        stream.close()

    async def test_event_names_that_would_break_the_framing(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        stream = await Stream.open(http, server, app_id, secret, "?type=a%0Ab%25%0Dc")
        await dev.emit("a\nb%\rc", b"line1\nline2\r\n")
        event = await stream.next()
        assert event["type"] == "a\nb%\rc"
        assert data_of(event) == b"line1\nline2\r\n"
        assert b"\nevent: a%0Ab%25%0Dc\n" in stream.raw
        stream.close()
        await dev.close()

    async def test_cometa_events_are_type_message(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app(allow_open_attach=True)
        stream = await Stream.open(http, server, app_id, secret)
        port = int(server.url.rsplit(":", 1)[1])
        dev = await CometaDevice.attach(port, app_id, "AABBCCDDEEFF")
        online = presence(await stream.next())
        assert online["online"] is True and online["transport"] == "cometa"
        await dev.event(b'{"t":21}')
        await dev.event(b"\x00\x01\xfe")
        first, second = await stream.take(2)
        assert (first["type"], first["data"], first["device_id"]) == (
            "message",
            '{"t":21}',
            "AABBCCDDEEFF",
        )
        assert data_of(second) == b"\x00\x01\xfe"
        dev.close()
        offline = presence(await stream.next())
        assert offline["online"] is False and offline["transport"] == "cometa"
        stream.close()

    async def test_presence_changes_with_reasons(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        stream = await Stream.open(http, server, app_id, secret, "?type=presence")
        dev = await device(server, http, app_id)
        await dev.emit("temp", b"filtered out")
        online = presence(await stream.next())
        assert online["online"] is True and online["reason"] is None
        assert online["transport"] == "native" and online["remote"].startswith("127.0.0.1:")
        assert online["session_id"] == dev.hello.session_id and online["replaced"] is None
        await dev.close()
        offline = presence(await stream.next())
        assert (offline["online"], offline["reason"]) == (False, "peer_closed")
        assert offline["session_id"] == dev.hello.session_id

        dev = await device(server, http, app_id)
        taker = await connect(
            http, server.ws_url, app_id, "d1", await server.provision(app_id, "d1")
        )
        first, second = presence(await stream.next()), presence(await stream.next())
        assert second["online"] is True and second["replaced"] == first["session_id"]
        async with http.delete(
            f"{server.url}/v1/applications/{app_id}/devices/d1",
            headers={"Authorization": f"OAuth {secret}"},
        ) as r:
            assert r.status == 200
        detached = presence(await stream.next())
        assert (detached["online"], detached["reason"]) == (False, "detached")
        assert detached["session_id"] == taker.hello.session_id
        stream.close()

    async def test_resume_with_last_event_id_while_events_flow(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        total = 600

        async def produce() -> None:
            for n in range(total):
                await dev.emit("n", b"%d" % n)
                if n % 20 == 0:
                    await asyncio.sleep(0.005)

        stream = await Stream.open(http, server, app_id, secret, "?type=n")
        producer = asyncio.create_task(produce())
        seen: list[dict[str, Any]] = []
        for _ in range(5):
            seen += await stream.take(60)
            stream.close()  # the client goes away mid-stream...
            await asyncio.sleep(0.02)  # ...while events keep arriving
            stream = await Stream.open(http, server, app_id, secret, "?type=n", seen[-1]["id"])
        seen += await stream.take(total - len(seen))
        await producer
        assert [data_of(e) for e in seen] == [b"%d" % n for n in range(total)]
        ids = [e["id"] for e in seen]
        assert ids == sorted(set(ids))
        await asyncio.sleep(0.05)
        assert not stream.messages and stream.parser.feed(b"") == []
        stream.close()
        await dev.close()

    async def test_resume_point_by_query_and_header(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)  # id 1: online
        for n in range(4):
            await dev.emit("n", b"%d" % n)  # ids 2-5
        await stored(server, 5)
        stream = await Stream.open(http, server, app_id, secret, last_id=0)
        assert [e["id"] for e in await stream.take(5)] == [1, 2, 3, 4, 5]
        assert stream.raw.startswith(b"retry: 2000\n\nid: 1\n")
        stream.close()
        stream = await Stream.open(http, server, app_id, secret, "?last_event_id=3")
        assert (await stream.next())["id"] == 4
        stream.close()
        # EventSource keeps the URL and adds the header on reconnection: the header wins.
        stream = await Stream.open(http, server, app_id, secret, "?last_event_id=1", last_id=4)
        assert (await stream.next())["id"] == 5
        await dev.emit("n", b"live")
        assert data_of(await stream.next()) == b"live"
        stream.close()
        await dev.close()

    async def test_filters_by_device_and_type(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        d1, d2, d3 = [await device(server, http, app_id, f"d{n}") for n in (1, 2, 3)]
        query = "?device=d1&device=d2&type=temp&type=presence"
        stream = await Stream.open(http, server, app_id, secret, query, last_id=0)
        await d1.emit("temp", b"1")
        await d2.emit("door", b"2")
        await d3.emit("temp", b"3")
        await d2.emit("temp", b"4")
        await d3.close()
        await d2.close()
        got = await stream.take(5)
        assert [(e["device_id"], e["type"]) for e in got] == [
            ("d1", "presence"),
            ("d2", "presence"),
            ("d1", "temp"),
            ("d2", "temp"),
            ("d2", "presence"),
        ]
        assert presence(got[-1])["online"] is False
        body = await page(http, server, app_id, secret, "&" + query[1:])
        assert [e["id"] for e in body["events"]] == [e["id"] for e in got]
        stream.close()
        await d1.close()

    async def test_heartbeat_and_a_rotated_secret_ends_the_stream(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        server.runner.app[EVENT_STREAM].heartbeat = 0.05
        app_id, secret = await server.create_app()
        stream = await Stream.open(http, server, app_id, secret)
        admin = await Stream.open(http, server, app_id, ADMIN_TOKEN)
        while b": ping\n\n" not in stream.raw:
            await stream._read(2)
        await server.apps.rotate_secret(app_id)
        assert await stream.until_end(2) == []
        assert stream.ended
        # The admin token is still good: that stream goes on.
        dev = await device(server, http, app_id)
        assert presence(await admin.next())["online"] is True
        admin.close()
        await dev.close()

    async def test_a_busy_stream_also_ends_when_the_secret_changes(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        server.runner.app[EVENT_STREAM].heartbeat = 0.2
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        stream = await Stream.open(http, server, app_id, secret, last_id=0)

        async def chatter() -> None:
            while True:
                await dev.emit("n", b"x")
                await asyncio.sleep(0.01)  # never 0.2 s of silence: no ping is due

        task = asyncio.create_task(chatter())
        try:
            await stream.take(5)
            await server.apps.rotate_secret(app_id)
            got = await stream.until_end(2)
            assert stream.ended and len(got) < 100
            assert b": ping" not in stream.raw
        finally:
            task.cancel()
        await dev.close()


class TestRefusals:
    async def test_auth_and_parameters(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        url = f"{server.url}/v1/applications/{app_id}/events"

        async def status(
            url: str, auth: str | None = f"OAuth {secret}", **headers: str
        ) -> tuple[int, str]:
            if auth:
                headers["Authorization"] = auth
            async with http.get(url, headers=headers) as r:
                body = await r.json()
                return r.status, body["error"]

        assert await status(url, None) == (401, "unauthorized")
        assert await status(url, "Basic abc") == (401, "unauthorized")
        assert await status(url, "OAuth wrong") == (403, "forbidden")
        ghost = f"{server.url}/v1/applications/ffffffffffffffffffff/events"
        assert await status(ghost) == (403, "forbidden")
        assert await status(ghost, f"Bearer {ADMIN_TOKEN}") == (404, "unknown_app")
        bad = {"Last-Event-ID": "abc"}
        assert await status(url, **bad) == (400, "invalid_last_event_id")
        assert await status(url + "?last_event_id=-1") == (400, "invalid_last_event_id")
        huge = {"Last-Event-ID": str(2**63)}
        assert await status(url, **huge) == (400, "invalid_last_event_id")
        assert await status(url + "?format=xml") == (400, "invalid_format")
        assert await status(url + "?format=json&limit=0") == (400, "invalid_limit")
        assert await status(url + "?format=json&limit=1001") == (400, "invalid_limit")
        assert await status(url + "?format=json&after=x") == (400, "invalid_after")
        many = "&".join(f"device=d{n}" for n in range(101))
        assert await status(f"{url}?{many}") == (400, "too_many_filters")
        async with http.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"


class TestJsonPage:
    async def test_pages(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        app_id, secret = await server.create_app()
        assert await page(http, server, app_id, secret) == {
            "events": [],
            "last_id": 0,
            "more": False,
        }
        dev = await device(server, http, app_id)
        for n in range(5):
            await dev.emit("n", b"%d" % n)
        await dev.emit("bin", b"\xff")
        await stored(server, 7)
        first = await page(http, server, app_id, secret, "&limit=4")
        assert [e["id"] for e in first["events"]] == [1, 2, 3, 4]
        assert (first["last_id"], first["more"]) == (4, True)
        rest = await page(http, server, app_id, secret, "&after=4&limit=4")
        assert [e["id"] for e in rest["events"]] == [5, 6, 7]
        assert (rest["last_id"], rest["more"]) == (7, False)
        assert rest["events"][-1]["data_b64"] == "/w=="
        empty = await page(http, server, app_id, secret, "&after=7")
        assert empty == {"events": [], "last_id": 7, "more": False}
        await dev.close()


class TestSlowReaders:
    async def test_a_slow_stream_is_dropped_without_slowing_the_others(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        events = server.runner.app[EVENTS]
        events.settings = replace(events.settings, queue_events=50, queue_bytes=512 * 1024)
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        fast = await Stream.open(http, server, app_id, secret, "?type=big")
        # A client that sends its request and then never reads, with a tiny receive buffer.
        host, port = server.url.removeprefix("http://").split(":")
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(raw, (host, int(port)))
        request = (
            f"GET /v1/applications/{app_id}/events?type=big HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: OAuth {secret}\r\n\r\n"
        )
        await loop.sock_sendall(raw, request.encode())
        await wait_for(lambda: events.subscribers(app_id) == 2)
        drops = REGISTRY.get_sample_value("backchannel_event_streams_dropped_total") or 0.0
        chunk = b"z" * 32 * 1024
        n = 300
        got: list[dict[str, Any]] = []
        for i in range(n):
            await dev.emit("big", b"%05d" % i + chunk)
            if i % 10 == 9:
                got += await fast.take(10)  # the fast reader keeps up
        assert [data_of(e)[:5] for e in got] == [b"%05d" % i for i in range(n)]
        await wait_for(lambda: events.subscribers(app_id) == 1)
        dropped = REGISTRY.get_sample_value("backchannel_event_streams_dropped_total")
        assert dropped == drops + 1
        # The slow client's connection is gone: draining it ends in EOF or a reset.
        raw.setblocking(True)
        raw.settimeout(5)
        try:
            while raw.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        raw.close()
        fast.close()
        await dev.close()


class TestRetention:
    async def test_by_count(self, make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
        server = await make_server(event_retention_count=5)
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        for n in range(8):
            await dev.emit("n", b"%d" % n)
        await stored(server, 9)
        await server.runner.app[EVENTS].trim()
        body = await page(http, server, app_id, secret)
        assert [data_of(e) for e in body["events"]] == [b"%d" % n for n in range(3, 8)]
        await dev.close()

    async def test_by_age(self, make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
        server = await make_server(event_retention_seconds=0.3)
        app_id, secret = await server.create_app()
        dev = await device(server, http, app_id)
        await dev.emit("n", b"old")
        await stored(server, 2)
        await asyncio.sleep(0.4)
        await dev.emit("n", b"new")
        await stored(server, 3)
        await server.runner.app[EVENTS].trim()
        body = await page(http, server, app_id, secret)
        assert [data_of(e) for e in body["events"]] == [b"new"]
        await dev.close()


class TestLifecycle:
    async def test_events_survive_a_restart_with_sqlite(
        self, make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
    ) -> None:
        data_dir = tmp_path / "kept"
        first = await make_server(store="sqlite", data_dir=data_dir)
        app_id, secret = await first.create_app()
        dev = await device(first, http, app_id)
        stream = await Stream.open(http, first, app_id, secret, last_id=0)
        for n in range(50):
            await dev.emit("n", b"%d" % n)
        await dev.emit("bin", bytes(range(256)))
        before = await stream.take(52)
        await first.stop()
        # The stream saw the shutdown's offline record, then its end.
        rest = await stream.until_end()
        assert [presence(e)["reason"] for e in rest] == ["server_shutdown"]
        await dev.ws.close()

        second = await make_server(store="sqlite", data_dir=data_dir)
        stream = await Stream.open(http, second, app_id, secret, last_id=0)
        replayed = await stream.take(53)
        assert replayed == before + rest
        assert data_of(replayed[51]) == bytes(range(256))
        dev = await device(second, http, app_id)
        back = await stream.next()
        assert back["id"] == 54 and presence(back)["online"] is True
        stream.close()
        await dev.close()

    async def test_shutdown_is_not_held_up_by_streams(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        streams = [await Stream.open(http, server, app_id, secret) for _ in range(5)]
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2.0
        for stream in streams:
            assert await stream.until_end() == []
