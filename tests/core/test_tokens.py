"""core/tokens.py: Socket2me tokens in the store, their expiry, and the expiry task.

The store is the memory store and the clock is fake. The expiry task sleeps on the event
loop for as long as the clock says; after moving the fake clock, ``poke`` wakes the task the
way any new token in use does (a first lookup), so that it looks at the clock again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import pytest

from backchannel.core.clock import SystemClock
from backchannel.core.credentials import hash_secret
from backchannel.core.tokens import TunnelTokens, token_hash
from backchannel.core.tunnels import PublicRequest, PublicResponse, TunnelRegistry
from backchannel.state.memory import MemoryStore
from backchannel.state.store import TunnelToken
from tests.conftest import wait_for

LIFETIME = 100.0
EPS = 2.0**-10  # exact in binary: the clock lands exactly on the deadlines


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


class CountingStore(MemoryStore):
    """The memory store, counting the tunnel-token calls that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.token_calls = 0

    async def get_tunnel_token(self, token_hash: str) -> TunnelToken | None:
        self.token_calls += 1
        return await super().get_tunnel_token(token_hash)

    async def extend_tunnel_token(self, token_hash: str, expires_at: float) -> bool:
        self.token_calls += 1
        return await super().extend_tunnel_token(token_hash, expires_at)

    async def delete_tunnel_token(self, token_hash: str) -> bool:
        self.token_calls += 1
        return await super().delete_tunnel_token(token_hash)


class FakeClient:
    """A stand-in TunnelClient that records when (by the given clock) it was closed, and why."""

    kind = "fake"
    remote = "192.0.2.1"
    connected_at = 0.0

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.closed: list[tuple[str, float]] = []

    @property
    def in_flight(self) -> int:
        return 0

    async def forward(self, request: PublicRequest, timeout: float) -> PublicResponse:
        return PublicResponse(200, [], b"")

    def close(self, reason: str, *, takeover: bool = False) -> None:
        self.closed.append((reason, self._now()))


class Harness:
    def __init__(self, sweep_interval: float = 60.0) -> None:
        self.clock = FakeClock()
        self.store = CountingStore()
        self.registry = TunnelRegistry()
        self.tokens = TunnelTokens(
            self.store, self.clock, LIFETIME, self.registry, sweep_interval=sweep_interval
        )

    def client_for(self, token: str) -> FakeClient:
        client = FakeClient(self.clock.time)
        self.registry.attach(token_hash(token), client)
        return client

    async def stored(self, token: str) -> TunnelToken | None:
        return await MemoryStore.get_tunnel_token(self.store, token_hash(token))

    async def poke(self) -> None:
        """Wake the expiry task (a token looked up for the first time does) and let it run."""
        assert await self.tokens.lookup(await self.tokens.issue()) is not None
        await asyncio.sleep(0.05)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    await harness.store.open()
    yield harness
    await harness.tokens.stop()


async def test_issue(h: Harness) -> None:
    tokens = {await h.tokens.issue() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{48}", token)
    token = tokens.pop()
    # Stored by hash only, with a full lifetime from now.
    assert await MemoryStore.get_tunnel_token(h.store, token) is None
    assert await h.stored(token) == TunnelToken(
        hash_secret(token), h.clock.time(), h.clock.time() + LIFETIME
    )
    assert token_hash(token) == hash_secret(token)


async def test_lookup(h: Harness) -> None:
    token = await h.tokens.issue()
    record = await h.tokens.lookup(token)
    assert record is not None
    assert record.token_hash == token_hash(token)
    assert record.expires_at == h.clock.time() + LIFETIME
    assert await h.tokens.lookup("A" * 48) is None  # well-formed but unknown
    assert await h.tokens.lookup(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


async def test_lookup_after_a_restart_reads_the_store(h: Harness) -> None:
    token = await h.tokens.issue()
    again = TunnelTokens(h.store, h.clock, LIFETIME, TunnelRegistry())
    record = await again.lookup(token)
    assert record is not None
    assert record.token_hash == token_hash(token)


@pytest.mark.parametrize("cached", [False, True])
async def test_expired_token_is_none_and_deleted(h: Harness, cached: bool) -> None:
    token = await h.tokens.issue()
    if cached:
        assert await h.tokens.lookup(token) is not None
    h.clock.now += LIFETIME - EPS
    assert await h.tokens.lookup(token) is not None
    h.clock.now += EPS  # expires_at itself is expired
    assert await h.tokens.lookup(token) is None
    assert await h.stored(token) is None
    assert await h.tokens.lookup(token) is None
    assert await h.tokens.refresh(token) is None


async def test_lookup_of_an_expired_token_drops_its_client(h: Harness) -> None:
    token = await h.tokens.issue()
    assert await h.tokens.lookup(token) is not None
    client = h.client_for(token)
    h.clock.now += LIFETIME
    assert await h.tokens.lookup(token) is None
    assert [reason for reason, _ in client.closed] == ["token expired"]
    assert h.registry.get(token_hash(token)) is None


async def test_refresh(h: Harness) -> None:
    token = await h.tokens.issue()
    created = h.clock.time()
    h.clock.now += 60
    record = await h.tokens.refresh(token)
    assert record is not None
    assert record.created_at == created
    assert record.expires_at == h.clock.time() + LIFETIME
    stored = await h.stored(token)
    assert stored is not None and stored.expires_at == record.expires_at
    # Past the first lifetime, the token is still good.
    h.clock.now += LIFETIME - 1
    assert await h.tokens.lookup(token) is not None
    h.clock.now += 1
    assert await h.tokens.lookup(token) is None


async def test_refresh_unknown(h: Harness) -> None:
    assert await h.tokens.refresh("A" * 48) is None


async def test_refresh_of_a_token_deleted_behind_the_cache(h: Harness) -> None:
    token = await h.tokens.issue()
    assert await h.tokens.lookup(token) is not None  # cached now
    assert await h.store.delete_tunnel_token(token_hash(token))
    assert await h.tokens.refresh(token) is None
    # The cache forgot it too: the next lookup asks the store, which has nothing.
    assert await h.tokens.lookup(token) is None


async def test_revoke(h: Harness) -> None:
    token = await h.tokens.issue()
    assert await h.tokens.lookup(token) is not None
    client = h.client_for(token)
    assert await h.tokens.revoke(token) is True
    assert [reason for reason, _ in client.closed] == ["token revoked"]
    assert h.registry.get(token_hash(token)) is None
    assert await h.stored(token) is None
    assert await h.tokens.lookup(token) is None
    assert await h.tokens.revoke(token) is False


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("short", id="short"),
        pytest.param("A" * 15, id="15-chars"),
        pytest.param("A" * 129, id="129-chars"),
        pytest.param("A" * 40 + "/" + "A" * 7, id="slash"),
        pytest.param("A" * 40 + "%2F" + "A" * 5, id="percent"),
        pytest.param("A" * 40 + " " + "A" * 7, id="space"),
        pytest.param("A" * 40 + "." + "A" * 7, id="dot"),
        pytest.param("ü" * 48, id="non-ascii"),
        pytest.param("A" * 47 + "\x00", id="nul"),
        pytest.param("A" * 47 + "\n", id="trailing-newline"),
    ],
)
async def test_malformed_tokens_never_reach_the_store(h: Harness, token: str) -> None:
    assert await h.tokens.lookup(token) is None
    assert await h.tokens.refresh(token) is None
    assert await h.tokens.revoke(token) is False
    assert h.store.token_calls == 0
    # A well-formed token does reach it (the counter counts).
    assert await h.tokens.lookup("A" * 16) is None
    assert h.store.token_calls == 1


class TestExpiryTask:
    async def test_drops_the_client_exactly_at_expiry(self, h: Harness) -> None:
        h.tokens.start()
        token = await h.tokens.issue()
        record = await h.tokens.lookup(token)
        assert record is not None
        client = h.client_for(token)
        h.clock.now += LIFETIME - EPS
        await h.poke()
        assert client.closed == []
        assert h.registry.get(token_hash(token)) is client
        h.clock.now += EPS
        await h.poke()
        await wait_for(lambda: bool(client.closed))
        assert client.closed == [("token expired", record.expires_at)]
        assert h.registry.get(token_hash(token)) is None
        assert await h.stored(token) is None
        assert await h.tokens.lookup(token) is None

    async def test_refresh_postpones_the_drop(self, h: Harness) -> None:
        h.tokens.start()
        token = await h.tokens.issue()
        assert await h.tokens.lookup(token) is not None
        client = h.client_for(token)
        h.clock.now += 60
        refreshed = await h.tokens.refresh(token)
        assert refreshed is not None
        h.clock.now += LIFETIME - 60  # the first expiry: its deadline is stale now
        await h.poke()
        assert client.closed == []
        h.clock.now += 60 - EPS
        await h.poke()
        assert client.closed == []
        h.clock.now += EPS
        await h.poke()
        await wait_for(lambda: bool(client.closed))
        assert client.closed == [("token expired", refreshed.expires_at)]

    async def test_several_tokens_expire_in_order(self, h: Harness) -> None:
        h.tokens.start()
        clients = []
        for _ in range(3):
            token = await h.tokens.issue()
            assert await h.tokens.lookup(token) is not None
            clients.append(h.client_for(token))
            h.clock.now += 10
        # Issued at 0, 10 and 20 s, it is 30 s now: move to the second one's expiry.
        h.clock.now += LIFETIME - 20
        await h.poke()
        await wait_for(lambda: bool(clients[0].closed) and bool(clients[1].closed))
        assert clients[2].closed == []
        h.clock.now += 10
        await h.poke()
        await wait_for(lambda: bool(clients[2].closed))

    async def test_wakes_by_itself_on_the_real_clock(self) -> None:
        store = MemoryStore()
        await store.open()
        registry = TunnelRegistry()
        clock = SystemClock()
        tokens = TunnelTokens(store, clock, 0.3, registry)
        tokens.start()
        try:
            token = await tokens.issue()
            record = await tokens.lookup(token)
            assert record is not None
            client = FakeClient(clock.time)
            registry.attach(record.token_hash, client)
            await wait_for(lambda: bool(client.closed), timeout=3)
            reason, at = client.closed[0]
            assert reason == "token expired"
            assert record.expires_at <= at < record.expires_at + 0.5
        finally:
            await tokens.stop()

    async def test_stop(self, h: Harness) -> None:
        h.tokens.start()
        h.tokens.start()  # idempotent: one task
        token = await h.tokens.issue()
        assert await h.tokens.lookup(token) is not None
        client = h.client_for(token)
        await h.tokens.stop()
        await h.tokens.stop()
        h.clock.now += 2 * LIFETIME
        await h.poke()
        assert client.closed == []
        # Started again, it catches up at once.
        h.tokens.start()
        await wait_for(lambda: bool(client.closed))


async def test_periodic_sweep_removes_unused_expired_tokens() -> None:
    h = Harness(sweep_interval=0.05)
    await h.store.open()
    h.tokens.start()
    await asyncio.sleep(0.01)  # the task notes the time of its start; sweeps count from there
    try:
        old = await h.tokens.issue()  # never used: only the sweep can remove it
        h.clock.now += LIFETIME / 2
        young = await h.tokens.issue()
        h.clock.now += LIFETIME / 2 + 1
        # No pokes: the task wakes every sweep_interval by itself.
        async with asyncio.timeout(5):
            while await h.stored(old) is not None:  # noqa: ASYNC110 (polls the store)
                await asyncio.sleep(0.01)
        assert await h.stored(young) is not None
    finally:
        await h.tokens.stop()
