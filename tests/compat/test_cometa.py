"""Cometa devices over raw TCP on the server's one port (COMPAT.md, Cometa device side)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import orjson
import pytest

from backchannel.sdk import verify_webhook
from tests.compat.cometa_device import CometaDevice, echo
from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.rawdevice import connect
from tests.webhook_receiver import Receiver


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


class App:
    """An application that allows open attach, and shortcuts for its API."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def create(self, **settings: object) -> App:
        settings.setdefault("allow_open_attach", True)
        self.app_id, self.secret = await self.server.create_app(**settings)
        return self

    async def attach(self, device_id: str = "AABBCCDDEEFF", **kw: object) -> CometaDevice:
        return await CometaDevice.attach(port_of(self.server), self.app_id, device_id, **kw)  # type: ignore[arg-type]

    def url(self, path: str = "") -> str:
        return f"{self.server.url}/v1/applications/{self.app_id}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.secret}"}

    async def send(self, device_id: str, body: bytes, query: str = "") -> tuple[int, bytes]:
        async with self.http.post(
            self.url(f"/devices/{device_id}/send{query}"), data=body, headers=self.auth
        ) as r:
            return r.status, await r.read()


@pytest.fixture
async def app(server: RunningServer, http: aiohttp.ClientSession) -> App:
    return await App(server, http).create()


class TestAttach:
    """COMPAT.md, Device side, points 1-2."""

    async def test_first_chunk(self, app: App) -> None:
        dev = await app.attach()
        assert dev.status_line == b"HTTP/1.1 200 OK"
        assert b"\r\ntransfer-encoding: chunked\r\n" in dev.head.lower()
        assert dev.first_chunk.startswith(b'{"msg":"200"')
        assert isinstance(dev.hello["timestamp"], int)
        assert abs(dev.hello["timestamp"] - time.time()) < 10
        assert dev.first_chunk == (
            b'{"msg":"200","heartbeat":60,"timestamp":%d}' % dev.hello["timestamp"]
        )
        await wait_for(lambda: app.server.relay.hub.get(app.app_id, "AABBCCDDEEFF") is not None)

    async def test_content_length_without_space(self, app: App) -> None:
        dev = await app.attach("7", no_space=True)
        assert dev.status_line == b"HTTP/1.1 200 OK"
        dev.serve(echo)
        assert await app.send("7", b"ping") == (200, b"ping")

    async def test_refused_without_open_attach(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        closed = await App(server, http).create(allow_open_attach=False)
        dev = await closed.attach()
        assert dev.status_line == b"HTTP/1.1 403 Forbidden"
        assert await dev.read_body() == b'{"msg":"403 Forbidden"}'  # then EOF: closed
        assert server.relay.hub.get(closed.app_id, "AABBCCDDEEFF") is None

    async def test_allow_list(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        listed = await App(server, http).create(
            allow_open_attach=False, allowed_devices=("001122334455",)
        )
        assert (await listed.attach("001122334455")).status_line == b"HTTP/1.1 200 OK"
        assert (await listed.attach("other")).status_line == b"HTTP/1.1 403 Forbidden"

    async def test_provisioned_device_may_attach_with_its_key(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        keyed = await App(server, http).create(allow_open_attach=False)
        key = await server.provision(keyed.app_id, "k1")
        dev = await keyed.attach("k1", extra_headers=f"Authorization: Bearer {key}\r\n")
        assert dev.status_line == b"HTTP/1.1 200 OK"

    async def test_unknown_app(self, server: RunningServer) -> None:
        dev = await CometaDevice.attach(port_of(server), "f" * 20, "d")
        assert dev.status_line == b"HTTP/1.1 403 Forbidden"

    async def test_http_on_the_same_port_still_works(
        self, app: App, http: aiohttp.ClientSession
    ) -> None:
        (await app.attach()).serve(echo)
        async with http.get(app.server.url + "/healthz") as r:
            assert r.status == 200


class TestMessages:
    """COMPAT.md, Device side, points 3-4."""

    async def test_round_trip_binary(self, app: App) -> None:
        dev = (await app.attach()).serve(echo)
        body = bytes(range(1, 256)) * 4
        assert await app.send("AABBCCDDEEFF", body) == (200, body)
        assert dev.received == [body]

    @pytest.mark.parametrize("framing", ["python", "c"])
    async def test_empty_reply_framings(self, app: App, framing: str) -> None:
        dev = await app.attach()

        async def empty(message: bytes) -> None:
            await dev.reply(b"", framing)

        dev.serve(empty)
        assert await app.send("AABBCCDDEEFF", b"x") == (200, b"")
        # The connection stays in sync: the next call works too.
        assert await app.send("AABBCCDDEEFF", b"y") == (200, b"")

    async def test_heartbeats_and_presence(self, app: App) -> None:
        dev = (await app.attach(platform=b"Linux-device")).serve(echo)
        await dev.heartbeat()
        await app.send("AABBCCDDEEFF", b"abc")
        async with app.http.get(app.url("/devices/AABBCCDDEEFF"), headers=app.auth) as r:
            p = await r.json()
        assert p["transport"] == "cometa"
        assert p["info"] == "Linux-device"
        assert p["ip_address"].startswith("127.0.0.1:")
        assert abs(p["heartbeat"] - time.time()) < 10
        assert p["net"]["sent"]["messages"] == 1
        assert p["net"]["received"]["messages"] == 2  # the heartbeat and the reply
        assert p["latency"] > 0

    async def test_presence_is_fresh_before_the_first_heartbeat(self, app: App) -> None:
        (await app.attach()).serve(echo)
        assert await app.send("AABBCCDDEEFF", b"x") == (200, b"x")
        async with app.http.get(app.url("/devices/AABBCCDDEEFF"), headers=app.auth) as r:
            p = await r.json()
        assert abs(p["heartbeat"] - time.time()) < 10  # attach time, not 0
        assert abs(p["last_seen"] - time.time()) < 10

    async def test_events_are_counted(self, app: App) -> None:
        dev = (await app.attach()).serve(echo)
        await dev.event(b'{"t":21}')
        session = app.server.relay.hub.get(app.app_id, "AABBCCDDEEFF")
        assert session is not None
        await wait_for(lambda: session.stats.events == 1)

    async def test_empty_message_is_refused(self, app: App) -> None:
        (await app.attach()).serve(echo)
        status, body = await app.send("AABBCCDDEEFF", b"")
        assert status == 400
        assert orjson.loads(body)["error"] == "invalid_message"


class TestEvents:
    """Upstream events (0x07) reach the webhook and the app WebSockets."""

    async def test_event_reaches_webhook_and_app_websockets(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app = await App(server, http).create(webhook_url=receiver.url)
        dev = (await app.attach("sensor-1")).serve(echo)
        sockets = []
        for prefix in ("", "/v1"):
            async with http.get(app.url("/devices/sensor-1/websocket"), headers=app.auth) as r:
                key = (await r.json())["device_key"]
            ws_url = f"{server.url.replace('http', 'ws')}{prefix}/websockets/sensor-1/{key}"
            sockets.append(await http.ws_connect(ws_url))
        data = b'{"t":21,"raw":"\x00"}' + bytes(range(256))
        await dev.event(data)
        for ws in sockets:
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, data)
        await wait_for(lambda: len(receiver.hits) == 1)
        hit = receiver.hits[0]
        assert hit.body == data
        h = hit.headers
        assert (h["X-Backchannel-App"], h["X-Backchannel-Device"]) == (app.app_id, "sensor-1")
        assert verify_webhook(
            app.secret, hit.body, h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
        )
        # The socket still works as a send channel while events flow.
        await sockets[0].send_bytes(b"ping")
        msg = await sockets[0].receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"ping")
        for ws in sockets:
            await ws.close()

    async def test_events_keep_their_order(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app = await App(server, http).create(webhook_url=receiver.url)
        dev = (await app.attach("sensor-2")).serve(echo)
        for n in range(20):
            await dev.event(b"%d" % n)
        await wait_for(lambda: len(receiver.hits) == 20)
        assert [h.body for h in receiver.hits] == [b"%d" % n for n in range(20)]


class TestQueue:
    """One request at a time per Cometa device, queued instead of 423."""

    async def test_concurrent_sends_are_delivered_one_by_one(self, app: App) -> None:
        dev = await app.attach()
        in_progress = 0
        peak = 0

        async def slow_echo(message: bytes) -> bytes:
            nonlocal in_progress, peak
            in_progress += 1
            peak = max(peak, in_progress)
            await asyncio.sleep(0.02)
            in_progress -= 1
            return b"re:" + message

        dev.serve(slow_echo)
        bodies = [f"m{i}".encode() for i in range(20)]
        results = await asyncio.gather(*(app.send("AABBCCDDEEFF", b) for b in bodies))
        assert results == [(200, b"re:" + b) for b in bodies]
        assert sorted(dev.received) == sorted(bodies)
        assert peak == 1

    async def test_late_reply_never_reaches_the_next_request(self, app: App) -> None:
        dev = await app.attach()

        async def late_for_a(message: bytes) -> bytes:
            if message == b"A":
                await asyncio.sleep(0.6)
            return b"reply-" + message

        dev.serve(late_for_a)
        a = asyncio.ensure_future(app.send("AABBCCDDEEFF", b"A", "?timeout=0.3"))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(app.send("AABBCCDDEEFF", b"B", "?timeout=5"))
        status_a, body_a = await a
        assert status_a == 408
        assert orjson.loads(body_a)["error"] == "timeout_no_reply"
        assert await b == (200, b"reply-B")

    async def test_reply_later_than_the_grace_never_reaches_the_next_request(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(cometa_stale_grace=0.4)
        app = await App(server, http).create()
        dev = await app.attach()

        async def very_late_for_a(message: bytes) -> bytes:
            if message == b"A":
                await asyncio.sleep(1.2)  # after A's timeout plus the grace
            return b"reply-" + message

        dev.serve(very_late_for_a)
        a = asyncio.ensure_future(app.send("AABBCCDDEEFF", b"A", "?timeout=0.3"))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(app.send("AABBCCDDEEFF", b"B", "?timeout=5"))
        status_a, body_a = await a
        assert (status_a, orjson.loads(body_a)["error"]) == (408, "timeout_no_reply")
        # The device still owes A's reply when the grace ends: the session is closed
        # rather than risking A's reply being taken for B's. B was never sent.
        status_b, body_b = await b
        assert status_b == 418
        assert orjson.loads(body_b)["error"] == "device_offline"
        assert "nothing was sent" in orjson.loads(body_b)["detail"]
        await dev.wait_closed()
        assert dev.received == [b"A"]
        # The device reconnects and works normally.
        again = (await app.attach()).serve(echo)
        assert await app.send("AABBCCDDEEFF", b"C") == (200, b"C")
        again.close()

    async def test_queued_call_times_out_before_delivery(self, app: App) -> None:
        dev = await app.attach()

        async def stall(message: bytes) -> bytes:
            await asyncio.sleep(1.0)
            return message

        dev.serve(stall)
        first = asyncio.ensure_future(app.send("AABBCCDDEEFF", b"1", "?timeout=3"))
        await asyncio.sleep(0.05)
        status, body = await app.send("AABBCCDDEEFF", b"2", "?timeout=0.2")
        assert status == 408
        assert orjson.loads(body)["error"] == "timeout_before_delivery"
        assert await first == (200, b"1")
        assert dev.received == [b"1"]


class TestSessions:
    """Liveness, takeover, detach, mixing with native devices, garbage."""

    async def test_liveness_drop(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(cometa_liveness=0.5)
        app = await App(server, http).create()
        dev = await app.attach()
        await wait_for(lambda: server.relay.hub.get(app.app_id, "AABBCCDDEEFF") is not None)
        await dev.wait_closed(timeout=5)
        assert server.relay.hub.get(app.app_id, "AABBCCDDEEFF") is None

    async def test_heartbeats_keep_it_alive(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(cometa_liveness=0.5)
        app = await App(server, http).create()
        dev = await app.attach()
        for _ in range(8):
            await asyncio.sleep(0.15)
            await dev.heartbeat()
        assert server.relay.hub.get(app.app_id, "AABBCCDDEEFF") is not None

    async def test_takeover(self, app: App) -> None:
        old = (await app.attach(platform=b"old")).serve(echo)
        new = await app.attach(platform=b"new")

        async def tag(message: bytes) -> bytes:
            return b"new:" + message

        new.serve(tag)
        await old.wait_closed()
        assert await app.send("AABBCCDDEEFF", b"x") == (200, b"new:x")

    async def test_detach(self, app: App) -> None:
        dev = (await app.attach()).serve(echo)
        async with app.http.delete(app.url("/devices/AABBCCDDEEFF"), headers=app.auth) as r:
            assert (r.status, await r.json()) == (200, {"msg": "200 OK"})
        await dev.wait_closed()
        assert (await app.send("AABBCCDDEEFF", b"x"))[0] == 418

    async def test_cometa_and_native_in_one_app(self, app: App) -> None:
        (await app.attach("cometa-1")).serve(echo)
        key = await app.server.provision(app.app_id, "native-1")
        (await connect(app.http, app.server.ws_url, app.app_id, "native-1", key)).serve()
        async with app.http.get(app.url("/devices"), headers=app.auth) as r:
            assert await r.json() == {"num_devices": 2, "devices": ["cometa-1", "native-1"]}
        assert await app.send("cometa-1", b"c") == (200, b"c")
        assert await app.send("native-1", b"n") == (200, b"n")

    async def test_garbage_after_attach_closes_only_that_device(self, app: App) -> None:
        good = (await app.attach("good")).serve(echo)
        bad = await app.attach("bad")
        bad.writer.write(b"this is not a chunk size\r\n")
        await bad.writer.drain()
        await bad.wait_closed()
        assert await app.send("good", b"still fine") == (200, b"still fine")
        assert not good.closed.is_set()
        await wait_for(lambda: app.server.relay.hub.get(app.app_id, "bad") is None)

    async def test_disconnect_mid_call(self, app: App) -> None:
        dev = await app.attach()

        async def hang_up(message: bytes) -> None:
            dev.close()

        dev.serve(hang_up)
        status, body = await app.send("AABBCCDDEEFF", b"x")
        assert status == 502
        assert json.loads(body)["error"] == "device_disconnected"


class TestOfflineQueue:
    """Queued messages and fan-out reach Cometa devices like native ones."""

    async def test_queued_messages_are_delivered_on_attach_in_order(self, app: App) -> None:
        ids = []
        for n in range(5):
            status, raw = await app.send("AABBCCDDEEFF", b"m%d" % n, "?offline=queue")
            assert status == 202
            ids.append(orjson.loads(raw)["message_id"])
        got: list[bytes] = []

        async def record(body: bytes) -> bytes:
            got.append(body)
            return b"ack:" + body

        (await app.attach()).serve(record)
        deadline = time.monotonic() + 5
        while True:
            async with app.http.get(app.url(f"/messages/{ids[-1]}"), headers=app.auth) as r:
                last = orjson.loads(await r.read())
            if last["state"] == "replied":
                break
            assert time.monotonic() < deadline, last
            await asyncio.sleep(0.02)
        assert got == [b"m%d" % n for n in range(5)]
        assert last["reply"] == "ack:m4"

    async def test_fanout_by_tag_reaches_a_provisioned_cometa_device(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app = await App(server, http).create(allow_open_attach=False)
        _, key = await server.apps.provision(app.app_id, "C0FFEE", ("kitchen",))
        auth = f"Authorization: Bearer {key}\r\n"
        (await app.attach("C0FFEE", extra_headers=auth)).serve(echo)
        await wait_for(lambda: server.relay.hub.get(app.app_id, "C0FFEE") is not None)
        async with http.post(
            app.url("/fanout"), json={"tag": "kitchen", "message": "hi"}, headers=app.auth
        ) as r:
            assert r.status == 200
            result = await r.json()
        assert [(x["device"], x["status"], x["reply"]) for x in result["results"]] == [
            ("C0FFEE", "replied", "hi")
        ]
