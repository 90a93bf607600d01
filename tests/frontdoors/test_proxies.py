"""``trusted_proxies``: per-client limits and addresses behind a reverse proxy."""

from __future__ import annotations

import aiohttp
import orjson

from backchannel.config import load_config
from tests.conftest import ServerFactory
from tests.rawdevice import connect


async def new_tokens(http: aiohttp.ClientSession, url: str, clients: int) -> list[int]:
    """One ``GET /new`` per pretended client, each with its own X-Forwarded-For."""
    statuses = []
    for n in range(clients):
        headers = {"X-Forwarded-For": f"198.51.100.{n + 1}"}
        async with http.get(url + "/new", headers=headers) as r:
            statuses.append(r.status)
    return statuses


async def test_each_client_behind_the_proxy_has_its_own_bucket(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    # /new allows a burst of 20 per client: 30 distinct clients all pass.
    trusting = await make_server(trusted_proxies=["127.0.0.1"])
    assert set(await new_tokens(http, trusting.url, 30)) == {200}


async def test_an_untrusted_peer_cannot_choose_its_address(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    plain = await make_server()
    statuses = await new_tokens(http, plain.url, 30)
    assert statuses[:20] == [200] * 20
    assert 429 in statuses[20:]


async def test_presence_shows_the_client_address(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(trusted_proxies=["127.0.0.0/8"])
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, "d1")
    dev = await connect(
        http, server.ws_url, app_id, "d1", key, extra_headers={"X-Forwarded-For": "203.0.113.7"}
    )
    async with http.get(
        f"{server.url}/v1/applications/{app_id}/devices/d1",
        headers={"Authorization": f"OAuth {secret}"},
    ) as r:
        presence = orjson.loads(await r.read())
    assert presence["ip_address"] == "203.0.113.7"
    await dev.ws.close()


def test_bad_trusted_proxy_is_refused() -> None:
    try:
        load_config(trusted_proxies=["10.0.0.0/8", "proxy.example"])
    except ValueError as exc:
        assert "proxy.example" in str(exc)
    else:
        raise AssertionError("a bad trusted_proxies entry was accepted")
