"""The device SDK against a real in-process server, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backchannel import AsyncClient, Device
from backchannel.sdk import (
    AuthenticationFailed,
    DeviceError,
    NoReply,
    NotConnected,
    SessionReplaced,
)
from backchannel.wire.native import SUBPROTOCOL, FrameType
from backchannel.wire.native.frames import Hello
from tests.conftest import RunningServer, ServerFactory, wait_for


def fast_device(server: RunningServer, app_id: str, key: str, **kwargs: Any) -> Device:
    """A device that reconnects quickly, so tests stay fast."""
    return Device(server.url, app_id, "dev1", key, backoff_initial=0.01, backoff_max=0.1, **kwargs)


@contextlib.asynccontextmanager
async def serving(device: Device, timeout: float = 5.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``device.serve()`` in a task until the block ends."""
    task = asyncio.get_running_loop().create_task(device.serve())
    try:
        await device.wait_connected(timeout)
        yield task
    finally:
        await device.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


class Setup:
    """An application with one provisioned device and a client for it."""

    def __init__(self, server: RunningServer, app_id: str, secret: str, key: str) -> None:
        self.server = server
        self.app_id = app_id
        self.key = key
        self.client = AsyncClient(server.url, app_id, secret)

    def device(self, key: str | None = None, **kwargs: Any) -> Device:
        return fast_device(self.server, self.app_id, key or self.key, **kwargs)


@pytest.fixture
async def s(server: RunningServer) -> AsyncIterator[Setup]:
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, "dev1")
    setup = Setup(server, app_id, secret, key)
    yield setup
    await setup.client.close()


async def test_binary_round_trip(s: Setup) -> None:
    device = s.device()

    @device.handler()
    async def echo(body: bytes) -> bytes:
        return body

    body = bytes(range(256)) * 64
    async with serving(device):
        assert await s.client.send("dev1", body) == body
        assert await s.client.send("dev1", b"") == b""


async def test_method_routing_and_catch_all(s: Setup) -> None:
    device = s.device()

    @device.handler("upper")
    async def upper(body: bytes) -> bytes:
        return body.upper()

    @device.handler
    def fallback(body: bytes) -> str:
        return "any:" + body.decode()

    async with serving(device):
        assert await s.client.send("dev1", "abc", method="upper") == b"ABC"
        assert await s.client.send("dev1", "abc", method="other") == b"any:abc"
        assert await s.client.send("dev1", "abc") == b"any:abc"


async def test_unknown_method_without_catch_all(s: Setup) -> None:
    device = s.device()
    device.add_handler(lambda body: body, method="known")
    async with serving(device):
        with pytest.raises(DeviceError) as info:
            await s.client.send("dev1", "x", method="nope")
    assert info.value.detail == "no handler for method 'nope'"
    assert info.value.status == 502


async def test_handler_exception_is_a_device_error(s: Setup) -> None:
    device = s.device()

    @device.handler()
    async def broken(body: bytes) -> bytes:
        raise ValueError("boom " + body.decode())

    @device.handler("bad_type")
    def bad_type(body: bytes) -> int:
        return 42

    async with serving(device):
        with pytest.raises(DeviceError) as info:
            await s.client.send("dev1", "now")
        assert info.value.detail == "ValueError: boom now"
        assert info.value.error == "device_error"
        with pytest.raises(DeviceError, match="TypeError: handler returned int"):
            await s.client.send("dev1", "", method="bad_type")


async def test_sync_handler_runs_in_a_thread(s: Setup) -> None:
    device = s.device()
    loop_thread = threading.get_ident()
    seen: list[int] = []

    @device.handler()
    def blocking(body: bytes) -> str:
        seen.append(threading.get_ident())
        threading.Event().wait(0.05)  # blocks its thread, not the connection
        return f"ok {body.decode()} é"

    async with serving(device):
        replies = await asyncio.gather(*(s.client.send("dev1", str(i)) for i in range(5)))
    assert replies == [f"ok {i} é".encode() for i in range(5)]
    assert seen and loop_thread not in seen


async def test_many_concurrent_calls(s: Setup) -> None:
    device = s.device()

    @device.handler()
    async def answer(body: bytes) -> bytes:
        await asyncio.sleep(random.random() * 0.05)  # replies come back out of order
        return b"re:" + body

    async with serving(device):
        bodies = [i.to_bytes(4, "big") + bytes([i % 256]) * (i % 50) for i in range(1000)]
        replies = await asyncio.gather(*(s.client.send("dev1", b) for b in bodies))
    assert replies == [b"re:" + b for b in bodies]


async def test_cancel_stops_the_handler(s: Setup) -> None:
    device = s.device()
    cancelled = asyncio.Event()

    @device.handler()
    async def slow(body: bytes) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return body

    async with serving(device):
        with pytest.raises(NoReply):
            await s.client.send("dev1", "x", timeout=0.2)
        await asyncio.wait_for(cancelled.wait(), 2)


async def test_reconnects_after_detach(s: Setup) -> None:
    codes: list[int | None] = []
    device = s.device(on_disconnect=codes.append)
    device.add_handler(lambda body: body)
    async with serving(device):
        first = device.session_id
        assert await s.server.relay.detach(s.app_id, "dev1")
        await wait_for(lambda: device.connected and device.session_id != first)
        assert codes == [4003]
        assert await s.client.send("dev1", "again") == b"again"


async def test_takeover_ends_the_older_device(s: Setup) -> None:
    old, new = s.device(), s.device()
    old.add_handler(lambda body: b"old")
    new.add_handler(lambda body: b"new")
    old_task = asyncio.get_running_loop().create_task(old.serve())
    await old.wait_connected(5)
    async with serving(new):
        with pytest.raises(SessionReplaced):
            await asyncio.wait_for(old_task, 5)
        assert not old.connected
        assert await s.client.send("dev1", "") == b"new"
    with pytest.raises(SessionReplaced):
        await old.wait_connected(1)


async def test_auth_failure_raises(s: Setup) -> None:
    device = s.device(key="not-the-key")
    task = asyncio.get_running_loop().create_task(device.serve())
    with pytest.raises(AuthenticationFailed) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.close_code == 4001
    assert "authentication failed" in str(info.value)
    with pytest.raises(AuthenticationFailed):
        await device.wait_connected(1)


async def test_emit(s: Setup) -> None:
    device = s.device()
    with pytest.raises(NotConnected):
        await device.emit("early", b"")
    async with serving(device):
        await device.emit("temperature", b"21.5", ack=True)
        await device.emit("note", "fire and forget")
        await device.emit("temperature", b"22.0", ack=True)
        presence = await s.client.device("dev1")
    assert presence["events"] == 3


async def test_stop_and_presence(s: Setup) -> None:
    connects: list[bool] = []
    device = s.device(info="test-agent/1", on_connect=lambda: connects.append(True))
    async with serving(device):
        assert device.connected and connects == [True]
        presence = await s.client.device("dev1")
        assert presence["info"].startswith("backchannel-python/")
        assert presence["info"].endswith("test-agent/1")
        assert presence["session_id"] == device.session_id
    assert not device.connected
    await wait_for(lambda: not s.server.relay.hub.get(s.app_id, "dev1"))


async def test_heartbeats_keep_the_session(make_server: ServerFactory) -> None:
    server = await make_server(heartbeat_interval=0.1, heartbeat_timeout=0.4)
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "dev1")
    device = fast_device(server, app_id, key)
    async with serving(device):
        first = device.session_id
        await asyncio.sleep(1.0)
        assert device.connected and device.session_id == first
        session = server.relay.hub.get(app_id, "dev1")
        assert session is not None and session.stats.rx_messages >= 5


async def test_reconnects_after_server_restart(make_server: ServerFactory) -> None:
    server = await make_server()
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "dev1")
    device = fast_device(server, app_id, key)
    codes: list[int | None] = []
    device.on_disconnect = codes.append
    async with serving(device) as task:
        await server.relay.shutdown(0.1)
        # The session closes with 1001; while the server drains, new connections get 503
        # before any upgrade. The device keeps trying (with backoff) instead of giving up.
        await wait_for(lambda: codes == [1001])
        await asyncio.sleep(0.5)
        assert codes == [1001]
        assert not task.done()
        assert not device.connected


async def test_silent_server_is_detected() -> None:
    """A server that sends HELLO and then never answers: the device closes 4004 and redials."""
    pings: list[int] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        await ws.send_bytes(Hello("silent", heartbeat=0.05, timeout=0.3, max_frame=0).serialize())
        async for msg in ws:  # swallow everything, answer nothing
            if msg.type is aiohttp.WSMsgType.BINARY and msg.data[0] == FrameType.PING:
                pings.append(int.from_bytes(msg.data[2:6], "big"))
        return ws

    app = web.Application()
    app.router.add_get("/v1/connect", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        codes: list[int | None] = []
        device = Device(url, "app", "dev1", "key", backoff_initial=0.01, backoff_max=0.05)
        device.on_disconnect = codes.append
        async with serving(device):
            await wait_for(lambda: len(codes) >= 2, timeout=5)
        assert codes[:2] == [4004, 4004]
        assert pings[:3] == [1, 2, 3]  # PINGs on HELLO's schedule, nonces counting up
    finally:
        await runner.cleanup()
