"""Devices that send events faster than the store writes them are slowed down, not dropped;
an acknowledged event is already stored."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from prometheus_client import REGISTRY

from backchannel.app import EVENTS
from backchannel.core.events import EventSettings
from tests.compat.cometa_device import CometaDevice
from tests.conftest import RunningServer, ServerFactory
from tests.rawdevice import connect


async def stored(
    server: RunningServer, http: aiohttp.ClientSession, app_id: str, type_: str = "n"
) -> list[bytes]:
    """Every stored event of one type of the app, via the JSON page of the event API."""
    out: list[bytes] = []
    after = 0
    while True:
        async with http.get(
            f"{server.url}/v1/applications/{app_id}/events?format=json&after={after}&limit=1000"
            f"&type={type_}",
            headers={"Authorization": f"Bearer {server.admin_token}"},
        ) as r:
            assert r.status == 200, await r.text()
            page = orjson.loads(await r.read())
        if not page["events"]:
            return out
        out += [e["data"].encode() for e in page["events"]]
        after = page["events"][-1]["id"]


def congestions() -> float:
    """How often the event log has paused devices, in this process."""
    return REGISTRY.get_sample_value("backchannel_event_log_congested_total") or 0.0


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
    before = congestions()
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
    assert congestions() > before  # the flood did fill the backlog: devices were paused
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


async def test_a_cometa_flood_is_slowed_not_dropped(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(store="sqlite", event_retention_count=100_000)
    server.runner.app[EVENTS].settings = EventSettings(retention_count=100_000, max_pending=200)
    app_id, _ = await server.create_app(allow_open_attach=True)
    port = int(server.url.rsplit(":", 1)[1])
    dev = await CometaDevice.attach(port, app_id, "AABBCC")
    total = 3000
    before = congestions()
    # Big enough events that one read of the socket holds fewer than the pause threshold
    # (the server checks the backlog after each read; Cometa has no frame-by-frame reader).
    pad = b"." * 2000
    for i in range(total):
        await dev.event(b"%d" % i + pad)
    deadline = time.monotonic() + 20
    while True:
        events = await stored(server, http, app_id, "message")
        if len(events) >= total or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert events == [b"%d" % i + pad for i in range(total)]
    assert congestions() > before
    dev.close()
