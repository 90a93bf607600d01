"""Many calls in flight on one connection, and many devices at once."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer
from tests.rawdevice import connect


async def jittery_echo(call: Call) -> bytes:
    """Answer out of order, so replies must be matched by id, not by arrival."""
    await asyncio.sleep(random.random() * 0.05)
    return b"re:" + call.body


async def test_1000_concurrent_calls_to_one_device(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, "busy")
    (await connect(http, server.ws_url, app_id, "busy", key)).serve(jittery_echo)
    url = f"{server.url}/v1/applications/{app_id}/devices/busy/send"
    headers = {"Authorization": f"OAuth {secret}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(i: int) -> tuple[int, bytes, bytes]:
            body = f"call-{i}".encode()
            async with client.post(url, data=body, headers=headers) as r:
                return r.status, body, await r.read()

        results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert all(status == 200 for status, _, _ in results)
    assert all(reply == b"re:" + body for _, body, reply in results)
    session = server.relay.hub.get(app_id, "busy")
    assert session is not None
    assert session.in_flight() == 0


async def test_200_devices_at_once(server: RunningServer, http: aiohttp.ClientSession) -> None:
    app_id, secret = await server.create_app()
    ids = [f"dev-{i:03d}" for i in range(200)]
    keys = [await server.provision(app_id, d) for d in ids]

    async def answer_with_id(call: Call) -> bytes:
        return call.body

    # Each device holds a pooled connection: lift the client's default limit of 100.
    pool = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    devices = await asyncio.gather(
        *(connect(pool, server.ws_url, app_id, d, k) for d, k in zip(ids, keys, strict=True))
    )
    for dev in devices:
        dev.serve(answer_with_id)
    assert len(server.relay.hub) == 200
    headers = {"Authorization": f"OAuth {secret}"}

    async def one(device_id: str) -> tuple[str, int, bytes]:
        url = f"{server.url}/v1/applications/{app_id}/devices/{device_id}/send"
        async with http.post(url, data=device_id.encode(), headers=headers) as r:
            return device_id, r.status, await r.read()

    results = await asyncio.gather(*(one(d) for d in ids for _ in range(3)))
    assert all(status == 200 and reply == d.encode() for d, status, reply in results)
    async with http.get(f"{server.url}/v1/applications/{app_id}/devices", headers=headers) as r:
        listed = await r.json()
    assert listed["num_devices"] == 200
    assert listed["devices"] == sorted(ids)
    await pool.close()
