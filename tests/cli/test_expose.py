"""``backchannel expose``: argument checks, refusals, and a real run against a real server."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from backchannel import Tunnel
from backchannel.cli.expose import RequestLog, human_size
from backchannel.cli.main import cli
from backchannel.core.session import CloseReason
from tests.conftest import RunningServer, ServerFactory
from tests.tunnel_service import LocalService, tunnel_service

ENV_CLEAR: dict[str, str | None] = {
    name: None
    for name in (
        "BACKCHANNEL_SERVER",
        "BACKCHANNEL_APP",
        "BACKCHANNEL_DEVICE",
        "BACKCHANNEL_KEY",
        "BACKCHANNEL_DEVICE_KEY",
    )
}
CREDS = ("--app", "app1", "--device", "dev1")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env={**ENV_CLEAR, **(env or {})})


@pytest.fixture
async def local() -> AsyncIterator[LocalService]:
    async with tunnel_service() as svc:
        yield svc


def test_listed_and_help() -> None:
    assert "expose" in invoke("--help").output
    result = invoke("expose", "--help")
    assert result.exit_code == 0
    for text in (
        "PORT|URL",
        "--server",
        "BACKCHANNEL_SERVER",
        "--app",
        "BACKCHANNEL_APP",
        "--device",
        "BACKCHANNEL_DEVICE",
        "--key",
        "BACKCHANNEL_KEY",
        "--name",
        "--auth",
        "--bearer",
        "--allow-ip",
        "--deny-ip",
        "--rate-limit",
        "--rewrite-host",
        "http://127.0.0.1:8080",
    ):
        assert text in result.output, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("3000", "--device", "d"), "Missing option '--app'"),
        (("3000", "--app", "a"), "Missing option '--device'"),
        ((*CREDS,), "Missing argument 'PORT|URL'"),
        (("ftp://host", *CREDS), "http(s)"),
        (("99999", *CREDS), "out of range"),
        (("http://h/?q=1", *CREDS), "must not have a query"),
        (("3000", *CREDS, "--name", "Not_A_Label"), "invalid tunnel name"),
        (("3000", *CREDS, "--auth", "nopassword"), "user:password"),
        (("3000", *CREDS, "--allow-ip", "10.0.0.0/8,nope"), "'nope' is not an IP"),
        (("3000", *CREDS, "--deny-ip", "300.1.1.1"), "not an IP"),
        (("3000", *CREDS, "--rate-limit", "0"), "positive"),
        (("3000", *CREDS, "--rate-limit", "many"), "not a valid float"),
        (("3000", *CREDS, "--server", "ftp://relay"), "http(s)://"),
    ],
)
def test_bad_arguments(args: tuple[str, ...], message: str) -> None:
    result = invoke("expose", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_sizes_and_log_lines() -> None:
    assert [human_size(n) for n in (0, 512, 1536, 5 << 20, 3 << 30)] == [
        "0 B",
        "512 B",
        "1.5 KB",
        "5.0 MB",
        "3.0 GB",
    ]
    out = io.StringIO()
    log = RequestLog(Console(file=out, force_terminal=False))
    plain, styled = log.line("GET", "/a/[b]?x=1", 200, 0.0123, 2048)
    assert re.fullmatch(r"\d\d:\d\d:\d\d GET /a/\[b\]\?x=1 200 12 ms 2\.0 KB", plain)
    assert "/a/[b]?x=1" in styled.plain  # user text, not markup
    tty = io.StringIO()
    RequestLog(Console(file=tty, force_terminal=True, width=200))("POST", "/[x]", 502, 1.5, 10)
    assert "\x1b[" in tty.getvalue() and "/[x]" in tty.getvalue()


def agent_env(server: RunningServer, app_id: str, device_id: str, key: str) -> dict[str, str]:
    return {
        "BACKCHANNEL_SERVER": server.url,
        "BACKCHANNEL_APP": app_id,
        "BACKCHANNEL_DEVICE": device_id,
        "BACKCHANNEL_KEY": key,
    }


async def test_refused_tunnel_exits_1(server: RunningServer, local: LocalService) -> None:
    app_id, _ = await server.create_app()
    # dev1 takes the name first; names stay with the credential that used them first.
    first = Tunnel(
        server.url, app_id, "dev1", await server.provision(app_id, "dev1"), 1, name="demo"
    )
    task = asyncio.get_running_loop().create_task(first.serve())
    await first.wait_ready(5)
    await first.stop()
    await task
    key = await server.provision(app_id, "dev2")
    result = await asyncio.to_thread(
        invoke,
        "expose",
        str(local.port),
        "--name",
        "demo",
        env=agent_env(server, app_id, "dev2", key),
    )
    assert result.exit_code == 1, result.output
    assert "the server refused the tunnel: the tunnel name 'demo' is reserved" in result.stderr


async def test_auth_failure_exits_1(server: RunningServer, local: LocalService) -> None:
    app_id, _ = await server.create_app()
    await server.provision(app_id, "dev1")
    env = agent_env(server, app_id, "dev1", "not-the-key")
    result = await asyncio.to_thread(invoke, "expose", str(local.port), env=env)
    assert result.exit_code == 1, result.output
    assert "refused the credentials: authentication failed: bad_key" in result.stderr


async def _line(stream: asyncio.StreamReader, pattern: str, timeout: float = 10) -> str:
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"output ended before {pattern!r}")
            line = raw.decode().rstrip("\n")
            if re.search(pattern, line):
                return line


async def test_runs_logs_and_stops_on_sigterm(
    make_server: ServerFactory, local: LocalService
) -> None:
    server = await make_server(domain="tunnels.test")
    app_id, _ = await server.create_app()
    key = await server.provision(app_id, "dev1")
    env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAR}
    env.update(PYTHONUNBUFFERED="1", BACKCHANNEL_KEY=key)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backchannel",
        "expose",
        str(local.port),
        "--server",
        server.url,
        "--app",
        app_id,
        "--device",
        "dev1",
        "--name",
        "demo",
        "--auth",
        "u:p",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await _line(proc.stdout, "^Public URL: ")
        url = line.removeprefix("Public URL: ")
        assert re.fullmatch(rf"{re.escape(server.url)}/go/[^/]+/", url), line
        await _line(proc.stdout, "^Host URL: http://demo.tunnels.test:")
        await _line(proc.stdout, f"^Forwarding to: http://localhost:{local.port}$")

        auth = {"Authorization": aiohttp.encode_basic_auth("u", "p")}
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "echo?x=1") as resp:
                assert resp.status == 401  # --auth reached the server
            async with http.get(url + "echo?x=1", headers=auth) as resp:
                assert resp.status == 200
            line = await _line(proc.stdout, "GET ")
            assert re.fullmatch(r"\d\d:\d\d:\d\d GET /echo\?x=1 200 \d+ ms \d+ B", line), line
            async with http.get(url + "status/404", headers=auth) as resp:
                assert resp.status == 404
            assert " 404 " in await _line(proc.stdout, "GET /status/404")

            # A dropped connection (the server closes it, 1001) comes back with the same URL.
            session = server.relay.hub.get(app_id, "dev1")
            assert session is not None
            await session.close(CloseReason.SHUTDOWN, "restarting")
            await _line(proc.stderr, "back online")
            async with http.get(url + "status/200", headers=auth) as resp:
                assert resp.status == 200

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await proc.wait()
        rest = (await proc.stderr.read()).decode()
        assert code == 0, rest
        assert "Stopped." in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
