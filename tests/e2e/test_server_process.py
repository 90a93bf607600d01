"""``backchannel serve`` as a real process: first start, restart, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp

from backchannel.wire.native.frames import Call
from tests.conftest import ADMIN_TOKEN, ServerProcess
from tests.rawdevice import connect

ServerProcessFactory = Callable[[], ServerProcess]


async def admin_post(http: aiohttp.ClientSession, url: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.post(url, json=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def test_generated_admin_token_is_printed_once(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start(admin_token=None)
    await asyncio.sleep(0.3)
    out = sp.stop()
    lines = out.splitlines()
    marker = next(i for i, line in enumerate(lines) if "Admin token" in line)
    token = lines[marker + 2].strip()
    assert len(token) >= 43
    # Not in any log line, only in the banner.
    assert sum(token in line for line in lines) == 1
    # Second start: stored (hashed), not printed again, and still valid.
    sp.start(admin_token=None)
    async with http.get(
        sp.url + "/admin/v1/apps", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 200
    out = sp.stop()
    assert "Admin token" not in out
    assert token not in out
    db = (sp.data_dir / "backchannel.db").read_bytes()
    assert token.encode() not in db


async def test_apps_and_keys_survive_restart(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start()
    app = await admin_post(http, sp.url + "/admin/v1/apps", {"name": "persisted"})
    cred = await admin_post(http, f"{sp.url}/admin/v1/apps/{app['app_id']}/devices/d1")
    sp.stop()
    db = (sp.data_dir / "backchannel.db").read_bytes()
    assert app["secret"].encode() not in db
    assert cred["key"].encode() not in db

    sp.start()
    dev = (await connect(http, sp.url + "/v1/connect", app["app_id"], "d1", cred["key"])).serve()
    url = f"{sp.url}/v1/applications/{app['app_id']}/devices/d1/send"
    async with http.post(
        url, data=b"still here", headers={"Authorization": f"OAuth {app['secret']}"}
    ) as r:
        assert r.status == 200
        assert await r.read() == b"still here"
    await dev.close()
    sp.stop()


async def test_graceful_shutdown_finishes_calls_in_flight(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start("--shutdown-grace", "5")
    app = await admin_post(http, sp.url + "/admin/v1/apps", {"name": "g"})
    cred = await admin_post(http, f"{sp.url}/admin/v1/apps/{app['app_id']}/devices/d1")

    async def slow(call: Call) -> bytes:
        await asyncio.sleep(1.0)
        return b"done:" + call.body

    dev = (await connect(http, sp.url + "/v1/connect", app["app_id"], "d1", cred["key"])).serve(
        slow
    )
    url = f"{sp.url}/v1/applications/{app['app_id']}/devices/d1/send"

    async def call() -> tuple[int, bytes]:
        async with http.post(
            url, data=b"x", headers={"Authorization": f"OAuth {app['secret']}"}
        ) as r:
            return r.status, await r.read()

    pending = asyncio.ensure_future(call())
    await asyncio.sleep(0.3)
    assert sp.proc is not None
    sp.proc.send_signal(signal.SIGTERM)
    assert await pending == (200, b"done:x")
    assert await dev.wait_closed(timeout=10) == 1001
    out = await asyncio.to_thread(sp.stop)
    assert "shutting down" in out
    assert sp.proc is None


async def test_access_log_omits_query_strings(
    server_process: ServerProcessFactory, http: aiohttp.ClientSession
) -> None:
    sp = server_process()
    sp.start("--access-log")
    async with http.get(sp.url + "/v1/connect?app=a&device=d&key=SECRETKEY") as r:
        assert r.status == 400
    out = sp.stop()
    line = next(line for line in out.splitlines() if "/v1/connect" in line)
    assert '"GET /v1/connect"' in line
    assert "SECRETKEY" not in out
