"""A real local webhook receiver for tests: an aiohttp server that records every POST."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web


@dataclass
class Hit:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook endpoint; ``answer`` decides each status (default 200)."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    calls: int = 0
    answer: Callable[[int], Awaitable[int]] | None = None

    def ok(self) -> list[Hit]:
        return [h for h in self.hits if h.status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A running receiver at `receiver.url`; stopped after the test."""
    rec = Receiver()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        rec.calls += 1
        status = await rec.answer(len(rec.hits)) if rec.answer else 200
        rec.hits.append(Hit(dict(request.headers), body, status))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield rec
    await runner.cleanup()
