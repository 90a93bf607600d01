"""The Cometa-shaped application API over real sockets (COMPAT.md, application side)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer, ServerFactory
from tests.rawdevice import RawDevice, connect


class Setup:
    """An app with one connected echo device."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def start(self, device_id: str = "dev1", **app_settings: object) -> RawDevice:
        self.app_id, self.secret = await self.server.create_app(**app_settings)
        return await self.device(device_id)

    async def device(self, device_id: str) -> RawDevice:
        key = await self.server.provision(self.app_id, device_id)
        return await connect(self.http, self.server.ws_url, self.app_id, device_id, key)

    def url(self, path: str = "") -> str:
        return f"{self.server.url}/v1/applications/{self.app_id}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.secret}"}

    async def send(
        self, device_id: str, body: bytes, query: str = "", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        async with self.http.post(
            self.url(f"/devices/{device_id}/send{query}"), data=body, headers=headers or self.auth
        ) as r:
            return r.status, await r.read(), r


@pytest.fixture
async def setup(server: RunningServer, http: aiohttp.ClientSession) -> Setup:
    return Setup(server, http)


class TestSend:
    """POST .../devices/{id}/send relays raw bytes both ways."""

    async def test_round_trip_binary(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        body = bytes(range(256)) * 40
        status, reply, resp = await setup.send("dev1", body)
        assert status == 200
        assert reply == body
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["X-Backchannel-Timeout"] == "30"
        await dev.close()

    async def test_empty_body_and_reply(self, setup: Setup) -> None:
        async def empty(call: Call) -> bytes:
            return b""

        (await setup.start()).serve(empty)
        status, reply, _ = await setup.send("dev1", b"")
        assert (status, reply) == (200, b"")

    async def test_method_reaches_device(self, setup: Setup) -> None:
        async def method(call: Call) -> bytes:
            return call.method.encode()

        (await setup.start()).serve(method)
        status, reply, _ = await setup.send("dev1", b"x", "?method=reboot")
        assert (status, reply) == (200, b"reboot")

    async def test_offline_is_418(self, setup: Setup) -> None:
        await setup.start()
        status, body, _ = await setup.send("nobody", b"x")
        assert status == 418
        assert orjson.loads(body) == {
            "msg": "418 Device not attached",
            "error": "device_offline",
            "detail": "device nobody is not connected",
        }

    async def test_no_reply_is_408_and_device_gets_cancel(self, setup: Setup) -> None:
        async def silent(call: Call) -> None:
            return None

        dev = (await setup.start()).serve(silent)
        started = time.monotonic()
        status, body, resp = await setup.send("dev1", b"x", "?timeout=0.3")
        assert 0.25 < time.monotonic() - started < 2
        assert status == 408
        data = orjson.loads(body)
        assert data["msg"] == "408 Request Time-out"
        assert data["error"] == "timeout_no_reply"
        assert data["timeout"] == 0.3
        assert resp.headers["X-Backchannel-Timeout"] == "0.3"
        await asyncio.sleep(0.1)
        assert len(dev.cancelled) == 1

    async def test_device_error_is_502(self, setup: Setup) -> None:
        dev = await setup.start()

        async def failing(call: Call) -> None:
            await dev.error_reply(call.call_id, "sensor on fire")

        dev.serve(failing)
        status, body, _ = await setup.send("dev1", b"x")
        assert status == 502
        data = orjson.loads(body)
        assert data["error"] == "device_error"
        assert data["detail"] == "sensor on fire"

    async def test_disconnect_mid_call_is_502(self, setup: Setup) -> None:
        dev = await setup.start()

        async def hang_up(call: Call) -> None:
            await dev.ws.close()

        dev.serve(hang_up)
        status, body, _ = await setup.send("dev1", b"x", "?timeout=5")
        assert status == 502
        assert orjson.loads(body)["error"] == "device_disconnected"

    async def test_late_reply_is_dropped(self, setup: Setup) -> None:
        async def slow(call: Call) -> bytes:
            await asyncio.sleep(0.4 if call.body == b"slow" else 0)
            return call.body

        (await setup.start()).serve(slow)
        status, _, _ = await setup.send("dev1", b"slow", "?timeout=0.2")
        assert status == 408
        await asyncio.sleep(0.3)
        status, reply, _ = await setup.send("dev1", b"fast")
        assert (status, reply) == (200, b"fast")

    async def test_timeout_before_delivery(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        """A device that stops reading: the write cannot complete before the deadline."""
        big = 48 * 1024 * 1024
        setup = Setup(await make_server(max_body_size=big + 1024), http)
        dev = await setup.start()
        transport = dev.ws._conn.transport if dev.ws._conn else None  # type: ignore[attr-defined]
        assert transport is not None
        transport.pause_reading()  # the device stops reading its socket
        status, body, _ = await setup.send("dev1", b"\0" * big, "?timeout=0.5")
        assert status == 408
        assert orjson.loads(body)["error"] == "timeout_before_delivery"
        transport.resume_reading()


class TestTimeouts:
    """Per call, then the app's default, then the server's, capped by the maximum."""

    async def _timeout_in_force(self, setup: Setup, query: str = "") -> str:
        _, _, resp = await setup.send("dev1", b"x", query)
        return resp.headers["X-Backchannel-Timeout"]

    async def test_layers(self, make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
        server = await make_server(default_timeout=7, max_timeout=20)
        setup = Setup(server, http)
        (await setup.start()).serve()
        assert await self._timeout_in_force(setup) == "7"
        assert await self._timeout_in_force(setup, "?timeout=3.5") == "3.5"
        assert await self._timeout_in_force(setup, "?timeout=99") == "20"
        setup2 = Setup(server, http)
        (await setup2.start(default_timeout=12.0)).serve()
        assert await self._timeout_in_force(setup2) == "12"
        assert await self._timeout_in_force(setup2, "?timeout=1") == "1"
        setup3 = Setup(server, http)
        (await setup3.start(default_timeout=60.0)).serve()
        assert await self._timeout_in_force(setup3) == "20"

    async def test_app_default_is_enforced(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        setup = Setup(server, http)

        async def silent(call: Call) -> None:
            return None

        (await setup.start(default_timeout=0.3)).serve(silent)
        started = time.monotonic()
        status, _, _ = await setup.send("dev1", b"x")
        assert status == 408
        assert time.monotonic() - started < 2

    async def test_server_max_is_enforced(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        setup = Setup(await make_server(default_timeout=0.2, max_timeout=0.3), http)

        async def silent(call: Call) -> None:
            return None

        (await setup.start()).serve(silent)
        started = time.monotonic()
        status, body, _ = await setup.send("dev1", b"x", "?timeout=100")
        assert status == 408
        assert orjson.loads(body)["timeout"] == 0.3
        assert time.monotonic() - started < 2

    @pytest.mark.parametrize("bad", ["abc", "0", "-1", "nan", "inf", ""])
    async def test_invalid_timeout_is_400(self, setup: Setup, bad: str) -> None:
        (await setup.start()).serve()
        status, body, _ = await setup.send("dev1", b"x", f"?timeout={bad}")
        assert status == 400
        assert orjson.loads(body)["error"] == "invalid_timeout"


class TestAuthAndIsolation:
    """OAuth and Bearer credentials; no app reaches another app's devices."""

    async def test_missing_and_malformed_authorization(self, setup: Setup) -> None:
        (await setup.start()).serve()
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "OAuth "}):
            status, body, _ = await setup.send("dev1", b"x", headers=headers or {"X": "y"})
            assert status == 401, headers
            assert orjson.loads(body)["error"] == "unauthorized"

    async def test_wrong_secret_is_403(self, setup: Setup) -> None:
        (await setup.start()).serve()
        status, body, _ = await setup.send("dev1", b"x", headers={"Authorization": "OAuth nope"})
        assert status == 403
        assert orjson.loads(body) == {
            "msg": "403 Forbidden",
            "error": "forbidden",
            "detail": "the credential does not grant access to this application",
        }

    async def test_bearer_secret_and_admin_token(self, setup: Setup) -> None:
        (await setup.start()).serve()
        for token in (setup.secret, setup.server.admin_token):
            status, reply, _ = await setup.send(
                "dev1", b"hi", headers={"Authorization": f"Bearer {token}"}
            )
            assert (status, reply) == (200, b"hi")

    async def test_other_apps_secret_never_reaches_device(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        a, b = Setup(server, http), Setup(server, http)

        async def tag_a(call: Call) -> bytes:
            return b"A"

        async def tag_b(call: Call) -> bytes:
            return b"B"

        (await a.start("shared-id")).serve(tag_a)
        (await b.start("shared-id")).serve(tag_b)
        # Same device id in two apps: each app reaches only its own device.
        assert (await a.send("shared-id", b"x"))[:2] == (200, b"A")
        assert (await b.send("shared-id", b"x"))[:2] == (200, b"B")
        # B's secret on A's routes is refused for every route.
        cross = {"Authorization": f"OAuth {b.secret}"}
        assert (await a.send("shared-id", b"x", headers=cross))[0] == 403
        for method, path in (
            ("GET", "/devices/shared-id"),
            ("DELETE", "/devices/shared-id"),
            ("GET", "/devices"),
            ("GET", ""),
            ("GET", "/devices/shared-id/websocket"),
        ):
            async with http.request(method, a.url(path), headers=cross) as r:
                assert r.status in (403, 404), (method, path)
                if r.status == 403:
                    assert (await r.json())["error"] == "forbidden"
        assert (await a.send("shared-id", b"x"))[:2] == (200, b"A")

    async def test_device_key_of_other_app_is_refused(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        a, b = Setup(server, http), Setup(server, http)
        await a.start("d")
        b.app_id, b.secret = await server.create_app()
        key_a = await server.provision(a.app_id, "d")
        with pytest.raises(ConnectionError, match="4001"):
            await connect(http, server.ws_url, b.app_id, "d", key_a)

    async def test_unknown_app_with_admin_token_is_404(self, setup: Setup) -> None:
        await setup.start()
        headers = {"Authorization": f"Bearer {setup.server.admin_token}"}
        async with setup.http.get(
            f"{setup.server.url}/v1/applications/0000/devices", headers=headers
        ) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "unknown_app"


class TestDevicesRoutes:
    """Presence, list, detach and app info with Cometa's shapes."""

    async def test_presence_object(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        await setup.send("dev1", b"hello")
        async with setup.http.get(setup.url("/devices/dev1"), headers=setup.auth) as r:
            assert r.status == 200
            p = await r.json()
        assert p["device_id"] == "dev1"
        assert p["ip_address"].startswith("127.0.0.1:")
        assert abs(p["connected_at"] - time.time()) < 10
        assert abs(p["heartbeat"] - time.time()) < 10
        assert isinstance(p["latency"], int | float)
        assert p["net"]["sent"]["messages"] >= 1
        assert p["net"]["received"]["messages"] >= 1
        assert p["net"]["received"]["bytes"] >= len(b"hello")
        assert p["online"] is True
        assert p["transport"] == "native"
        assert p["session_id"] == dev.hello.session_id
        assert {"info", "websockets"} <= set(p)

    async def test_presence_offline_is_418(self, setup: Setup) -> None:
        await setup.start()
        async with setup.http.get(setup.url("/devices/ghost"), headers=setup.auth) as r:
            assert r.status == 418
            assert (await r.json())["msg"] == "418 Device not attached"

    async def test_list_and_info(self, setup: Setup) -> None:
        (await setup.start("b")).serve()
        (await setup.device("a")).serve()
        async with setup.http.get(setup.url("/devices"), headers=setup.auth) as r:
            assert await r.json() == {"num_devices": 2, "devices": ["a", "b"]}
        await setup.send("a", b"1234")
        async with setup.http.get(setup.url(), headers=setup.auth) as r:
            info = await r.json()
        assert info["app_id"] == setup.app_id
        assert info["app_name"] == "test-app"
        stats = info["stats"]
        assert set(stats) == {
            "num_devices",
            "messages",
            "errors",
            "bytes_up",
            "bytes_down",
            "latency",
            "latency_min",
            "latency_max",
            "std_deviation",
            "websockets",
        }
        assert all(isinstance(v, str) for v in stats.values())
        assert stats["num_devices"] == "2"
        assert stats["messages"] == "1"
        assert stats["bytes_down"] == "4"

    async def test_detach(self, setup: Setup) -> None:
        dev = (await setup.start()).serve()
        async with setup.http.delete(setup.url("/devices/dev1"), headers=setup.auth) as r:
            assert r.status == 200
            assert await r.json() == {"msg": "200 OK"}
        assert await dev.wait_closed() == 4003
        async with setup.http.delete(setup.url("/devices/dev1"), headers=setup.auth) as r:
            assert r.status == 418
        assert (await setup.send("dev1", b"x"))[0] == 418


class TestBadInput:
    """Unknown routes, wrong methods and oversized bodies get JSON errors."""

    async def test_unknown_route(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        async with http.get(server.url + "/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "not_found"

    async def test_wrong_method(self, setup: Setup) -> None:
        await setup.start()
        async with setup.http.put(setup.url("/devices/dev1/send"), headers=setup.auth) as r:
            assert r.status == 405
            body = await r.json()
            assert body["error"] == "method_not_allowed"
            assert "POST" in r.headers["Allow"]

    async def test_body_over_limit_is_413(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        setup = Setup(await make_server(max_body_size=4096), http)
        (await setup.start()).serve()
        status, body, _ = await setup.send("dev1", b"x" * 4097)
        assert status == 413
        data = orjson.loads(body)
        assert data["error"] == "body_too_large"
        assert data["limit"] == 4096
        assert (await setup.send("dev1", b"x" * 4096))[:2] == (200, b"x" * 4096)

    async def test_default_limit_allows_10_mb(self, setup: Setup) -> None:
        (await setup.start()).serve()
        body = b"\x01" * (10 * 1000 * 1000)
        status, reply, _ = await setup.send("dev1", body)
        assert status == 200
        assert reply == body


class TestMoreBadInput:
    """Edge cases found in review."""

    async def test_method_name_too_long(self, setup: Setup) -> None:
        (await setup.start()).serve()
        status, body, _ = await setup.send("dev1", b"x", "?method=" + "m" * 256)
        assert status == 400
        assert orjson.loads(body)["error"] == "invalid_method"

    async def test_shutdown_refuses_new_calls_with_retry_after(
        self, setup: Setup, http: aiohttp.ClientSession
    ) -> None:
        """While draining, /healthz says 503 and new calls get 503 with Retry-After."""

        async def slow(call: Call) -> bytes:
            await asyncio.sleep(0.5)
            return call.body

        (await setup.start()).serve(slow)
        in_flight = asyncio.ensure_future(setup.send("dev1", b"first"))
        await asyncio.sleep(0.1)
        draining = asyncio.ensure_future(setup.server.relay.shutdown(3))
        await asyncio.sleep(0.05)
        async with http.get(setup.server.url + "/healthz") as r:
            assert r.status == 503
            assert (await r.json())["status"] == "shutting_down"
        status, body, resp = await setup.send("dev1", b"second")
        assert status == 503
        assert orjson.loads(body)["error"] == "shutting_down"
        assert resp.headers["Retry-After"] == "1"
        assert (await in_flight)[:2] == (200, b"first")
        await draining
