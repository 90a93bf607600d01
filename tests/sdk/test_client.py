"""The app-side SDK: AsyncClient, the synchronous Client, and the typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import aiohttp
import pytest

from backchannel import AsyncClient, Client, Device
from backchannel.sdk import (
    BackchannelError,
    BadRequest,
    BodyTooLarge,
    CallTimeout,
    DeviceBusy,
    DeviceError,
    DeviceOffline,
    NoReply,
    NotFound,
    ServerUnavailable,
    TimedOutBeforeDelivery,
    Unauthorized,
    error_from_response,
)
from tests.conftest import RunningServer, ServerFactory, free_port, wait_for


@contextlib.asynccontextmanager
async def echo_device(server: RunningServer, app_id: str, device_id: str) -> AsyncIterator[Device]:
    """A connected device answering with its body; ``sleep`` waits as long as it says."""
    key = await server.provision(app_id, device_id)
    device = Device(server.url, app_id, device_id, key, backoff_initial=0.01, backoff_max=0.1)
    device.add_handler(lambda body: body)

    @device.handler("sleep")
    async def sleep(body: bytes) -> bytes:
        await asyncio.sleep(float(body))
        return b"slept"

    task = asyncio.get_running_loop().create_task(device.serve())
    try:
        await device.wait_connected(5)
        yield device
    finally:
        await device.stop()
        await asyncio.wait_for(task, 5)


async def test_async_client_api(server: RunningServer) -> None:
    app_id, secret = await server.create_app("sdk-app")
    async with AsyncClient(server.url, app_id, secret) as client:
        assert await client.devices() == []
        async with echo_device(server, app_id, "d1"):
            assert await client.send("d1", bytes(range(256))) == bytes(range(256))
            assert await client.send("d1", "text é") == "text é".encode()
            assert await client.devices() == ["d1"]
            presence = await client.device("d1")
            assert presence["device_id"] == "d1" and presence["online"] is True
            info = await client.info()
            assert info["app_id"] == app_id and info["app_name"] == "sdk-app"
            await client.detach("d1")
            with pytest.raises(DeviceOffline):
                await client.detach("d1")
            with pytest.raises(DeviceOffline):
                await client.device("d1")


async def test_typed_errors(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        with pytest.raises(DeviceOffline) as offline:
            await client.send("nobody", b"x")
        assert offline.value.status == 418 and offline.value.error == "device_offline"
        async with echo_device(server, app_id, "d1"):
            with pytest.raises(NoReply) as late:
                await client.send("d1", "5", method="sleep", timeout=0.2)
            assert isinstance(late.value, CallTimeout) and late.value.status == 408
            assert late.value.timeout == pytest.approx(0.2)
            with pytest.raises(BadRequest) as bad:
                await client.send("d1", b"", timeout=-1)
            assert bad.value.error == "invalid_timeout"
            assert await client.send("d1", "0.01", method="sleep", timeout=5) == b"slept"
    async with AsyncClient(server.url, app_id, "wrong-secret") as wrong:
        with pytest.raises(Unauthorized) as denied:
            await wrong.send("d1", b"x")
        assert denied.value.status == 403


async def test_body_too_large(make_server: ServerFactory) -> None:
    server = await make_server(max_body_size=1024)
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        with pytest.raises(BodyTooLarge):
            await client.send("d1", b"x" * 4096)


async def test_unreachable_server() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", "app", "secret") as client:
        with pytest.raises(ServerUnavailable) as info:
            await client.devices()
    assert info.value.error == "unreachable"


async def test_shared_session(server: RunningServer, http: aiohttp.ClientSession) -> None:
    app_id, secret = await server.create_app()
    client = AsyncClient(server.url, app_id, secret, session=http)
    assert await client.devices() == []
    await client.close()
    assert not http.closed  # a session that was given is the caller's to close


async def test_sync_client_from_plain_code(server: RunningServer) -> None:
    app_id, secret = await server.create_app()

    def plain_sync_code() -> tuple[bytes, list[str], list[bytes], type[Exception]]:
        with Client(server.url, app_id, secret) as client:
            reply = client.send("d1", bytes(range(256)))
            devices = client.devices()
            assert client.device("d1")["device_id"] == "d1"
            assert client.info()["app_id"] == app_id
            # Several threads may share one Client.
            results: list[bytes] = []
            threads = [
                threading.Thread(target=lambda i=i: results.append(client.send("d1", str(i))))
                for i in range(8)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            try:
                client.send("nobody", b"")
            except BackchannelError as exc:
                error = type(exc)
        with pytest.raises(RuntimeError):
            client.send("d1", b"closed")
        return reply, devices, sorted(results), error

    async with echo_device(server, app_id, "d1"):
        reply, devices, results, error = await asyncio.to_thread(plain_sync_code)
    assert reply == bytes(range(256))
    assert devices == ["d1"]
    assert results == sorted(str(i).encode() for i in range(8))
    assert error is DeviceOffline


async def test_sync_client_detach(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with echo_device(server, app_id, "d1") as device:
        first = device.session_id
        client = Client(server.url, app_id, secret)
        try:
            await asyncio.to_thread(client.detach, "d1")
        finally:
            client.close()
            client.close()  # idempotent
        await wait_for(lambda: device.connected and device.session_id != first)


@pytest.mark.parametrize(
    ("status", "body", "cls", "error"),
    [
        (
            418,
            b'{"msg":"418","error":"device_offline","detail":"gone"}',
            DeviceOffline,
            "device_offline",
        ),
        (408, b'{"error":"timeout_before_delivery","timeout":1}', TimedOutBeforeDelivery, None),
        (408, b'{"error":"timeout_no_reply","timeout":1}', NoReply, None),
        (502, b'{"error":"device_error","detail":"ValueError: x"}', DeviceError, None),
        (403, b'{"error":"forbidden"}', Unauthorized, "forbidden"),
        (401, b'{"error":"unauthorized"}', Unauthorized, None),
        (404, b'{"error":"unknown_app"}', NotFound, "unknown_app"),
        (503, b'{"error":"shutting_down"}', ServerUnavailable, None),
        (502, b"<html>Bad Gateway</html>", ServerUnavailable, None),  # a proxy, not the server
        (429, b"", DeviceBusy, None),
        (500, b'{"error":"internal_error"}', BackchannelError, "internal_error"),
    ],
)
def test_error_from_response(
    status: int, body: bytes, cls: type[BackchannelError], error: str | None
) -> None:
    exc = error_from_response(status, body)
    assert isinstance(exc, cls)
    assert exc.status == status
    if error is not None:
        assert exc.error == error
    if b"detail" in body:
        assert exc.detail in ("gone", "ValueError: x")
