"""The real Node ``socket.io-client`` as a Socket2me client, driven from pytest.

``node_runtime`` is a session fixture: it installs the pinned ``socket.io-client`` into
``tests/compat/node`` (``npm ci``) when it is missing or of another version, and skips when
Node or npm is unavailable (``CI=true`` turns that skip into a failure). ``node_client`` is a
factory fixture: it starts ``socket2me_client.js`` for a server URL and token, waits for its
``connect`` line and hands back a :class:`NodeClient`; every client is stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory

NODE_DIR = Path(__file__).parent / "node"
CLIENT_JS = NODE_DIR / "socket2me_client.js"
PACKAGE = "socket.io-client"

Event = dict[str, Any]


def _pinned_version() -> str:
    return str(json.loads((NODE_DIR / "package.json").read_text())["dependencies"][PACKAGE])


def _installed_version() -> str | None:
    manifest = NODE_DIR / "node_modules" / PACKAGE / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def node_runtime() -> str:
    """Path of the ``node`` executable, with the pinned socket.io-client installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"Node.js and npm are needed for the {PACKAGE} tests (node={node}, npm={npm})")
    pinned = _pinned_version()
    # A lock outside the tree: parallel pytest workers must not run npm in one directory.
    lock_path = Path(tempfile.gettempdir()) / "backchannel-node-compat.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() != pinned:
            verb = "ci" if (NODE_DIR / "package-lock.json").exists() else "install"
            args = [npm, verb, "--no-audit", "--no-fund"]
            try:
                done = subprocess.run(
                    args, cwd=NODE_DIR, capture_output=True, text=True, timeout=100
                )
            except subprocess.TimeoutExpired:
                pytest.skip(f"`npm {verb}` in {NODE_DIR} took more than 100 s")
            if done.returncode != 0:
                pytest.skip(
                    f"`npm {verb}` in {NODE_DIR} failed ({done.returncode}); is the registry "
                    f"reachable?\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            if _installed_version() != pinned:
                pytest.fail(f"npm installed {PACKAGE} {_installed_version()}, not {pinned}")
    return node


class NodeClient:
    """One ``socket2me_client.js`` process and the JSON lines it has printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[Event] = []
        self.stderr = b""
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "unparsable", "line": line.decode("replace")})
            self._changed.set()
        self.events.append({"event": "eof"})
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    def seen(self, event: str, **fields: Any) -> list[Event]:
        """The events named ``event`` whose ``fields`` have the given values."""
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_event(self, event: str, timeout: float = 5.0, **fields: Any) -> Event:
        """The first event named ``event`` (with ``fields``), waiting for it to be printed."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = self.seen(event, **fields)
                    if found:
                        return found[0]
                    if self.seen("eof"):
                        break
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pass
        await asyncio.sleep(0.05)  # let stderr arrive for the message
        raise AssertionError(
            f"node client {self.name!r} printed no {event} {fields or ''} "
            f"(exit status {self.proc.returncode}); events: {self.events}; "
            f"stderr: {self.stderr.decode(errors='replace')[-2000:]}"
        )

    async def wait_exit(self, timeout: float = 5.0) -> int:
        """Wait for the process to exit by itself; its exit status."""
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL: the TCP connection drops without a Socket.IO goodbye."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        """Close stdin (the client disconnects and exits), kill it if it lingers, reap it."""
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                async with asyncio.timeout(2):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


NodeClientFactory = Callable[..., Awaitable[NodeClient]]


@pytest.fixture
async def node_client(
    node_runtime: str, make_server: ServerFactory
) -> AsyncIterator[NodeClientFactory]:
    """Start Node clients: ``await node_client(server_url, token, wait="connect", ...)``.

    ``wait`` is the event to wait for before returning (``None``: do not wait); ``name`` tags
    the client's answers (``X-Client-Name``); ``transport`` forces ``polling`` or
    ``websocket``. The dependency on ``make_server`` makes the clients stop before the
    servers do.
    """
    clients: list[NodeClient] = []

    async def start(
        server_url: str,
        token: str,
        *,
        wait: str | None = "connect",
        name: str = "node",
        transport: str | None = None,
    ) -> NodeClient:
        args = [str(CLIENT_JS), server_url, token, "--name", name]
        if transport is not None:
            args += ["--transport", transport]
        proc = await asyncio.create_subprocess_exec(
            node_runtime,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=NODE_DIR,
        )
        client = NodeClient(proc, name)
        clients.append(client)
        if wait is not None:
            await client.wait_event(wait, timeout=10)
        return client

    try:
        yield start
    finally:
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
