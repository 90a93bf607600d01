"""Publishing to topics over real sockets: ``POST .../topics/{topic}`` (docs/api.md § Topics).

Devices are raw native connections (tests/rawdevice.py) that send SUBSCRIBE frames
themselves, so these tests check the server side of docs/protocol.md § Topics too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from backchannel.core.topics import MAX_SUBSCRIPTIONS
from backchannel.wire.native.frames import Push, SubscribeAck
from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.rawdevice import RawDevice, connect


async def subscribe(dev: RawDevice, pattern: str, *, unsubscribe: bool = False) -> SubscribeAck:
    """Send (UN)SUBSCRIBE from a serving raw device and wait for the server's answer."""
    make = dev.conn.unsubscribe if unsubscribe else dev.conn.subscribe
    request_id, frame = make(pattern)
    await dev.ws.send_bytes(frame)
    acks: list[SubscribeAck] = []

    def answered() -> bool:
        acks[:] = [
            f for f in dev.frames if isinstance(f, SubscribeAck) and f.request_id == request_id
        ]
        return bool(acks)

    await wait_for(answered)
    return acks[0]


def pushes(dev: RawDevice) -> list[tuple[str, bytes]]:
    """The PUSH frames the device received, in order."""
    return [(f.topic, f.data) for f in dev.frames if isinstance(f, Push)]


class App:
    """One application of the server under test, and its devices."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def create(self) -> App:
        self.app_id, self.secret = await self.server.create_app()
        return self

    async def device(self, device_id: str, *patterns: str) -> RawDevice:
        key = await self.server.provision(self.app_id, device_id)
        dev = await connect(self.http, self.server.ws_url, self.app_id, device_id, key)
        dev.serve()
        for pattern in patterns:
            ack = await subscribe(dev, pattern)
            assert not ack.error, ack.reason
        return dev

    async def publish(
        self, topic: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        url = f"{self.server.url}/v1/applications/{self.app_id}/topics/{topic}"
        auth = {"Authorization": f"OAuth {self.secret}"} if headers is None else headers
        async with self.http.post(url, data=body, headers=auth) as r:
            return r.status, orjson.loads(await r.read())


@pytest.fixture
async def app(server: RunningServer, http: aiohttp.ClientSession) -> App:
    return await App(server, http).create()


async def settle() -> None:
    """Let PUSH frames already written reach the devices' receive loops."""
    await asyncio.sleep(0.1)


class TestPublish:
    """docs/api.md § Topics: who receives a published message."""

    async def test_exact_plus_and_hash_patterns(self, app: App) -> None:
        exact = await app.device("exact", "home/kitchen/temp")
        plus = await app.device("plus", "home/+/temp")
        hash_ = await app.device("hash", "home/#")
        other = await app.device("other", "office/#")

        assert await app.publish("home/kitchen/temp", b"21.5") == (
            200,
            {"topic": "home/kitchen/temp", "devices": 3},
        )
        assert await app.publish("home/hall/temp", b"19") == (
            200,
            {"topic": "home/hall/temp", "devices": 2},
        )
        assert (await app.publish("home", b"all"))[1]["devices"] == 1  # '#' covers its parent
        assert (await app.publish("home/hall/light/on", b"1"))[1]["devices"] == 1
        assert (await app.publish("garden", b"x"))[1]["devices"] == 0
        await settle()
        assert pushes(exact) == [("home/kitchen/temp", b"21.5")]
        assert pushes(plus) == [("home/kitchen/temp", b"21.5"), ("home/hall/temp", b"19")]
        assert pushes(hash_) == [
            ("home/kitchen/temp", b"21.5"),
            ("home/hall/temp", b"19"),
            ("home", b"all"),
            ("home/hall/light/on", b"1"),
        ]
        assert pushes(other) == []

    async def test_a_device_with_overlapping_patterns_gets_each_message_once(
        self, app: App
    ) -> None:
        dev = await app.device("d1", "a/b", "a/+", "#")
        assert (await app.publish("a/b", b"once"))[1]["devices"] == 1
        await settle()
        assert pushes(dev) == [("a/b", b"once")]

    async def test_binary_body_and_encoded_topic_arrive_intact(self, app: App) -> None:
        dev = await app.device("d1", "caf\u00e9/+")
        body = bytes(range(256)) * 10
        status, answer = await app.publish("caf%C3%A9/a%20b", body)
        assert (status, answer) == (200, {"topic": "caf\u00e9/a b", "devices": 1})
        await settle()
        assert pushes(dev) == [("caf\u00e9/a b", body)]

    async def test_unsubscribe_stops_delivery(self, app: App) -> None:
        dev = await app.device("d1", "news/#", "news/today")
        ack = await subscribe(dev, "news/#", unsubscribe=True)
        assert not ack.error
        assert (await app.publish("news/today", b"1"))[1]["devices"] == 1  # still "news/today"
        assert (await app.publish("news/old", b"2"))[1]["devices"] == 0
        # Unsubscribing from a pattern not held is answered without error.
        assert not (await subscribe(dev, "never/held", unsubscribe=True)).error
        await settle()
        assert pushes(dev) == [("news/today", b"1")]

    async def test_applications_cannot_reach_each_others_devices(
        self, app: App, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        other = await App(server, http).create()
        mine = await app.device("same-id", "#")
        theirs = await other.device("same-id", "#")
        assert (await app.publish("t", b"mine"))[1]["devices"] == 1
        assert (await other.publish("t", b"theirs"))[1]["devices"] == 1
        await settle()
        assert pushes(mine) == [("t", b"mine")]
        assert pushes(theirs) == [("t", b"theirs")]

    async def test_the_admin_token_may_publish(self, app: App) -> None:
        await app.device("d1", "t")
        headers = {"Authorization": f"Bearer {app.server.admin_token}"}
        assert await app.publish("t", b"x", headers) == (200, {"topic": "t", "devices": 1})


class TestSessions:
    """docs/protocol.md § Topics: subscriptions belong to one connection."""

    async def test_subscriptions_vanish_on_disconnect(
        self, app: App, server: RunningServer
    ) -> None:
        dev = await app.device("d1", "a/#")
        assert (await app.publish("a/b"))[1]["devices"] == 1
        await dev.close()
        await wait_for(lambda: len(server.relay.topics) == 0)
        assert (await app.publish("a/b"))[1]["devices"] == 0
        # A new connection of the same device starts with no subscriptions.
        again = await app.device("d1")
        await wait_for(lambda: server.relay.hub.get(app.app_id, "d1") is not None)
        assert (await app.publish("a/b"))[1]["devices"] == 0
        await settle()
        assert pushes(again) == []

    async def test_takeover_leaves_only_the_new_sessions_subscriptions(
        self, app: App, server: RunningServer
    ) -> None:
        old = await app.device("d1", "old")
        new = await app.device("d1", "new")
        assert await old.wait_closed() == 4002
        await wait_for(lambda: len(server.relay.topics) == 1)
        assert (await app.publish("old"))[1]["devices"] == 0
        assert (await app.publish("new", b"n"))[1]["devices"] == 1
        assert server.relay.topic_devices(app.app_id, "new") == ["d1"]
        await settle()
        assert pushes(new) == [("new", b"n")]

    async def test_a_protocol_error_drops_the_subscriptions(
        self, app: App, server: RunningServer
    ) -> None:
        dev = await app.device("d1", "a")
        await dev.ws.send_bytes(b"\x7f\x00\x00\x00\x00\x00")  # unknown frame type
        assert await dev.wait_closed() == 4000
        await wait_for(lambda: len(server.relay.topics) == 0)


class TestRefusals:
    """docs/protocol.md § Topics (SUBSCRIBE_ACK with ERROR), docs/api.md § Topics errors."""

    @pytest.mark.parametrize(
        ("pattern", "reason"),
        [("a/#/b", "last level"), ("a+", "whole level"), ("a\x00b", "NUL"), ("", "empty")],
    )
    async def test_invalid_pattern_is_refused_with_a_reason(
        self, app: App, server: RunningServer, pattern: str, reason: str
    ) -> None:
        dev = await app.device("d1")
        ack = await subscribe(dev, pattern)
        assert ack.error
        assert reason in ack.reason
        assert len(server.relay.topics) == 0
        assert dev.close_code is None  # a refusal does not end the connection

    async def test_over_the_limit_is_refused(self, app: App) -> None:
        dev = await app.device("d1")
        for i in range(MAX_SUBSCRIPTIONS):
            assert not (await subscribe(dev, f"t/{i}")).error
        ack = await subscribe(dev, "one/too/many")
        assert ack.error
        assert str(MAX_SUBSCRIPTIONS) in ack.reason
        assert (await app.publish("one/too/many"))[1]["devices"] == 0
        assert not (await subscribe(dev, "t/0")).error  # already held: still fine

    @pytest.mark.parametrize("topic", ["a/%2B", "a/%23", "a/b%00", "x" * 256])
    async def test_invalid_topic_is_400(self, app: App, topic: str) -> None:
        status, body = await app.publish(topic, b"x")
        assert status == 400
        assert body["error"] == "invalid_topic"
        assert body["detail"]

    async def test_missing_topic_is_404(self, app: App) -> None:
        status, body = await app.publish("", b"x")
        assert (status, body["error"]) == (404, "not_found")

    async def test_no_credential_is_401(self, app: App) -> None:
        status, body = await app.publish("t", b"x", headers={})
        assert (status, body["error"]) == (401, "unauthorized")

    async def test_wrong_secret_is_403(self, app: App) -> None:
        status, body = await app.publish("t", b"x", headers={"Authorization": "OAuth nope"})
        assert (status, body["error"]) == (403, "forbidden")

    async def test_another_apps_secret_is_403(
        self, app: App, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        other = await App(server, http).create()
        await app.device("d1", "t")
        headers = {"Authorization": f"OAuth {other.secret}"}
        status, body = await app.publish("t", b"x", headers=headers)
        assert (status, body["error"]) == (403, "forbidden")

    async def test_body_over_the_limit_is_413(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        small = await App(await make_server(max_body_size=4096), http).create()
        dev = await small.device("d1", "t")
        assert (await small.publish("t", b"x" * 4096))[1]["devices"] == 1
        status, body = await small.publish("t", b"x" * 4097)
        assert (status, body["error"]) == (413, "body_too_large")
        await settle()
        assert pushes(dev) == [("t", b"x" * 4096)]


async def test_presence_lists_the_subscriptions(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, "d1")
    dev = (await connect(http, server.ws_url, app_id, "d1", key)).serve()
    for pattern in ("b/+", "a/#"):
        _, frame = dev.conn.subscribe(pattern)
        await dev.ws.send_bytes(frame)
    url = f"{server.url}/v1/applications/{app_id}/devices/d1"
    auth = {"Authorization": f"OAuth {secret}"}

    async def subscriptions() -> list[str]:
        async with http.get(url, headers=auth) as r:
            return list((await r.json())["subscriptions"])

    deadline = asyncio.get_running_loop().time() + 5
    while (got := await subscriptions()) != ["a/#", "b/+"]:
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.02)
    await dev.close()


async def test_publish_broadcast_limit(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(broadcast_max_bytes=2500)
    app_id, secret = await server.create_app()
    devices = []
    for name in ("a", "b", "c"):
        key = await server.provision(app_id, name)
        dev = (await connect(http, server.ws_url, app_id, name, key)).serve()
        await dev.ws.send_bytes(dev.conn.subscribe("t")[1])
        devices.append(dev)
    await wait_for(lambda: len(server.relay.topic_devices(app_id, "t")) == 3)
    url = f"{server.url}/v1/applications/{app_id}/topics/t"
    auth = {"Authorization": f"OAuth {secret}"}
    async with http.post(url, data=b"x" * 1000, headers=auth) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "broadcast_too_large"
    async with http.post(url, data=b"x" * 800, headers=auth) as r:
        assert (r.status, (await r.json())["devices"]) == (200, 3)
    for dev in devices:
        await dev.close()
