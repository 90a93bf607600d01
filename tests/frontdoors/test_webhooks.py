"""Event webhooks to a real local receiver (COMPAT.md, "Webhook"), and their verification."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote

import aiohttp
import pytest
from prometheus_client import REGISTRY

from backchannel.app import WEBHOOKS
from backchannel.core.clock import SystemClock
from backchannel.frontdoors.webhooks import Webhooks
from backchannel.sdk.webhooks import signing_key, verify_webhook
from tests.conftest import RunningServer, free_port, wait_for
from tests.rawdevice import RawDevice, connect
from tests.webhook_receiver import Receiver


async def device(
    server: RunningServer, http: aiohttp.ClientSession, app_id: str, device_id: str = "dev1"
) -> RawDevice:
    key = await server.provision(app_id, device_id)
    dev = await connect(http, server.ws_url, app_id, device_id, key)
    await wait_for(lambda: server.relay.hub.get(app_id, device_id) is not None)
    return dev


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(f"backchannel_webhook_{name}_total") or 0.0


class TestDelivery:
    """The built-in dispatcher, as wired by the composition root."""

    async def test_body_headers_and_signature(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app_id, secret = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        data = bytes(range(256)) + b"\r\n\x00"
        delivered = metric("delivered")
        await dev.emit("température 1", data)
        await wait_for(lambda: len(receiver.hits) == 1)
        hit = receiver.hits[0]
        assert hit.body == data
        h = hit.headers
        assert h["Content-Type"] == "application/octet-stream"
        assert h["X-Backchannel-App"] == app_id
        assert h["X-Backchannel-Device"] == "dev1"
        assert h["X-Backchannel-Event"] == "temp%C3%A9rature%201"
        assert unquote(h["X-Backchannel-Event"]) == "température 1"
        assert abs(int(h["X-Backchannel-Timestamp"]) - time.time()) < 5
        assert re.fullmatch(r"[0-9a-f]{32}", h["X-Backchannel-Delivery"])
        assert re.fullmatch(r"sha256=[0-9a-f]{64}", h["X-Backchannel-Signature"])
        ts, sig = h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
        assert verify_webhook(secret, hit.body, ts, sig)
        assert not verify_webhook("wrong" + secret, hit.body, ts, sig)
        assert not verify_webhook(secret, hit.body + b"x", ts, sig)
        assert not verify_webhook(secret, hit.body, str(int(ts) + 1), sig)
        assert metric("delivered") == delivered + 1
        await dev.close()

    async def test_empty_name_and_empty_body(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app_id, secret = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        await dev.emit("", b"")
        await wait_for(lambda: len(receiver.hits) == 1)
        hit = receiver.hits[0]
        assert (hit.body, hit.headers["X-Backchannel-Event"]) == (b"", "")
        h = hit.headers
        assert verify_webhook(
            secret, b"", h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
        )
        await dev.close()

    async def test_app_without_webhook_gets_nothing(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        quiet_id, _ = await server.create_app("quiet")
        hooked_id, _ = await server.create_app("hooked", webhook_url=receiver.url)
        quiet = await device(server, http, quiet_id)
        hooked = await device(server, http, hooked_id)
        await quiet.emit("e", b"never posted")
        await quiet.emit("e", b"never posted either")
        await hooked.emit("e", b"posted")
        await wait_for(lambda: len(receiver.hits) == 1)
        await asyncio.sleep(0.2)
        assert [h.body for h in receiver.hits] == [b"posted"]
        assert {h.headers["X-Backchannel-App"] for h in receiver.hits} == {hooked_id}
        await quiet.close()
        await hooked.close()


@pytest.fixture
async def fast_hooks(server: RunningServer) -> AsyncIterator[Webhooks]:
    """A dispatcher with millisecond backoff instead of the server's own."""
    await server.runner.app[WEBHOOKS].stop()  # a stopped dispatcher ignores events
    hooks = Webhooks(
        server.apps, SystemClock(), backoff=0.01, max_backoff=0.04, attempts=4, lanes=2
    )
    await hooks.start()
    server.relay.on_event(hooks.on_event)
    yield hooks
    await hooks.stop()


class TestRetries:
    """Backoff, per-device order, giving up, and the bounded queue."""

    async def test_retries_then_delivers_in_order(
        self,
        server: RunningServer,
        http: aiohttp.ClientSession,
        receiver: Receiver,
        fast_hooks: Webhooks,
    ) -> None:
        async def flaky(n: int) -> int:
            return 500 if n < 2 else 200

        receiver.answer = flaky
        app_id, secret = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        other = await device(server, http, app_id, "dev2")
        for i in range(20):
            await dev.emit("seq", str(i).encode())
            await other.emit("seq", f"other {i}".encode())
        await wait_for(lambda: len(receiver.ok()) == 40)
        by_device = [h.body for h in receiver.ok() if h.headers["X-Backchannel-Device"] == "dev1"]
        assert by_device == [str(i).encode() for i in range(20)]
        others = [h.body for h in receiver.ok() if h.headers["X-Backchannel-Device"] == "dev2"]
        assert others == [f"other {i}".encode() for i in range(20)]
        failed = [h for h in receiver.hits if h.status == 500]
        assert len(failed) == 2
        ok_ids = [h.headers["X-Backchannel-Delivery"] for h in receiver.ok()]
        assert len(set(ok_ids)) == 40
        for hit in failed:  # retried under the same delivery id, and taken exactly once
            assert ok_ids.count(hit.headers["X-Backchannel-Delivery"]) == 1
        for hit in receiver.hits:
            h = hit.headers
            ts, sig = h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
            assert verify_webhook(secret, hit.body, ts, sig)
        await dev.close()
        await other.close()

    async def test_gives_up_after_the_attempts(
        self,
        server: RunningServer,
        http: aiohttp.ClientSession,
        receiver: Receiver,
        fast_hooks: Webhooks,
    ) -> None:
        async def down(n: int) -> int:
            return 503

        receiver.answer = down
        app_id, _ = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        failed = metric("failed")
        await dev.emit("e", b"lost")
        await wait_for(lambda: metric("failed") == failed + 1)
        assert len(receiver.hits) == 4
        await dev.close()

    async def test_unreachable_receiver_counts_as_failure(
        self, server: RunningServer, http: aiohttp.ClientSession, fast_hooks: Webhooks
    ) -> None:
        app_id, _ = await server.create_app(webhook_url=f"http://127.0.0.1:{free_port()}/x")
        dev = await device(server, http, app_id)
        failed = metric("failed")
        await dev.emit("e", b"nowhere")
        await wait_for(lambda: metric("failed") == failed + 1)
        await dev.close()

    async def test_full_queue_drops_the_oldest(
        self, server: RunningServer, receiver: Receiver
    ) -> None:
        release = asyncio.Event()

        async def blocked(n: int) -> int:
            await release.wait()
            return 200

        receiver.answer = blocked
        app_id, _ = await server.create_app(webhook_url=receiver.url)
        hooks = Webhooks(server.apps, SystemClock(), max_events=2, lanes=1)
        await hooks.start()
        try:
            dropped = metric("dropped")
            hooks.on_event(app_id, "dev1", "e", b"1")
            await wait_for(lambda: receiver.calls == 1)  # event 1 is out of the queue
            for i in range(2, 6):
                hooks.on_event(app_id, "dev1", "e", str(i).encode())
            assert metric("dropped") == dropped + 2
            release.set()
            await wait_for(lambda: len(receiver.hits) == 3)
            assert [h.body for h in receiver.hits] == [b"1", b"4", b"5"]
        finally:
            await hooks.stop()


class TestVerify:
    """``backchannel.sdk.webhooks`` on the receiving side."""

    def test_signing_key_is_the_stored_hash(self) -> None:
        from backchannel.core.credentials import hash_secret

        assert signing_key("s3cret") == hash_secret("s3cret").encode()

    def test_stale_and_malformed(self) -> None:
        import hashlib
        import hmac

        body, ts = b"payload", "1700000000"
        good = hmac.new(signing_key("s"), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        sig = "sha256=" + good
        assert verify_webhook("s", body, ts, sig, now=1700000000 + 299)
        assert not verify_webhook("s", body, ts, sig, now=1700000000 + 301)
        assert not verify_webhook("s", body, ts, sig, now=1700000000 - 301)
        assert verify_webhook("s", body, ts, sig, tolerance=1000, now=1700000000 + 900)
        assert not verify_webhook("s", body, ts, "sha1=" + good, now=1700000000)
        assert not verify_webhook("s", body, ts, good, now=1700000000)
        assert not verify_webhook("s", body, "17e8", sig, now=1700000000)
        arabic_digits = "\u0661" * 10  # isdigit(), but not ASCII
        assert not verify_webhook("s", body, arabic_digits, sig, now=1700000000)
        assert not verify_webhook("s", body, ts, "sha256=é" + good[1:], now=1700000000)
