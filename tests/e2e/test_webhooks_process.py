"""The webhook outbox across a SIGKILL: ``backchannel serve`` as a process, sqlite store."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import aiohttp

from backchannel import Device
from tests.conftest import ServerProcess
from tests.e2e.test_server_process import ServerProcessFactory, admin_post
from tests.webhook_receiver import Receiver

FLAGS = (
    "--webhook-backoff", "0.05",
    "--webhook-max-backoff", "0.2",
    "--webhook-max-attempts", "1000",
)  # fmt: skip
DEVICES = 3
EVENTS = 20  # per device


async def pending(http: aiohttp.ClientSession, sp: ServerProcess, app: dict[str, str]) -> int:
    url = f"{sp.url}/v1/applications/{app['app_id']}/webhooks"
    async with http.get(url, headers={"Authorization": f"Bearer {app['secret']}"}) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["pending"])


async def test_no_delivery_lost_across_sigkill(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    up = False

    async def answer(n: int) -> int:
        return 200 if up else 500

    receiver.answer = answer
    sp = server_process()
    sp.start(*FLAGS)
    app = await admin_post(
        http, sp.url + "/admin/v1/apps", {"name": "hooks", "webhook_url": receiver.url}
    )
    devices: list[Device] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for n in range(DEVICES):
            cred = await admin_post(http, f"{sp.url}/admin/v1/apps/{app['app_id']}/devices/d{n}")
            dev = Device(sp.url, app["app_id"], f"d{n}", cred["key"], backoff_max=0.5)
            tasks.append(asyncio.create_task(dev.serve()))
            await dev.wait_connected(5)
            devices.append(dev)
        for i in range(EVENTS):
            for n, dev in enumerate(devices):
                await dev.emit("n", f"d{n}:{i}".encode(), ack=True)
        # Every event is stored with its delivery, none delivered (the receiver fails).
        deadline = time.monotonic() + 10
        while await pending(http, sp, app) < DEVICES * EVENTS:
            assert time.monotonic() < deadline, "events not stored in time"
            await asyncio.sleep(0.05)
        assert receiver.hits and not receiver.ok()
        await asyncio.to_thread(sp.stop, signal.SIGKILL)
        up = True
        await asyncio.to_thread(sp.start, *FLAGS)
        deadline = time.monotonic() + 15
        want = {f"d{n}:{i}".encode() for n in range(DEVICES) for i in range(EVENTS)}
        while not want <= {h.body for h in receiver.ok()}:
            assert time.monotonic() < deadline, "deliveries lost across the restart"
            await asyncio.sleep(0.05)
    finally:
        for dev in devices:
            await dev.stop()
        for task in tasks:
            await asyncio.wait_for(task, 5)
        if sp.proc is not None:
            await asyncio.to_thread(sp.stop)
    counts = Counter(h.body for h in receiver.ok())
    duplicates = sum(c - 1 for c in counts.values())
    print(f"\n{len(want)} events, all delivered; {duplicates} duplicate deliveries")
    for n in range(DEVICES):  # per-device order, duplicates aside
        seen = [h.body for h in receiver.ok() if h.headers["X-Backchannel-Device"] == f"d{n}"]
        assert list(dict.fromkeys(seen)) == [f"d{n}:{i}".encode() for i in range(EVENTS)]
