"""Topics from the SDK: Device.subscribe and Client.publish against a real server.

docs/protocol.md § Topics (the device side) and docs/api.md § Topics (the publish route).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backchannel import AsyncClient, Client, Device
from backchannel.core.topics import MAX_SUBSCRIPTIONS
from backchannel.sdk import BadRequest, SubscriptionRefused
from tests.conftest import RunningServer, wait_for
from tests.sdk.test_device import serving

Received = list[tuple[str, bytes]]


class Setup:
    """An application with one provisioned device and a client for it."""

    def __init__(self, server: RunningServer, app_id: str, secret: str, key: str) -> None:
        self.server = server
        self.app_id = app_id
        self.secret = secret
        self.key = key
        self.client = AsyncClient(server.url, app_id, secret)

    def device(self, **kwargs: Any) -> Device:
        return Device(
            self.server.url, self.app_id, "dev1", self.key, backoff_initial=0.01, backoff_max=0.1,
            **kwargs,
        )  # fmt: skip


@pytest.fixture
async def s(server: RunningServer) -> AsyncIterator[Setup]:
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, "dev1")
    setup = Setup(server, app_id, secret, key)
    yield setup
    await setup.client.close()


def recorder(into: Received) -> Any:
    """An async handler that appends what it receives."""

    async def handler(topic: str, data: bytes) -> None:
        into.append((topic, data))

    return handler


async def test_subscriptions_made_before_serving_are_sent_before_wait_connected(
    s: Setup,
) -> None:
    device = s.device()
    exact: Received = []
    wild: Received = []
    await device.subscribe("home/kitchen/temp", recorder(exact))
    await device.subscribe("home/#", recorder(wild))
    assert device.subscriptions == ["home/kitchen/temp", "home/#"]
    async with serving(device):
        # No wait: wait_connected returned only after the server acknowledged both.
        assert await s.client.publish("home/kitchen/temp", b"21.5") == 1
        assert await s.client.publish("home", "root") == 1
        assert await s.client.publish("office/temp", b"x") == 0
        await wait_for(lambda: len(wild) == 2)
    assert exact == [("home/kitchen/temp", b"21.5")]
    assert wild == [("home/kitchen/temp", b"21.5"), ("home", b"root")]


async def test_subscribe_while_connected_waits_for_the_server(s: Setup) -> None:
    device = s.device()
    got: Received = []
    async with serving(device):
        assert await s.client.publish("a/b", b"early") == 0
        await device.subscribe("a/+", recorder(got))
        assert await s.client.publish("a/b", b"now") == 1
        await wait_for(lambda: got == [("a/b", b"now")])


async def test_every_matching_handler_gets_every_message_in_order(s: Setup) -> None:
    device = s.device()
    first: Received = []
    second: Received = []
    async with serving(device):
        await device.subscribe("t/+", recorder(first))
        await device.subscribe("#", recorder(second))
        for i in range(50):
            assert await s.client.publish(f"t/{i}", str(i)) == 1
        await wait_for(lambda: len(first) == len(second) == 50)
    expected = [(f"t/{i}", str(i).encode()) for i in range(50)]
    assert first == second == expected


async def test_sync_handler_runs_in_a_thread_and_on_push_still_fires(s: Setup) -> None:
    threads: list[str] = []
    hooked: Received = []
    device = s.device(on_push=lambda topic, data: hooked.append((topic, data)))

    def handler(topic: str, data: bytes) -> None:
        threads.append(threading.current_thread().name)

    async with serving(device):
        await device.subscribe("t", handler)
        assert await s.client.publish("t", b"x") == 1
        await wait_for(lambda: len(threads) == 1)
    assert threads[0] != threading.current_thread().name
    assert hooked == [("t", b"x")]


async def test_a_failing_handler_is_logged_and_the_link_survives(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    device = s.device()
    device.add_handler(lambda body: body)
    got: Received = []

    async def flaky(topic: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        got.append((topic, data))

    async with serving(device):
        session = device.session_id
        await device.subscribe("t", flaky)
        assert await s.client.publish("t", b"boom") == 1
        assert await s.client.publish("t", b"fine") == 1
        await wait_for(lambda: got == [("t", b"fine")])
        assert device.session_id == session
        assert await s.client.send("dev1", b"still here") == b"still here"
    assert "handler bug" in caplog.text


async def test_unsubscribe(s: Setup) -> None:
    device = s.device()
    got: Received = []
    async with serving(device):
        await device.subscribe("t", recorder(got))
        await device.unsubscribe("t")
        await device.unsubscribe("never-subscribed")  # no error
        assert device.subscriptions == []
        assert await s.client.publish("t", b"x") == 0
    await device.subscribe("gone", recorder(got))  # recorded while stopped
    await device.unsubscribe("gone")
    assert device.subscriptions == []
    assert got == []


async def test_invalid_pattern_fails_locally(s: Setup) -> None:
    device = s.device()
    with pytest.raises(ValueError, match="last level"):
        await device.subscribe("a/#/b", recorder([]))
    assert device.subscriptions == []


async def test_refusal_over_the_limit_raises_and_is_not_kept(s: Setup) -> None:
    device = s.device()
    async with serving(device):
        for i in range(MAX_SUBSCRIPTIONS):
            await device.subscribe(f"t/{i}", recorder([]))
        with pytest.raises(SubscriptionRefused) as info:
            await device.subscribe("one/too/many", recorder([]))
        assert str(MAX_SUBSCRIPTIONS) in info.value.detail
        assert "one/too/many" not in device.subscriptions
        assert len(device.subscriptions) == MAX_SUBSCRIPTIONS
        # Replacing the handler of a held pattern is still allowed.
        got: Received = []
        await device.subscribe("t/0", recorder(got))
        assert await s.client.publish("t/0", b"new handler") == 1
        await wait_for(lambda: got == [("t/0", b"new handler")])


async def test_resubscribes_after_the_server_drops_the_connection(s: Setup) -> None:
    codes: list[int | None] = []
    device = s.device(on_disconnect=codes.append)
    got: Received = []
    async with serving(device):
        await device.subscribe("a/#", recorder(got))
        first = device.session_id
        assert await s.server.relay.detach(s.app_id, "dev1")
        # Subscriptions belong to the connection: the server forgot them with it.
        assert s.server.relay.topic_devices(s.app_id, "a/b") == []
        await wait_for(lambda: device.connected and device.session_id != first)
        # connected is True only once the subscriptions were re-sent and acknowledged.
        assert await s.client.publish("a/b", b"after") == 1
        await wait_for(lambda: got == [("a/b", b"after")])
    assert codes[0] == 4003


async def test_subscribing_while_disconnected_only_records(s: Setup) -> None:
    device = s.device()
    got: Received = []
    async with serving(device):
        await device.stop()
        await device.subscribe("later", recorder(got))
    assert device.subscriptions == ["later"]
    assert await s.client.publish("later", b"x") == 0
    task = asyncio.get_running_loop().create_task(device.serve())
    try:
        # A new serve() after stop(): wait_connected must not raise the old run's failure.
        await device.wait_connected(5)
        assert await s.client.publish("later", b"x") == 1
        await wait_for(lambda: got == [("later", b"x")])
    finally:
        await device.stop()
        await asyncio.wait_for(task, 5)


async def test_invalid_topic_is_a_bad_request(s: Setup) -> None:
    for topic in ("a/+", "a/#", "x" * 256):
        with pytest.raises(BadRequest) as info:
            await s.client.publish(topic, b"x")
        assert info.value.error == "invalid_topic"
    with pytest.raises(ValueError):
        await s.client.publish("", b"x")


async def test_sync_client_publish(s: Setup) -> None:
    device = s.device()
    got: Received = []
    async with serving(device):
        await device.subscribe("sync/+", recorder(got))

        def publish() -> int:
            with Client(s.server.url, s.app_id, s.secret) as client:
                return client.publish("sync/x", b"from a thread")

        # The server runs on this loop: the blocking client must run elsewhere.
        assert await asyncio.to_thread(publish) == 1
        await wait_for(lambda: got == [("sync/x", b"from a thread")])


async def test_topic_decorator_before_serving(s: Setup) -> None:
    device = s.device()
    got: Received = []

    @device.topic("cmd/+")
    def on_cmd(topic: str, data: bytes) -> None:  # sync: runs in a thread
        got.append((topic, data))

    with pytest.raises(ValueError):
        device.topic("bad/#/x")
    async with serving(device):
        assert await s.client.publish("cmd/reboot", b"now") == 1
        await wait_for(lambda: got == [("cmd/reboot", b"now")])
        with pytest.raises(RuntimeError):
            device.topic("late/+")
