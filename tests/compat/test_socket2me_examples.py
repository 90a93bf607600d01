"""The examples in docs/socket2me.md run as written, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.compat.node_client import NODE_DIR, node_runtime
from tests.conftest import RunningServer

__all__ = ["node_runtime"]  # the fixture, re-exported for pytest

EXAMPLES = Path(__file__).parents[2] / "examples" / "socket2me"


async def run_example(args: list[str], server: RunningServer, env: dict[str, str]) -> None:
    """Start an example client, call its public URL, and check the answer."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        server.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        assert line.startswith("public URL: "), line
        url = line.removeprefix("public URL: ")
        assert url.startswith(f"{server.url}/go/") and url.endswith("/")
        async with aiohttp.ClientSession() as http:
            # The client may still be connecting: 502 until it is.
            for _ in range(100):
                async with http.get(url + "hello?name=you") as resp:
                    status, text, headers = resp.status, await resp.text(), resp.headers
                if status != 502:
                    break
                await asyncio.sleep(0.1)
            assert (status, text) == (200, "Hello from behind NAT: GET /hello")
            assert headers["X-Provided-By"] == "Socket2Me"
            assert headers["X-Example"] in ("py", "js")
        logged = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        assert logged.startswith("GET /hello")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_python_example(server: RunningServer) -> None:
    await run_example([sys.executable, str(EXAMPLES / "client.py")], server, {})


@pytest.mark.usefixtures("node_runtime")
async def test_node_example(server: RunningServer, node_runtime: str) -> None:
    # The test setup installed socket.io-client under tests/compat/node (`npm install`
    # stands in for it in the docs).
    env = {"NODE_PATH": str(NODE_DIR / "node_modules")}
    await run_example([node_runtime, str(EXAMPLES / "client.js")], server, env)
