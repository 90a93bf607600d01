"""The offline queue across a SIGKILL: ``backchannel serve`` as a process, sqlite store.

Messages are queued while the device is offline; the server is killed while it delivers
them; after the restart the device must get the rest, and no message may arrive twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import aiohttp

from backchannel import Device
from tests.e2e.test_server_process import ServerProcessFactory, admin_post

TOTAL = 200


async def states(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], ids: list[str]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for message_id in ids:
        async with http.get(f"{url}/messages/{message_id}", headers=auth) as r:
            assert r.status == 200, await r.text()
            out[message_id] = await r.json()
    return out


async def test_queued_messages_survive_sigkill_and_arrive_once(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start()
    app = await admin_post(http, sp.url + "/admin/v1/apps", {"name": "queue"})
    cred = await admin_post(http, f"{sp.url}/admin/v1/apps/{app['app_id']}/devices/d1")
    base = f"{sp.url}/v1/applications/{app['app_id']}"
    auth = {"Authorization": f"Bearer {app['secret']}"}
    ids: list[str] = []
    for i in range(TOTAL):
        async with http.post(
            f"{base}/devices/d1/send?offline=queue&ttl=600", data=f"m{i}".encode(), headers=auth
        ) as r:
            assert r.status == 202, await r.text()
            ids.append((await r.json())["message_id"])

    got: list[bytes] = []

    async def handle(body: bytes) -> bytes:
        got.append(body)
        await asyncio.sleep(0.005)  # slow enough that the kill lands mid-stream
        return b"ack:" + body

    dev = Device(sp.url, app["app_id"], "d1", cred["key"], backoff_initial=0.1, backoff_max=0.3)
    dev.add_handler(handle)
    task = asyncio.create_task(dev.serve())
    try:
        deadline = time.monotonic() + 15
        while len(got) < TOTAL // 4:
            assert time.monotonic() < deadline, f"only {len(got)} delivered before the kill"
            await asyncio.sleep(0.005)
        await asyncio.to_thread(sp.stop, signal.SIGKILL)
        before_kill = len(got)
        assert before_kill < TOTAL, "everything was delivered before the kill"
        await asyncio.to_thread(sp.start)
        deadline = time.monotonic() + 20
        while True:
            now = await states(http, base, auth, ids)
            if not {"queued", "sent"} & {m["state"] for m in now.values()}:
                break
            assert time.monotonic() < deadline, Counter(m["state"] for m in now.values())
            await asyncio.sleep(0.1)
    finally:
        await dev.stop()
        await asyncio.wait_for(task, 5)
        if sp.proc is not None:
            await asyncio.to_thread(sp.stop)
    counts = Counter(got)
    assert all(n == 1 for n in counts.values()), f"delivered twice: {counts.most_common(3)}"
    finals = Counter(m["state"] for m in now.values())
    # Only the one message in flight at the kill can have an unknown fate; it says so.
    assert finals["replied"] >= TOTAL - 1, finals
    assert set(finals) <= {"replied", "delivered"}, finals
    for n, message_id in enumerate(ids):
        message = now[message_id]
        if message["state"] == "replied":
            assert message["reply"] == f"ack:m{n}"
            assert f"m{n}".encode() in counts
        else:
            assert message["error"] == "interrupted", message
    # Order held across the restart: what the device got is a prefix-ordered sequence.
    order = [int(b[1:]) for b in got]
    assert order == sorted(order)
