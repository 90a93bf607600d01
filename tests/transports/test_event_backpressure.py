"""Devices that send events faster than the store writes them are slowed down, not dropped;
an acknowledged event is already stored."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from backchannel.app import EVENTS
from backchannel.core.events import EventSettings
from tests.conftest import RunningServer, ServerFactory
from tests.rawdevice import connect


async def stored(server: RunningServer, http: aiohttp.ClientSession, app_id: str) -> list[bytes]:
    """Every stored event of the app, via the JSON page of the event API."""
    out: list[bytes] = []
    after = 0
    while True:
        async with http.get(
            f"{server.url}/v1/applications/{app_id}/events?format=json&after={after}&limit=1000"
            "&type=n",
            headers={"Authorization": f"Bearer {server.admin_token}"},
        ) as r:
            assert r.status == 200, await r.text()
            page = orjson.loads(await r.read())
        if not page["events"]:
            return out
        out += [e["data"].encode() for e in page["events"]]
        after = page["events"][-1]["id"]


async def test_a_flood_is_slowed_not_dropped(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(store="sqlite", event_retention_count=100_000)
    log = server.runner.app[EVENTS]
    # A small backlog, so that one device's burst congests the log many times over.
    log.settings = EventSettings(retention_count=100_000, max_pending=200)
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "d1")
    dev = await connect(http, server.ws_url, app_id, "d1", key)
    total = 5000
    frames = [dev.conn.event("n", b"%d" % i)[1] for i in range(total)]
    for frame in frames:
        await dev.ws.send_bytes(frame)
    deadline = time.monotonic() + 20
    while True:
        events = await stored(server, http, app_id)
        if len(events) >= total or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert events == [b"%d" % i for i in range(total)]
    await dev.ws.close()


async def test_ack_means_stored(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(store="sqlite")
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "d1")
    dev = (await connect(http, server.ws_url, app_id, "d1", key)).serve()
    for i in range(20):
        event_id = await dev.emit("n", b"%d" % i, ack=True)
        deadline = time.monotonic() + 5
        while event_id not in dev.acks:
            assert time.monotonic() < deadline, "no EVENT_ACK"
            await asyncio.sleep(0.001)
        # The ack arrived: the event must already be readable from the store.
        assert (await stored(server, http, app_id))[-1] == b"%d" % i
    await dev.close()
