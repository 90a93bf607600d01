"""examples/messaging/walkthrough.py runs as written against a real server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.conftest import RunningServer

EXAMPLE = Path(__file__).parents[2] / "examples" / "messaging" / "walkthrough.py"


async def test_walkthrough(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    _, key = await server.apps.provision(app_id, "thermostat-1", ("upstairs",))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), server.url, app_id, secret, key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith("1. queued msg_") and lines[0].endswith("(queued)")
    assert lines[1] == "2. replied: b'set to 22'"
    assert lines[2] == "3. published to 1 device(s); the thermostat got ['eco']"
    assert lines[3] == "4. fan-out: 1 replied: {'thermostat-1': b'22'}"
    assert lines[4] == "5. event temperature from thermostat-1: b'21.5'"
