"""AsyncClient.fanout and Client.fanout against a real server and SDK devices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from backchannel import AsyncClient, Client, Device, FanoutReply, FanoutResult
from backchannel.sdk import BackchannelError, BadRequest, Unauthorized
from tests.conftest import RunningServer


@contextlib.asynccontextmanager
async def device(
    server: RunningServer, app_id: str, device_id: str, tags: tuple[str, ...] = ()
) -> AsyncIterator[Device]:
    """A connected device: the default handler answers ``<id>:<body>``, ``sleep`` sleeps."""
    _, key = await server.apps.provision(app_id, device_id, tags)
    dev = Device(server.url, app_id, device_id, key, backoff_initial=0.01, backoff_max=0.1)
    dev.add_handler(lambda body: device_id.encode() + b":" + body)

    @dev.handler("sleep")
    async def sleep(body: bytes) -> bytes:
        await asyncio.sleep(float(body))
        return b"slept"

    task = asyncio.get_running_loop().create_task(dev.serve())
    try:
        await dev.wait_connected(5)
        yield dev
    finally:
        await dev.stop()
        await asyncio.wait_for(task, 5)


async def test_devices_binary_message_and_offline(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with (
        device(server, app_id, "d1"),
        device(server, app_id, "d2"),
        AsyncClient(server.url, app_id, secret) as client,
    ):
        result = await client.fanout(b"\xff\x00", devices=["d2", "gone", "d1", "d2"])
    assert isinstance(result, FanoutResult)
    assert (result.total, result.replied, result.offline, result.timed_out, result.failed) == (
        3,
        2,
        1,
        0,
        0,
    )
    assert [r.device for r in result.results] == ["d2", "gone", "d1"]
    d2, gone, d1 = result.results
    assert isinstance(d1, FanoutReply)
    assert (d1.ok, d1.reply, d1.error) == (True, b"d1:\xff\x00", None)
    assert d2.reply == b"d2:\xff\x00"
    assert (gone.ok, gone.status, gone.reply, gone.error) == (
        False,
        "offline",
        None,
        "device_offline",
    )
    assert "gone" in gone.detail
    assert result.replies == {"d1": b"d1:\xff\x00", "d2": b"d2:\xff\x00"}
    assert result.timeout == 30


async def test_tag_method_and_timeout(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with (
        device(server, app_id, "a", ("group",)),
        device(server, app_id, "b", ("group",)),
        device(server, app_id, "c"),
        AsyncClient(server.url, app_id, secret) as client,
    ):
        result = await client.fanout("0.05", tag="group", method="sleep", timeout=2)
        assert result.replies == {"a": b"slept", "b": b"slept"}
        assert result.timeout == 2
        result = await client.fanout("5", tag="group", method="sleep", timeout=0.3)
    assert result.timed_out == 2
    assert {r.error for r in result.results} == {"timeout_no_reply"}
    assert all(r.ms >= 300 for r in result.results)


async def test_text_message_to_a_single_id_string(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with device(server, app_id, "solo"), AsyncClient(server.url, app_id, secret) as client:
        result = await client.fanout("héllo", devices="solo")
    assert result.replies == {"solo": "solo:héllo".encode()}


async def test_topic_without_subscribers(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        result = await client.fanout("x", topic="nobody/here")
    assert (result.total, result.results) == (0, [])


async def test_refusals(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        with pytest.raises(ValueError, match="exactly one"):
            await client.fanout("x")
        with pytest.raises(ValueError, match="exactly one"):
            await client.fanout("x", devices=["a"], tag="t")
        with pytest.raises(BadRequest) as info:
            await client.fanout("x", devices=["bad id"])
        assert info.value.error == "invalid_device_id"
        with pytest.raises(BadRequest) as info:
            await client.fanout("x", topic="a/+")
        assert info.value.error == "invalid_topic"
    async with AsyncClient(server.url, app_id, "wrong") as wrong:
        with pytest.raises(Unauthorized):
            await wrong.fanout("x", devices=["a"])


def test_malformed_answer_is_bad_response() -> None:
    with pytest.raises(BackchannelError) as info:
        FanoutResult.from_object({"timeout": 1, "total": 1})
    assert info.value.error == "bad_response"


async def test_sync_client(server: RunningServer) -> None:
    app_id, secret = await server.create_app()

    def plain_sync_code() -> FanoutResult:
        with Client(server.url, app_id, secret) as client:
            return client.fanout(b"sync", devices=["s1", "s2"], timeout=5)

    async with device(server, app_id, "s1"):
        result = await asyncio.to_thread(plain_sync_code)
    assert (result.replied, result.offline) == (1, 1)
    assert result.replies == {"s1": b"s1:sync"}


async def test_queue_for_offline_devices(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        await server.provision(app_id, "d2")  # a key: it can connect, so it can be queued for
        async with device(server, app_id, "d1"):
            result = await client.fanout("go", devices=["d1", "d2"], offline="queue", ttl=30)
        assert (result.replied, result.queued, result.offline) == (1, 1, 0)
        queued = result.results[1]
        assert (queued.status, queued.ok, queued.error) == ("queued", False, None)
        assert queued.message_id is not None
        async with device(server, app_id, "d2"):
            done = await client.wait_message(queued.message_id, timeout=5)
        assert (done.state, done.reply) == ("replied", b"d2:go")
