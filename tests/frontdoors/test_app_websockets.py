"""Cometa app WebSockets over real sockets (COMPAT.md, "App WebSockets")."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson
import pytest

from backchannel.frontdoors.app_websockets import WebSocketKeys
from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer, wait_for
from tests.rawdevice import RawDevice, connect


class Setup:
    """An app, its devices, and shortcuts for keys and sockets."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def start(self, device_id: str = "dev1", **app_settings: Any) -> RawDevice:
        self.app_id, self.secret = await self.server.create_app(**app_settings)
        return await self.device(device_id)

    async def device(self, device_id: str) -> RawDevice:
        key = await self.server.provision(self.app_id, device_id)
        dev = await connect(self.http, self.server.ws_url, self.app_id, device_id, key)
        # HELLO can arrive before the relay has registered the session.
        await wait_for(lambda: self.server.relay.hub.get(self.app_id, device_id) is not None)
        return dev

    def api(self, path: str) -> str:
        return f"{self.server.url}/v1/applications/{self.app_id}{path}"

    async def get(self, path: str, secret: str | None = None) -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"OAuth {secret or self.secret}"}
        async with self.http.get(self.api(path), headers=headers) as r:
            return r.status, orjson.loads(await r.read())

    async def key(self, device_id: str = "dev1") -> str:
        status, body = await self.get(f"/devices/{device_id}/websocket")
        assert status == 200, body
        return str(body["device_key"])

    def socket_url(self, device_id: str, key: str, prefix: str = "") -> str:
        return f"{self.server.url.replace('http', 'ws')}{prefix}/websockets/{device_id}/{key}"

    async def open(
        self, device_id: str = "dev1", prefix: str = ""
    ) -> aiohttp.ClientWebSocketResponse:
        key = await self.key(device_id)
        return await self.http.ws_connect(self.socket_url(device_id, key, prefix))

    async def websockets(self, device_id: str = "dev1") -> tuple[object, object]:
        """(presence ``websockets``, app info ``stats.websockets``)."""
        _, presence = await self.get(f"/devices/{device_id}")
        _, info = await self.get("")
        stats = info["stats"]
        assert isinstance(stats, dict)
        return presence["websockets"], stats["websockets"]


@pytest.fixture
async def setup(server: RunningServer, http: aiohttp.ClientSession) -> Setup:
    return Setup(server, http)


async def receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await ws.receive(timeout=5)


class TestKeys:
    """GET .../devices/{id}/websocket issues one-time keys."""

    async def test_shape(self, setup: Setup) -> None:
        dev = await setup.start()  # held: a collected client socket would disconnect it
        async with setup.http.get(
            setup.api("/devices/dev1/websocket"), headers={"Authorization": f"OAuth {setup.secret}"}
        ) as r:
            assert r.status == 200
            assert r.headers["Cache-Control"] == "no-store"
            body = orjson.loads(await r.read())
        assert body["device_id"] == "dev1"
        assert re.fullmatch(r"[0-9a-f]{40}", body["device_key"])
        assert body["device_key"] != await setup.key()
        await dev.close()

    async def test_offline_is_418(self, setup: Setup) -> None:
        await setup.start()
        status, body = await setup.get("/devices/nobody/websocket")
        assert status == 418
        assert body["msg"] == "418 Device not attached"
        assert body["error"] == "device_offline"

    async def test_other_apps_secret_is_403(self, setup: Setup) -> None:
        await setup.start()
        _, other_secret = await setup.server.create_app("other")
        status, body = await setup.get("/devices/dev1/websocket", secret=other_secret)
        assert status == 403
        assert body["error"] == "forbidden"

    def test_expiry_and_device_binding(self) -> None:
        class Clock:
            now = 100.0

            def monotonic(self) -> float:
                return self.now

            def time(self) -> float:
                return self.now

        clock = Clock()
        keys = WebSocketKeys(clock, ttl=60, max_keys=3)
        fresh = keys.issue("app", "dev")
        assert keys.take(fresh, "dev") == "app"
        assert keys.take(fresh, "dev") is None  # single use
        other = keys.issue("app", "dev")
        assert keys.take(other, "another-device") is None
        assert keys.take(other, "dev") is None  # spent by the wrong device too
        stale = keys.issue("app", "dev")
        clock.now += 60
        assert keys.take(stale, "dev") is None
        for _ in range(5):
            keys.issue("app", "dev")
        assert len(keys) == 3  # bounded: the oldest go first


class TestConnect:
    """ws://host/websockets/{device_id}/{key} and /v1/websockets/..."""

    async def test_key_is_single_use_and_wrong_key_is_403(self, setup: Setup) -> None:
        (await setup.start()).serve()
        key = await setup.key()
        ws = await setup.http.ws_connect(setup.socket_url("dev1", key))
        await ws.close()
        for bad in (key, "0" * 40):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await setup.http.ws_connect(setup.socket_url("dev1", bad))
            assert info.value.status == 403
        async with setup.http.get(setup.socket_url("dev1", key).replace("ws", "http", 1)) as r:
            assert r.status == 400  # a plain GET is refused before the key is looked at
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
        headers["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
        url = setup.socket_url("dev1", "f" * 40).replace("ws", "http", 1)
        async with setup.http.get(url, headers=headers) as r:
            assert r.status == 403
            body = orjson.loads(await r.read())
        assert body["error"] == "invalid_websocket_key"
        assert body["msg"] == "403 Forbidden"

    async def test_key_for_another_device_is_403(self, setup: Setup) -> None:
        devices = [await setup.start(), await setup.device("dev2")]
        key = await setup.key("dev1")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await setup.http.ws_connect(setup.socket_url("dev2", key))
        assert info.value.status == 403
        for dev in devices:
            await dev.close()

    @pytest.mark.parametrize("prefix", ["", "/v1"])
    async def test_text_round_trip(self, setup: Setup, prefix: str) -> None:
        (await setup.start()).serve()
        ws = await setup.open(prefix=prefix)
        await ws.send_str('{"jsonrpc":"2.0","method":"ping","id":1}')
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.TEXT
        assert msg.data == '{"jsonrpc":"2.0","method":"ping","id":1}'
        await ws.close()

    async def test_binary_round_trip_and_order(self, setup: Setup) -> None:
        (await setup.start()).serve()
        ws = await setup.open()
        bodies = [bytes([i]) * (i * 1000 + 1) + b"\xff" for i in range(10)]
        for body in bodies:
            await ws.send_bytes(body)
        for body in bodies:
            msg = await receive(ws)
            assert msg.type is aiohttp.WSMsgType.BINARY
            assert msg.data == body
        await ws.close()

    async def test_text_request_with_binary_reply(self, setup: Setup) -> None:
        async def not_utf8(call: Call) -> bytes:
            return b"\xff\xfe" + call.body

        (await setup.start()).serve(not_utf8)
        ws = await setup.open()
        await ws.send_str("x")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\xff\xfex")
        await ws.close()

    async def test_device_error_comes_back_as_error_frame(self, setup: Setup) -> None:
        dev = await setup.start()

        async def failing(call: Call) -> None:
            await dev.error_reply(call.call_id, "sensor on fire")

        dev.serve(failing)
        ws = await setup.open()
        await ws.send_bytes(b"x")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.TEXT
        body = orjson.loads(msg.data)
        assert body["msg"] == "502 Bad Gateway"
        assert body["error"] == "device_error"
        assert "sensor on fire" in body["detail"]
        await ws.close()

    async def test_timeout_uses_the_app_default(self, setup: Setup) -> None:
        async def silent(call: Call) -> None:
            return None

        (await setup.start(default_timeout=0.3)).serve(silent)
        ws = await setup.open()
        await ws.send_str("hello")
        msg = await receive(ws)
        body = orjson.loads(msg.data)
        assert body["msg"] == "408 Request Time-out"
        assert body["error"] == "timeout_no_reply"
        assert body["timeout"] == 0.3
        await ws.close()


class TestEvents:
    """Upstream events reach every open socket of the device."""

    async def test_broadcast_to_two_sockets(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        other = (await setup.device("dev2")).serve()
        first, second = await setup.open(), await setup.open()
        bystander = await setup.open("dev2")
        await dev.emit("temperature", b"\x00\x01raw")
        for ws in (first, second):
            msg = await receive(ws)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01raw")
        await other.emit("", b"for dev2 only")
        msg = await receive(bystander)
        assert msg.data == b"for dev2 only"
        with pytest.raises(asyncio.TimeoutError):
            await first.receive(timeout=0.2)
        for ws in (first, second, bystander):
            await ws.close()

    async def test_device_disconnect_closes_sockets(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        sockets = [await setup.open(), await setup.open()]
        await dev.emit("last", b"bye")
        await dev.close()
        for ws in sockets:
            msg = await receive(ws)
            assert msg.data == b"bye"  # events queued before the disconnect still arrive
            msg = await receive(ws)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1001
            assert msg.extra == "device disconnected"

    async def test_slow_socket_is_dropped_without_blocking_the_device(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        slow = await setup.http.ws_connect(
            setup.socket_url("dev1", await setup.key()), max_msg_size=0
        )
        fast = await setup.open()
        chunk = b"e" * (256 * 1024)
        count = setup.server.relay.websocket_counter
        assert count is not None
        # ``slow`` never reads: kernel buffers fill, then the server's, then it is dropped.
        for _ in range(200):
            await dev.emit("burst", chunk)
            msg = await receive(fast)
            assert len(msg.data) == len(chunk)
            if count(setup.app_id, "dev1") == 1:
                break
        assert count(setup.app_id, "dev1") == 1
        await dev.emit("after", b"still flowing")
        assert (await receive(fast)).data == b"still flowing"
        codes = set()
        while True:
            msg = await receive(slow)
            if msg.type is not aiohttp.WSMsgType.BINARY:
                codes.add(slow.close_code)
                break
        assert codes == {1013}
        await fast.close()


class TestCounters:
    """Presence ``websockets`` and the app info ``stats.websockets``."""

    async def test_counts_follow_open_sockets(self, setup: Setup) -> None:
        (await setup.start()).serve()
        assert await setup.websockets() == (0, "0")
        first, second = await setup.open(), await setup.open(prefix="/v1")
        assert await setup.websockets() == (2, "2")
        await first.close()
        count = setup.server.relay.websocket_counter
        assert count is not None
        await wait_for(lambda: count(setup.app_id, "dev1") == 1)
        assert await setup.websockets() == (1, "1")
        await second.close()
        await wait_for(lambda: count(setup.app_id, "dev1") == 0)
        assert await setup.websockets() == (0, "0")


class TestShutdown:
    """A stopping server closes app sockets and refuses new ones."""

    async def test_stop_closes_sockets(self, setup: Setup) -> None:
        (await setup.start()).serve()
        ws = await setup.open()
        key = await setup.key()
        setup.server.relay.closing = True
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await setup.http.ws_connect(setup.socket_url("dev1", key))
        assert info.value.status == 503
        setup.server.relay.closing = False
        await asyncio.wait_for(setup.server.stop(), 10)
        msg = await receive(ws)
        # The close frame was sent before the server stopped; the client's answer is not read.
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
