"""The tunnel agent as a real process: ``backchannel expose`` end to end, and an agent
killed in the middle of a download."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import RunningServer, wait_for
from tests.e2e.tunnel_helpers import MiB, agent_process
from tests.tunnel_service import LocalService, tunnel_service


@pytest.fixture
async def local() -> AsyncIterator[LocalService]:
    async with tunnel_service() as svc:
        yield svc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_expose_cli_end_to_end(
    server: RunningServer, local: LocalService, http: aiohttp.ClientSession, sig: int
) -> None:
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "laptop")
    async with agent_process(
        server.url, app_id, "laptop", key, local.port, "--name", "cli-demo"
    ) as agent:
        url = agent.public_url
        assert re.fullmatch(re.escape(server.url) + r"/go/[A-Za-z0-9_-]{43}/", url), url
        assert any(line == "Tunnel cli-demo" for line in agent.lines), agent.lines
        await agent.wait_line(f"Forwarding to: http://localhost:{local.port}")
        async with http.get(url + "echo/hi?x=1") as r:
            assert r.status == 200
            echo = await r.json()
        assert (echo["path"], echo["query"]) == ("/echo/hi", "x=1")
        # The request log: time, method, path, status, duration, size.
        line = await agent.wait_line("/echo/hi?x=1")
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d GET /echo/hi\?x=1 200 \d+ ms \d+(\.\d)? [KM]?B", line
        ), line
        async with http.get(url + "status/404") as r:
            assert r.status == 404
        assert " 404 " in await agent.wait_line("/status/404")
        code = await agent.stop(sig)
        err = await agent.stderr()
    assert code == 0, err
    assert "Stopped." in err
    # Gone: the server says so.
    await wait_for(lambda: not server.relay.hub.get(app_id, "laptop"))
    async with http.get(url + "echo") as r:
        assert r.status == 502
        assert (await r.json())["error"] == "tunnel_offline"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_agent_killed_mid_download_cuts_the_response(
    server: RunningServer, local: LocalService, http: aiohttp.ClientSession, framing: str
) -> None:
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "doomed")
    size = 1024 * MiB
    query = "?chunked=1" if framing == "chunked" else ""
    async with agent_process(server.url, app_id, "doomed", key, local.port) as agent:
        received = 0
        async with http.get(agent.public_url + f"bytes/{size}{query}") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(10):  # a hang fails here, not at pytest's timeout
                    async for chunk in r.content.iter_any():
                        received += len(chunk)
                        if received >= 4 * MiB and agent.proc.returncode is None:
                            agent.kill(signal.SIGKILL)
                            killed_at = time.monotonic()
            cut_after = time.monotonic() - killed_at
        assert received < size
        print(f"\nagent killed at 4 MiB: response cut {cut_after * 1000:.0f} ms later")
        assert cut_after < 2.0
        await agent.proc.wait()
    # The server noticed: the tunnel is offline, not hanging.
    await wait_for(lambda: not server.relay.hub.get(app_id, "doomed"))
    async with http.get(agent.public_url + "echo") as r:
        assert r.status == 502
        assert (await r.json())["error"] == "tunnel_offline"
