"""POST /v1/applications/{app_id}/fanout over real sockets (docs/api.md, "Fan-out")."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import orjson
import pytest

from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.rawdevice import RawDevice, connect


class Setup:
    """An application, its credential, and helpers to connect devices and fan out."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def start(self, **app_settings: Any) -> Setup:
        self.app_id, self.secret = await self.server.create_app(**app_settings)
        return self

    async def device(self, device_id: str, app_id: str | None = None) -> RawDevice:
        app_id = app_id or self.app_id
        key = await self.server.provision(app_id, device_id)
        return await connect(self.http, self.server.ws_url, app_id, device_id, key)

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1/applications/{self.app_id}/fanout"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.secret}"}

    async def post(
        self, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.http.post(self.url, data=data, headers=headers or self.auth) as r:
            return r.status, orjson.loads(await r.read()), r

    async def fanout(self, body: Any) -> dict[str, Any]:
        status, data, _ = await self.post(body)
        assert status == 200, data
        return data


@pytest.fixture
async def setup(server: RunningServer, http: aiohttp.ClientSession) -> Setup:
    return await Setup(server, http).start()


def calls(device: RawDevice) -> list[Call]:
    """The CALL frames a device received."""
    return [f for f in device.frames if isinstance(f, Call)]


def by_device(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["device"]: r for r in data["results"]}


class TestDevices:
    """Targets given as a list of ids."""

    async def test_replies_offline_order_and_dedupe(self, setup: Setup) -> None:
        async def tagged(call: Call) -> bytes:
            return b"from-" + call.body

        (await setup.device("a")).serve(tagged)
        (await setup.device("b")).serve(tagged)
        data = await setup.fanout(
            {"devices": ["b", "ghost", "a", "b", "a"], "message": "hi", "timeout": 5}
        )
        assert [r["device"] for r in data["results"]] == ["b", "ghost", "a"]
        assert (data["total"], data["replied"], data["offline"]) == (3, 2, 1)
        assert (data["timed_out"], data["failed"], data["timeout"]) == (0, 0, 5)
        results = by_device(data)
        assert results["a"]["reply"] == "from-hi"
        assert results["b"]["status"] == "replied"
        assert results["ghost"]["status"] == "offline"
        assert results["ghost"]["error"] == "device_offline"
        assert "ghost" in results["ghost"]["detail"]
        assert "reply" not in results["ghost"]
        assert all(isinstance(r["ms"], float) and r["ms"] >= 0 for r in data["results"])

    async def test_each_device_called_once(self, setup: Setup) -> None:
        dev = (await setup.device("a")).serve()
        await setup.fanout({"devices": ["a", "a", "a"], "message": "x"})
        assert len(calls(dev)) == 1

    async def test_binary_message_method_and_reply(self, setup: Setup) -> None:
        seen: list[Call] = []

        async def binary(call: Call) -> bytes:
            seen.append(call)
            return b"\xff\x00" + call.body

        (await setup.device("a")).serve(binary)
        body = bytes(range(256))
        data = await setup.fanout(
            {
                "devices": ["a"],
                "message_base64": base64.b64encode(body).decode(),
                "method": "light.set",
            }
        )
        (result,) = data["results"]
        assert "reply" not in result
        assert base64.b64decode(result["reply_base64"]) == b"\xff\x00" + body
        assert seen[0].body == body
        assert seen[0].method == "light.set"

    async def test_text_message_is_utf8(self, setup: Setup) -> None:
        seen: list[bytes] = []

        async def record(call: Call) -> bytes:
            seen.append(call.body)
            return call.body

        (await setup.device("a")).serve(record)
        data = await setup.fanout({"devices": ["a"], "message": "grüße ✓"})
        assert seen == ["grüße ✓".encode()]
        assert data["results"][0]["reply"] == "grüße ✓"

    async def test_device_error_and_timeout_are_per_device(self, setup: Setup) -> None:
        dev_err = await setup.device("err")

        async def fail(call: Call) -> None:
            await dev_err.error_reply(call.call_id, "sensor broken")

        dev_err.serve(fail)

        async def silent(call: Call) -> None:
            return None

        (await setup.device("mute")).serve(silent)
        (await setup.device("ok")).serve()
        started = time.monotonic()
        data = await setup.fanout(
            {"devices": ["err", "mute", "ok"], "message": "go", "timeout": 0.4}
        )
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 1.4
        results = by_device(data)
        assert results["ok"]["reply"] == "go"
        assert (results["err"]["status"], results["err"]["error"]) == ("error", "device_error")
        assert "sensor broken" in results["err"]["detail"]
        assert (results["mute"]["status"], results["mute"]["error"]) == (
            "timeout",
            "timeout_no_reply",
        )
        assert results["mute"]["ms"] >= 400
        assert results["ok"]["ms"] < 400
        assert (data["replied"], data["timed_out"], data["failed"]) == (1, 1, 1)

    async def test_disconnect_mid_call(self, setup: Setup) -> None:
        dev = await setup.device("flaky")

        async def hang_up(call: Call) -> None:
            await dev.ws.close()

        dev.serve(hang_up)
        data = await setup.fanout({"devices": ["flaky"], "message": "x", "timeout": 5})
        assert data["results"][0]["status"] == "error"
        assert data["results"][0]["error"] == "device_disconnected"

    async def test_zero_devices(self, setup: Setup) -> None:
        status, data, resp = await setup.post({"devices": [], "message": "x"})
        assert status == 200
        assert data == {
            "timeout": 30,
            "total": 0,
            "replied": 0,
            "offline": 0,
            "queued": 0,
            "timed_out": 0,
            "failed": 0,
            "results": [],
        }
        assert resp.headers["X-Backchannel-Timeout"] == "30"


class TestTimeout:
    """The timeout in force is chosen like send's, echoed, and shared by every call."""

    async def test_requested_timeout_is_capped(self, make_server: ServerFactory) -> None:
        server = await make_server(max_timeout=2, default_timeout=1)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(server, http).start()
            status, data, resp = await setup.post({"devices": [], "message": "x", "timeout": 50})
            assert status == 200
            assert data["timeout"] == 2
            assert resp.headers["X-Backchannel-Timeout"] == "2"
            _, data, resp = await setup.post({"devices": [], "message": "x"})
            assert data["timeout"] == 1

    async def test_app_default_timeout(self, server: RunningServer, http: Any) -> None:
        setup = await Setup(server, http).start(default_timeout=7.5)
        _, data, resp = await setup.post({"devices": [], "message": "x"})
        assert data["timeout"] == 7.5
        assert resp.headers["X-Backchannel-Timeout"] == "7.5"

    async def test_timeout_as_string(self, setup: Setup) -> None:
        _, data, _ = await setup.post({"devices": [], "message": "x", "timeout": "0.5"})
        assert data["timeout"] == 0.5


class TestTag:
    """Targets given as a tag of provisioned devices (admin API)."""

    async def provision(self, setup: Setup, device_id: str, tags: list[str]) -> str:
        url = f"{setup.server.url}/admin/v1/apps/{setup.app_id}/devices/{device_id}"
        headers = {"Authorization": f"Bearer {setup.server.admin_token}"}
        async with setup.http.post(url, json={"tags": tags}, headers=headers) as r:
            assert r.status == 201
            return str((await r.json())["key"])

    async def test_tagged_devices_online_and_offline(self, setup: Setup) -> None:
        keys = {
            "k1": await self.provision(setup, "k1", ["kitchen", "floor1"]),
            "k2": await self.provision(setup, "k2", ["kitchen"]),
            "k3": await self.provision(setup, "k3", ["kitchen"]),
            "g1": await self.provision(setup, "g1", ["garage"]),
        }
        devices = {}
        for device_id in ("k1", "k3", "g1"):
            devices[device_id] = await connect(
                setup.http, setup.server.ws_url, setup.app_id, device_id, keys[device_id]
            )
            devices[device_id].serve()
        data = await setup.fanout({"tag": "kitchen", "message": "lights"})
        assert [r["device"] for r in data["results"]] == ["k1", "k2", "k3"]
        assert [r["status"] for r in data["results"]] == ["replied", "offline", "replied"]
        assert (data["replied"], data["offline"]) == (2, 1)
        assert calls(devices["g1"]) == []
        data = await setup.fanout({"tag": "floor1", "message": "x"})
        assert [r["device"] for r in data["results"]] == ["k1"]

    async def test_unknown_tag_is_empty(self, setup: Setup) -> None:
        await self.provision(setup, "k1", ["kitchen"])
        data = await setup.fanout({"tag": "attic", "message": "x"})
        assert (data["total"], data["results"]) == (0, [])

    async def test_other_apps_tags_are_not_reached(self, setup: Setup) -> None:
        other_id, _ = await setup.server.create_app("other")
        _, key = await setup.server.apps.provision(other_id, "theirs", ("kitchen",))
        theirs = await connect(setup.http, setup.server.ws_url, other_id, "theirs", key)
        theirs.serve()
        data = await setup.fanout({"tag": "kitchen", "message": "x"})
        assert data["total"] == 0
        assert calls(theirs) == []


class TestTopic:
    """Targets given as a topic: the devices subscribed to a matching pattern."""

    async def subscribe(self, setup: Setup, dev: RawDevice, pattern: str) -> None:
        _, frame = dev.conn.subscribe(pattern)
        await dev.ws.send_bytes(frame)

    async def test_subscribers_are_called(self, setup: Setup) -> None:
        a = (await setup.device("a")).serve()
        b = (await setup.device("b")).serve()
        c = (await setup.device("c")).serve()
        await self.subscribe(setup, a, "sensors/+/temp")
        await self.subscribe(setup, b, "sensors/kitchen/temp")
        await self.subscribe(setup, c, "alarms/#")
        relay = setup.server.relay
        await wait_for(lambda: len(relay.topic_devices(setup.app_id, "sensors/kitchen/temp")) == 2)
        await wait_for(lambda: len(relay.topic_devices(setup.app_id, "alarms/x")) == 1)
        data = await setup.fanout({"topic": "sensors/kitchen/temp", "message": "read"})
        assert sorted(r["device"] for r in data["results"]) == ["a", "b"]
        assert data["replied"] == 2
        assert calls(c) == []

    async def test_no_subscribers_is_empty(self, setup: Setup) -> None:
        data = await setup.fanout({"topic": "nobody/listens", "message": "x"})
        assert data["total"] == 0

    async def test_invalid_topic(self, setup: Setup) -> None:
        status, data, _ = await setup.post({"topic": "sensors/+/temp", "message": "x"})
        assert (status, data["error"]) == (400, "invalid_topic")
        assert data["detail"]


class TestIsolation:
    """Another application's device ids are offline here and never reached."""

    async def test_other_apps_device_is_offline(self, setup: Setup) -> None:
        other_id, _ = await setup.server.create_app("other")
        theirs = (await setup.device("shared-id", app_id=other_id)).serve()
        mine = (await setup.device("mine")).serve()
        data = await setup.fanout({"devices": ["shared-id", "mine"], "message": "x"})
        results = by_device(data)
        assert results["shared-id"]["status"] == "offline"
        assert results["mine"]["status"] == "replied"
        assert calls(theirs) == []
        assert len(calls(mine)) == 1


class TestLimits:
    """fanout_max_devices and the body size limit."""

    async def test_too_many_devices(self, make_server: ServerFactory) -> None:
        server = await make_server(fanout_max_devices=3)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(server, http).start()
            dev = (await setup.device("d1")).serve()
            status, data, _ = await setup.post(
                {"devices": ["d1", "d2", "d3", "d4"], "message": "x"}
            )
            assert (status, data["error"], data["limit"]) == (400, "too_many_devices", 3)
            assert "4" in data["detail"]
            assert calls(dev) == []
            # Repeats count once: three distinct devices are within the limit.
            data = await setup.fanout({"devices": ["d1", "d2", "d3", "d1"], "message": "x"})
            assert data["total"] == 3

    async def test_too_many_tagged_devices(self, make_server: ServerFactory) -> None:
        server = await make_server(fanout_max_devices=2)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(server, http).start()
            for i in range(3):
                await server.apps.provision(setup.app_id, f"t{i}", ("all",))
            status, data, _ = await setup.post({"tag": "all", "message": "x"})
            assert (status, data["error"]) == (400, "too_many_devices")

    async def test_body_too_large(self, make_server: ServerFactory) -> None:
        server = await make_server(max_body_size=2048)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(server, http).start()
            status, data, _ = await setup.post({"devices": ["a"], "message": "x" * 4096})
            assert (status, data["error"]) == (413, "body_too_large")


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("not json", b"{devices: [", "invalid_json"),
    ("not an object", b'["a"]', "invalid_json"),
    ("empty body", b"", "invalid_target"),
    ("no target", {"message": "x"}, "invalid_target"),
    ("two targets", {"devices": ["a"], "tag": "t", "message": "x"}, "invalid_target"),
    ("three targets", {"devices": [], "tag": "t", "topic": "t", "message": "x"}, "invalid_target"),
    ("devices not a list", {"devices": "a", "message": "x"}, "invalid_target"),
    ("device id not a string", {"devices": ["a", 7], "message": "x"}, "invalid_target"),
    ("tag not a string", {"tag": ["t"], "message": "x"}, "invalid_target"),
    ("empty tag", {"tag": "", "message": "x"}, "invalid_target"),
    ("topic not a string", {"topic": 5, "message": "x"}, "invalid_target"),
    ("bad device id", {"devices": ["a", "bad id!"], "message": "x"}, "invalid_device_id"),
    ("empty device id", {"devices": [""], "message": "x"}, "invalid_device_id"),
    ("no message", {"devices": ["a"]}, "invalid_message"),
    (
        "both messages",
        {"devices": ["a"], "message": "x", "message_base64": "eA=="},
        "invalid_message",
    ),
    ("message not a string", {"devices": ["a"], "message": 5}, "invalid_message"),
    ("message null", {"devices": ["a"], "message": None}, "invalid_message"),
    ("bad base64", {"devices": ["a"], "message_base64": "not base64!"}, "invalid_message"),
    ("base64 not a string", {"devices": ["a"], "message_base64": [1]}, "invalid_message"),
    ("method too long", {"devices": ["a"], "message": "x", "method": "m" * 256}, "invalid_method"),
    ("method not a string", {"devices": ["a"], "message": "x", "method": 1}, "invalid_method"),
    ("timeout zero", {"devices": ["a"], "message": "x", "timeout": 0}, "invalid_timeout"),
    ("timeout negative", {"devices": ["a"], "message": "x", "timeout": -1}, "invalid_timeout"),
    (
        "timeout not a number",
        {"devices": ["a"], "message": "x", "timeout": "soon"},
        "invalid_timeout",
    ),
    ("timeout bool", {"devices": ["a"], "message": "x", "timeout": True}, "invalid_timeout"),
    ("timeout list", {"devices": ["a"], "message": "x", "timeout": [1]}, "invalid_timeout"),
    ("timeout infinite", {"devices": ["a"], "message": "x", "timeout": "inf"}, "invalid_timeout"),
    ("unknown field", {"devices": ["a"], "message": "x", "device": "b"}, "invalid_field"),
]


class TestBadRequests:
    """Every malformed request is a 400 naming the problem, and nothing is sent."""

    @pytest.mark.parametrize(
        ("body", "error"), [(b, e) for _, b, e in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS]
    )
    async def test_rejected(self, setup: Setup, body: Any, error: str) -> None:
        dev = (await setup.device("a")).serve()
        status, data, resp = await setup.post(body)
        assert status == 400, data
        assert data["error"] == error
        assert data["msg"] == "400 Bad Request"
        assert data["detail"]
        assert "X-Backchannel-Timeout" not in resp.headers
        assert calls(dev) == []

    async def test_method_of_255_bytes_is_fine(self, setup: Setup) -> None:
        seen: list[str] = []

        async def record(call: Call) -> bytes:
            seen.append(call.method)
            return b""

        (await setup.device("a")).serve(record)
        method = "é" * 127 + "m"  # 255 bytes of UTF-8
        await setup.fanout({"devices": ["a"], "message": "x", "method": method})
        assert seen == [method]


class TestAuth:
    """The same credentials as every app route."""

    async def test_missing_credential(self, setup: Setup) -> None:
        async with setup.http.post(setup.url, json={"devices": [], "message": "x"}) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "unauthorized"

    async def test_wrong_scheme(self, setup: Setup) -> None:
        status, data, _ = await setup.post(
            {"devices": [], "message": "x"}, {"Authorization": f"Basic {setup.secret}"}
        )
        assert (status, data["error"]) == (401, "unauthorized")

    async def test_wrong_secret_and_other_apps_secret(self, setup: Setup) -> None:
        dev = (await setup.device("a")).serve()
        _, other_secret = await setup.server.create_app("other")
        for secret in ("0" * 40, other_secret):
            status, data, _ = await setup.post(
                {"devices": ["a"], "message": "x"}, {"Authorization": f"OAuth {secret}"}
            )
            assert (status, data["error"]) == (403, "forbidden")
        assert calls(dev) == []

    async def test_auth_is_checked_before_the_body(self, setup: Setup) -> None:
        status, data, _ = await setup.post(b"{not json", {"Authorization": "Bearer nope"})
        assert (status, data["error"]) == (403, "forbidden")

    async def test_admin_token(self, setup: Setup) -> None:
        (await setup.device("a")).serve()
        admin = {"Authorization": f"Bearer {setup.server.admin_token}"}
        status, data, _ = await setup.post({"devices": ["a"], "message": "x"}, admin)
        assert (status, data["replied"]) == (200, 1)
        setup.app_id = "0" * 20
        status, data, _ = await setup.post({"devices": ["a"], "message": "x"}, admin)
        assert (status, data["error"]) == (404, "unknown_app")


async def test_calls_start_together(setup: Setup) -> None:
    """Every call is in flight at once: ten 0.3 s devices take about 0.3 s, not 3 s."""

    async def slow(call: Call) -> bytes:
        await asyncio.sleep(0.3)
        return b"done"

    for i in range(10):
        (await setup.device(f"s{i}")).serve(slow)
    started = time.monotonic()
    data = await setup.fanout({"devices": [f"s{i}" for i in range(10)], "message": "x"})
    assert data["replied"] == 10
    assert time.monotonic() - started < 1.5


class TestQueueOffline:
    """``"offline": "queue"``: offline devices get the message when they connect."""

    async def test_offline_devices_get_a_queued_message(self, setup: Setup) -> None:
        (await setup.device("on")).serve()
        await setup.server.provision(setup.app_id, "later")
        data = await setup.fanout(
            {
                "devices": ["on", "later", "never"],
                "message": "fw-2.1",
                "offline": "queue",
                "ttl": 60,
            }
        )
        assert (data["replied"], data["queued"], data["offline"], data["failed"]) == (1, 1, 0, 1)
        # A device with no key in an app that needs one could never take it: not queued.
        assert by_device(data)["never"]["error"] == "unknown_device"
        queued = by_device(data)["later"]
        assert queued["status"] == "queued" and queued["message_id"].startswith("msg_")
        assert "error" not in queued
        got: list[bytes] = []

        async def record(call: Call) -> bytes:
            got.append(call.body)
            return b"ok"

        (await setup.device("later")).serve(record)
        message_url = f"{setup.server.url}/v1/applications/{setup.app_id}/messages/"
        deadline = time.monotonic() + 5
        while True:
            async with setup.http.get(message_url + queued["message_id"], headers=setup.auth) as r:
                message = orjson.loads(await r.read())
            if message["state"] == "replied":
                break
            assert time.monotonic() < deadline, message
            await asyncio.sleep(0.02)
        assert got == [b"fw-2.1"]
        assert message["expires_at"] - message["created_at"] == pytest.approx(60, abs=0.5)

    async def test_queued_body_limit(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        setup = await Setup(await make_server(message_max_body_size=10), http).start()
        body = {"devices": ["gone"], "message": "x" * 11}
        status, data, _ = await setup.post({**body, "offline": "queue"})
        assert (status, data["error"], data["limit"]) == (413, "body_too_large", 10)
        assert (await setup.fanout(body))["offline"] == 1  # without queueing: no such limit

    async def test_a_full_queue_is_an_error_for_that_device(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        setup = await Setup(await make_server(max_queued_per_device=1), http).start()
        for name in ("full", "empty"):
            await setup.server.provision(setup.app_id, name)
        body = {"devices": ["full", "empty"], "message": "m", "offline": "queue"}
        first = await setup.fanout({**body, "devices": ["full"]})
        assert first["queued"] == 1
        data = await setup.fanout(body)
        assert (data["queued"], data["failed"]) == (1, 1)
        full = by_device(data)["full"]
        assert (full["status"], full["error"]) == ("error", "queue_full")

    @pytest.mark.parametrize(
        ("extra", "error"),
        [
            ({"offline": "later"}, "invalid_offline"),
            ({"ttl": 5}, "invalid_ttl"),
            ({"offline": "queue", "ttl": 0}, "invalid_ttl"),
            ({"offline": "queue", "ttl": "soon"}, "invalid_ttl"),
            ({"offline": "queue", "ttl": 10**9}, "invalid_ttl"),
        ],
    )
    async def test_bad_offline_fields(
        self, setup: Setup, extra: dict[str, Any], error: str
    ) -> None:
        status, data, _ = await setup.post({"devices": ["x"], "message": "m", **extra})
        assert (status, data["error"]) == (400, error)


async def test_broadcast_limit_counts_connected_copies(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    # 3 connected devices x 1,000 bytes is over a 2,500-byte limit; offline ones cost nothing.
    setup = await Setup(await make_server(broadcast_max_bytes=2500), http).start()
    for name in ("a", "b", "c"):
        (await setup.device(name)).serve()
    big = {"message": "x" * 1000}
    status, data, _ = await setup.post({"devices": ["a", "b", "c"], **big})
    assert (status, data["error"], data["limit"]) == (413, "broadcast_too_large", 2500)
    assert (await setup.fanout({"devices": ["a", "b", "gone", "away"], **big}))["replied"] == 2
