"""The broker contract, run against every implementation (memory now; Redis beside it later)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backchannel.core.outcomes import DeviceOffline
from backchannel.routing.broker import Broker
from backchannel.routing.memory import MemoryBroker


@pytest.fixture(params=["memory"])  # a "redis" factory joins here with cluster mode
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b = MemoryBroker("node-a")
    await b.start()
    yield b
    await b.stop()


async def test_claim_owner_release(broker: Broker) -> None:
    assert await broker.owner("app", "d") is None
    await broker.claim("app", "d", "s1")
    assert await broker.owner("app", "d") == broker.node_id
    await broker.release("app", "d", "s1")
    assert await broker.owner("app", "d") is None


async def test_release_by_replaced_session_keeps_successor(broker: Broker) -> None:
    await broker.claim("app", "d", "old")
    await broker.claim("app", "d", "new")
    await broker.release("app", "d", "old")
    assert await broker.owner("app", "d") == broker.node_id
    await broker.release("app", "d", "new")
    assert await broker.owner("app", "d") is None


async def test_list_devices_is_per_app_and_sorted(broker: Broker) -> None:
    for device_id in ("c", "a", "b"):
        await broker.claim("app1", device_id, f"s-{device_id}")
    await broker.claim("app2", "z", "s-z")
    assert await broker.list_devices("app1") == ["a", "b", "c"]
    assert await broker.list_devices("app2") == ["z"]
    assert await broker.list_devices("none") == []


async def test_forwarding_to_a_node_without_the_device(broker: Broker) -> None:
    with pytest.raises(DeviceOffline):
        await broker.forward_call("elsewhere", "app", "d", b"x", "", 1.0)
    assert await broker.forward_detach("elsewhere", "app", "d") is False
    assert await broker.forward_presence("elsewhere", "app", "d") is None
