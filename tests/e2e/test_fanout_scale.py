"""A fan-out to 500 devices of mixed behaviour answers exactly, within one deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import aiohttp
import orjson

from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer
from tests.rawdevice import Handler, connect

FAST, OFFLINE, SLOW = 300, 100, 100
TIMEOUT = 1.0
SLOW_DELAY = 3.0  # longer than TIMEOUT: these devices reply too late


async def test_500_devices_replied_offline_and_timed_out(server: RunningServer) -> None:
    app_id, secret = await server.create_app("scale", allow_open_attach=True)
    fast = [f"fast-{i:03d}" for i in range(FAST)]
    offline = [f"off-{i:03d}" for i in range(OFFLINE)]
    slow = [f"slow-{i:03d}" for i in range(SLOW)]
    release = asyncio.Event()

    def answer(device_id: str) -> Handler:
        async def handler(call: Call) -> bytes:
            return f"{device_id}:{call.body.decode()}".encode()

        return handler

    async def late(call: Call) -> bytes:
        # Released at the end of the test so no handler outlives it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), SLOW_DELAY)
        return b"too late"

    # Each device holds a pooled connection: lift the client's default limit of 100.
    pool = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        devices = await asyncio.gather(
            *(connect(pool, server.ws_url, app_id, d, None) for d in fast + slow)
        )
        for device_id, dev in zip(fast + slow, devices, strict=True):
            dev.serve(answer(device_id) if device_id.startswith("fast") else late)
        assert len(server.relay.hub) == FAST + SLOW

        # Interleaved, so target order is not the same as grouping by behaviour.
        targets = [t for group in zip(fast[:100], offline, slow, strict=True) for t in group]
        targets += fast[100:]
        body = {"devices": targets, "message": "ping", "timeout": TIMEOUT}
        url = f"{server.url}/v1/applications/{app_id}/fanout"
        started = time.monotonic()
        async with pool.post(
            url, data=orjson.dumps(body), headers={"Authorization": f"OAuth {secret}"}
        ) as r:
            assert r.status == 200
            data = orjson.loads(await r.read())
        elapsed = time.monotonic() - started
    finally:
        release.set()
        await pool.close()

    assert elapsed < TIMEOUT + 1.0, elapsed
    assert (data["total"], data["replied"], data["offline"]) == (500, FAST, OFFLINE)
    assert (data["timed_out"], data["failed"], data["timeout"]) == (SLOW, 0, TIMEOUT)
    results = data["results"]
    assert [r["device"] for r in results] == targets
    statuses = Counter(r["status"] for r in results)
    assert statuses == {"replied": FAST, "offline": OFFLINE, "timeout": SLOW}
    for result in results:
        device_id = result["device"]
        if device_id.startswith("fast"):
            assert result["status"] == "replied"
            assert result["reply"] == f"{device_id}:ping"
        elif device_id.startswith("off"):
            assert (result["status"], result["error"]) == ("offline", "device_offline")
            assert result["ms"] < TIMEOUT * 1000
        else:
            assert (result["status"], result["error"]) == ("timeout", "timeout_no_reply")
            assert result["ms"] >= TIMEOUT * 1000
