"""The app-side SDK's offline modes: ``send(offline=...)``, messages, and idempotency keys."""

from __future__ import annotations

import asyncio

import pytest

from backchannel import AsyncClient, Client
from backchannel.sdk import (
    Conflict,
    DeviceOffline,
    IdempotencyKeyReused,
    Message,
    NotFound,
    QueueFull,
)
from tests.conftest import RunningServer, ServerFactory
from tests.sdk.test_client import echo_device


async def test_queue_then_deliver(server: RunningServer) -> None:
    app_id, secret = await server.create_app(allow_open_attach=True)
    async with AsyncClient(server.url, app_id, secret) as client:
        queued = await client.send("d1", b"\x00hello", offline="queue", ttl=60)
        assert isinstance(queued, Message)
        assert (queued.state, queued.device_id, queued.final) == ("queued", "d1", False)
        assert queued.expires_at is not None and queued.expires_at > queued.created_at
        assert [m.id for m in await client.messages("d1", states=["queued"])] == [queued.id]
        other = await client.send("d2", b"2", offline="queue")
        assert [m.id for m in await client.messages()] == [queued.id, other.id]
        assert [m.id for m in await client.messages(limit=1)] == [queued.id]
        async with echo_device(server, app_id, "d1"):
            done = await client.wait_message(queued.id, timeout=5)
        assert (done.state, done.reply, done.final) == ("replied", b"\x00hello", True)
        assert (await client.message(queued.id)).reply == b"\x00hello"
        with pytest.raises(NotFound):
            await client.message("msg_unknown")


async def test_cancel_and_conflict(server: RunningServer) -> None:
    app_id, secret = await server.create_app(allow_open_attach=True)
    async with AsyncClient(server.url, app_id, secret) as client:
        queued = await client.send("d1", "x", offline="queue")
        cancelled = await client.cancel(queued.id)
        assert (cancelled.state, cancelled.error) == ("failed", "cancelled")
        async with echo_device(server, app_id, "d1"):
            other = await client.send("d1", "y", offline="queue")
            await client.wait_message(other.id, timeout=5)
            with pytest.raises(Conflict):
                await client.cancel(other.id)


async def test_wait_mode(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        with pytest.raises(DeviceOffline):
            await client.send("d1", "x", offline="wait", wait=0.2)
        call = asyncio.ensure_future(client.send("d1", "late", offline="wait", wait=5))
        await asyncio.sleep(0.2)
        async with echo_device(server, app_id, "d1"):
            assert await call == b"late"


async def test_idempotency_key(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with (
        AsyncClient(server.url, app_id, secret) as client,
        echo_device(server, app_id, "d1") as device,
    ):
        calls: list[bytes] = []

        @device.handler("count")
        def count(body: bytes) -> bytes:
            calls.append(body)
            return b"n=%d" % len(calls)

        first = await client.send("d1", "a", method="count", idempotency_key="k1")
        again = await client.send("d1", "a", method="count", idempotency_key="k1")
        assert first == again == b"n=1"
        assert calls == [b"a"]
        with pytest.raises(IdempotencyKeyReused):
            await client.send("d1", "b", method="count", idempotency_key="k1")


async def test_queue_full(make_server: ServerFactory) -> None:
    server = await make_server(max_queued_per_device=1)
    app_id, secret = await server.create_app(allow_open_attach=True)
    async with AsyncClient(server.url, app_id, secret) as client:
        await client.send("d1", "1", offline="queue")
        with pytest.raises(QueueFull) as info:
            await client.send("d1", "2", offline="queue")
        assert info.value.status == 429


async def test_sync_client(server: RunningServer) -> None:
    app_id, secret = await server.create_app(allow_open_attach=True)

    def queue_one() -> Message:
        with Client(server.url, app_id, secret) as client:
            message = client.send("d1", "sync", offline="queue", ttl=30)
            assert [m.id for m in client.messages("d1")] == [message.id]
            return message

    queued = await asyncio.to_thread(queue_one)
    async with echo_device(server, app_id, "d1"):

        def wait_one() -> Message:
            with Client(server.url, app_id, secret) as client:
                return client.wait_message(queued.id, timeout=5)

        done = await asyncio.to_thread(wait_one)
    assert (done.state, done.reply) == ("replied", b"sync")
