"""The event stream across a real server restart: ``backchannel serve`` as a process."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from backchannel import AsyncClient, Device
from backchannel.sdk import Event
from tests.conftest import wait_for
from tests.e2e.test_server_process import ServerProcessFactory, admin_post


async def test_sdk_stream_resumes_across_a_restart(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start("--event-retention-count", "1000")
    app = await admin_post(http, sp.url + "/admin/v1/apps", {"name": "events"})
    cred = await admin_post(http, f"{sp.url}/admin/v1/apps/{app['app_id']}/devices/d1")
    device = Device(sp.url, app["app_id"], "d1", cred["key"], backoff_initial=0.05, backoff_max=0.5)
    serving = asyncio.create_task(device.serve())
    await device.wait_connected(5)
    got: list[Event] = []

    async def consume() -> None:
        async with AsyncClient(sp.url, app["app_id"], app["secret"]) as client:
            async for event in client.events(after=0, types=["n", "presence"]):
                got.append(event)

    consumer = asyncio.create_task(consume())
    try:
        for n in range(50):
            await device.emit("n", b"%d" % n, ack=True)
        await wait_for(lambda: len(got) == 51)  # online + 50
        # The process stops in a thread, so the device and the client in this loop see it.
        await asyncio.to_thread(sp.stop, signal.SIGTERM)
        await asyncio.to_thread(sp.start)
        await device.wait_connected(10)
        for n in range(50, 100):
            await device.emit("n", b"%d" % n, ack=True)
        await wait_for(lambda: len(got) == 103, timeout=15)  # + offline, online, 50
    finally:
        consumer.cancel()
        await device.stop()
        await asyncio.wait_for(serving, 5)
        await asyncio.to_thread(sp.stop)
    numbers = [e.data for e in got if e.type == "n"]
    assert numbers == [b"%d" % n for n in range(100)]
    assert [e.id for e in got] == sorted({e.id for e in got})
    changes = [(e.json()["online"], e.json()["reason"]) for e in got if e.type == "presence"]
    assert changes == [(True, None), (False, "server_shutdown"), (True, None)]
