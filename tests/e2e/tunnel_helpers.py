"""Shared pieces of the tunnel end-to-end tests (tests/e2e/test_tunnels*.py).

- :func:`tunnel_up`: an SDK :class:`~backchannel.Tunnel` serving in this process;
- :class:`AgentProcess`: ``backchannel expose`` as a real subprocess (to kill it, or to
  test the CLI);
- :class:`RssSampler`: a thread sampling a process's VmRSS from ``/proc`` every 100 ms;
- :func:`admin_setup`: an app and a device key on a subprocess server, over the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from backchannel import Tunnel
from tests.conftest import ADMIN_TOKEN

MiB = 1024 * 1024
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# -- the agent, in process -----------------------------------------------------------------


def make_tunnel(
    server_url: str, app_id: str, device_id: str, key: str, target: int | str, **kw: Any
) -> Tunnel:
    """A tunnel that reconnects quickly (tests restart servers under it)."""
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.3)
    return Tunnel(server_url, app_id, device_id, key, target, **kw)


@contextlib.asynccontextmanager
async def serving(tunnel: Tunnel, timeout: float = 5.0) -> AsyncIterator[asyncio.Task[None]]:
    """Serve ``tunnel`` until the block ends; yields the serve task (already ready)."""
    task = asyncio.get_running_loop().create_task(tunnel.serve())
    try:
        await tunnel.wait_ready(timeout)
        yield task
    finally:
        await tunnel.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def tunnel_up(
    server_url: str, app_id: str, device_id: str, key: str, target: int | str, **kw: Any
) -> AsyncIterator[Tunnel]:
    """``make_tunnel`` + ``serving``: the tunnel is up inside the block."""
    tunnel = make_tunnel(server_url, app_id, device_id, key, target, **kw)
    async with serving(tunnel):
        yield tunnel


# -- the agent, as a process ---------------------------------------------------------------


class AgentProcess:
    """``python -m backchannel expose TARGET`` with credentials in the environment."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []  # stdout so far
        self.public_url = ""

    @classmethod
    async def start(
        cls,
        server_url: str,
        app_id: str,
        device_id: str,
        key: str,
        target: int | str,
        *args: str,
        timeout: float = 15.0,
    ) -> AgentProcess:
        """Start it and wait for the ``Public URL:`` line."""
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "BACKCHANNEL_SERVER": server_url,
            "BACKCHANNEL_APP": app_id,
            "BACKCHANNEL_DEVICE": device_id,
            "BACKCHANNEL_KEY": key,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backchannel",
            "expose",
            str(target),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        agent = cls(proc)
        try:
            line = await agent.wait_line("Public URL:", timeout)
        except BaseException:
            agent.kill()
            await proc.wait()
            raise
        agent.public_url = line.split("Public URL:", 1)[1].strip()
        return agent

    async def wait_line(self, text: str, timeout: float = 5.0) -> str:
        """The first stdout line (seen so far or to come) containing ``text``."""
        for line in self.lines:
            if text in line:
                return line
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    err = await self.stderr()
                    raise AssertionError(f"agent exited before {text!r}: {self.lines} {err}")
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if text in line:
                    return line

    async def stderr(self) -> str:
        """What the agent wrote on stderr (once it exited)."""
        if self.proc.stderr is None or self.proc.returncode is None:
            return ""
        return (await self.proc.stderr.read()).decode(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process if it still runs."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal it and return its exit status (SIGKILL if it does not exit in time)."""
        self.kill(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
            raise AssertionError(f"agent did not exit in {timeout} s after {sig}") from None


@contextlib.asynccontextmanager
async def agent_process(*args: Any, **kw: Any) -> AsyncIterator[AgentProcess]:
    """:meth:`AgentProcess.start`, killed at the end whatever happened."""
    agent = await AgentProcess.start(*args, **kw)
    try:
        yield agent
    finally:
        agent.kill()
        await agent.proc.wait()


# -- memory --------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """The process's resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread (the event loop may
    be busy with the transfer; a thread keeps the sampling regular)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = vm_rss(pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.samples.append(vm_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        """The highest sample (the baseline if none)."""
        return max(self.samples, default=self.baseline)

    @property
    def growth(self) -> int:
        """Peak minus baseline, in bytes."""
        return self.peak - self.baseline

    def report(self) -> str:
        """One line for the test output."""
        return (
            f"server RSS baseline {self.baseline / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB "
            f"(+{self.growth / MiB:.1f} MiB) over {len(self.samples)} samples"
        )


# -- bodies --------------------------------------------------------------------------------


def random_body(size: int, seed: int = 1) -> bytes:
    """``size`` random bytes (reproducible)."""
    import random

    return random.Random(seed).randbytes(size)


def streamed_body(total: int, block: bytes, digest: Any) -> Iterator[bytes]:
    """``total`` bytes made of ``block`` (each repeat altered so no two MiB are equal),
    fed into ``digest`` as they are produced."""
    sent = 0
    counter = 0
    while sent < total:
        head = counter.to_bytes(8, "big")
        piece = (head + block[8:])[: total - sent]
        digest.update(piece)
        yield piece
        sent += len(piece)
        counter += 1


async def async_body(total: int, block: bytes, digest: Any) -> AsyncIterator[bytes]:
    """:func:`streamed_body` as an async generator (aiohttp streams it chunked)."""
    for piece in streamed_body(total, block, digest):
        yield piece


def sha256(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


# -- a subprocess server -------------------------------------------------------------------


async def admin_setup(
    http: aiohttp.ClientSession, server_url: str, device_id: str = "agent"
) -> tuple[str, str]:
    """Create an app and provision ``device_id`` over the admin API: (app_id, key)."""
    async with http.post(
        server_url + "/admin/v1/apps", json={"name": "tunnels"}, headers=ADMIN
    ) as r:
        assert r.status == 201, await r.text()
        app_id = (await r.json())["app_id"]
    async with http.post(
        f"{server_url}/admin/v1/apps/{app_id}/devices/{device_id}", headers=ADMIN
    ) as r:
        assert r.status == 201, await r.text()
        key = (await r.json())["key"]
    return app_id, key
