"""Socket2me tunnel tokens: issue, look up, refresh, and expire them on time.

Tokens live in the store (by hash), so they survive a restart and a client that comes back
with a still-valid token keeps its URL. Tokens in use are cached here with their expiry; one
task sleeps until the earliest expiry, then forgets the token and disconnects its client.
Tokens nobody uses are removed by a periodic sweep of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re

from backchannel.core.clock import Clock
from backchannel.core.credentials import hash_secret, new_tunnel_token
from backchannel.core.tunnels import TunnelRegistry
from backchannel.state.store import AlreadyExists, Store, TunnelToken

log = logging.getLogger(__name__)

# Anything else cannot be a token, so it is refused without touching the store.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


def token_hash(token: str) -> str:
    """The key a token is stored and registered under."""
    return hash_secret(token)


class TunnelTokens:
    """Token lifecycle on top of the store; drops a client when its token expires."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        lifetime: float,
        registry: TunnelRegistry,
        sweep_interval: float = 60.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self.lifetime = lifetime
        self._registry = registry
        self._sweep_interval = sweep_interval
        self._live: dict[str, TunnelToken] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def issue(self) -> str:
        """Create a token; return it (the only time it exists in plaintext)."""
        now = self._clock.time()
        while True:
            token = new_tunnel_token()
            try:
                await self._store.create_tunnel_token(
                    TunnelToken(token_hash(token), now, now + self.lifetime)
                )
            except AlreadyExists:  # pragma: no cover - 288 random bits
                continue
            return token

    async def lookup(self, token: str) -> TunnelToken | None:
        """The token's record while it is valid, else None (an expired one is forgotten)."""
        if not _TOKEN.fullmatch(token):
            return None
        key = token_hash(token)
        record = self._live.get(key)
        if record is None:
            record = await self._store.get_tunnel_token(key)
            if record is None:
                return None
            self._remember(record)
        if record.expires_at <= self._clock.time():
            await self._expire(key)
            return None
        return record

    async def refresh(self, token: str) -> TunnelToken | None:
        """Give a valid token a full lifetime from now; None when it is unknown or expired."""
        record = await self.lookup(token)
        if record is None:
            return None
        expires_at = self._clock.time() + self.lifetime
        if not await self._store.extend_tunnel_token(record.token_hash, expires_at):
            self._live.pop(record.token_hash, None)
            return None
        refreshed = TunnelToken(record.token_hash, record.created_at, expires_at)
        self._remember(refreshed)
        return refreshed

    async def revoke(self, token: str) -> bool:
        """Forget a token now and disconnect its client."""
        if not _TOKEN.fullmatch(token):
            return False
        key = token_hash(token)
        self._live.pop(key, None)
        self._registry.drop(key, "token revoked")
        return await self._store.delete_tunnel_token(key)

    def start(self) -> None:
        """Start the expiry task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._expire_loop(), name="tunnel-token-expiry"
            )

    async def stop(self) -> None:
        """Stop the expiry task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _remember(self, record: TunnelToken) -> None:
        self._live[record.token_hash] = record
        heapq.heappush(self._deadlines, (record.expires_at, record.token_hash))
        self._wake.set()

    async def _expire(self, key: str) -> None:
        self._live.pop(key, None)
        if self._registry.drop(key, "token expired"):
            log.info("tunnel token expired; its client was disconnected")
        try:
            await self._store.delete_tunnel_token(key)
        except Exception:
            log.exception("could not delete an expired tunnel token")

    async def _expire_loop(self) -> None:
        last_sweep = self._clock.monotonic()
        while True:
            self._wake.clear()
            now = self._clock.time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, key = heapq.heappop(self._deadlines)
                record = self._live.get(key)
                # Stale heap entries (refreshed or already gone tokens) are skipped here.
                if record is not None and record.expires_at <= now:
                    await self._expire(key)
            if self._clock.monotonic() - last_sweep >= self._sweep_interval:
                last_sweep = self._clock.monotonic()
                try:
                    gone = await self._store.delete_expired_tunnel_tokens(now)
                except Exception:
                    log.exception("sweeping expired tunnel tokens failed")
                else:
                    if gone:
                        log.info("swept %d expired tunnel tokens", gone)
            delay = self._sweep_interval
            if self._deadlines:
                delay = min(delay, max(0.0, self._deadlines[0][0] - self._clock.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
