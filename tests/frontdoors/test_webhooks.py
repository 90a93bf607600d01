"""Event webhooks to a real local receiver (COMPAT.md, "Webhook"), and their verification."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from backchannel.sdk.webhooks import signing_key, verify_webhook
from tests.conftest import RunningServer, ServerFactory, free_port, wait_for
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
        assert h["X-Backchannel-Kind"] == "event"
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


FAST = {
    "webhook_backoff": 0.01,
    "webhook_max_backoff": 0.04,
    "webhook_max_attempts": 4,
    "webhook_poll_interval": 0.05,
}


@pytest.fixture
async def fast(make_server: ServerFactory) -> RunningServer:
    """A server with millisecond webhook backoff and 4 attempts."""
    return await make_server(**FAST)


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def get_json(http: aiohttp.ClientSession, url: str, secret: str) -> Any:
    async with http.get(url, headers=auth(secret)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait_async(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class TestRetries:
    """Backoff, per-device order, dead letters through the API, and retry from dead."""

    async def test_fails_n_times_then_delivered_once(
        self, fast: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        async def flaky(n: int) -> int:
            return 500 if n < 3 else 200

        receiver.answer = flaky
        app_id, secret = await fast.create_app(webhook_url=receiver.url)
        dev = await device(fast, http, app_id)
        await dev.emit("e", b"once")
        await wait_for(lambda: len(receiver.ok()) == 1)
        await asyncio.sleep(0.1)
        assert [h.status for h in receiver.hits] == [500, 500, 500, 200]
        assert len({h.headers["X-Backchannel-Delivery"] for h in receiver.hits}) == 1
        for hit in receiver.hits:
            h = hit.headers
            assert hit.body == b"once"
            assert verify_webhook(
                secret, hit.body, h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
            )
        status = await get_json(http, f"{fast.url}/v1/applications/{app_id}/webhooks", secret)
        assert (status["pending"], status["delivered"], status["dead"]) == (0, 1, 0)
        await dev.close()

    async def test_retries_keep_the_order_of_each_device(
        self, fast: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        async def flaky(n: int) -> int:
            return 500 if n % 7 == 3 else 200  # failures scattered through the run

        receiver.answer = flaky
        app_id, secret = await fast.create_app(webhook_url=receiver.url)
        dev = await device(fast, http, app_id)
        other = await device(fast, http, app_id, "dev2")
        for i in range(20):
            await dev.emit("seq", str(i).encode())
            await other.emit("seq", f"other {i}".encode())
        await wait_for(lambda: len(receiver.ok()) == 40)
        by_device = [h.body for h in receiver.ok() if h.headers["X-Backchannel-Device"] == "dev1"]
        assert by_device == [str(i).encode() for i in range(20)]
        others = [h.body for h in receiver.ok() if h.headers["X-Backchannel-Device"] == "dev2"]
        assert others == [f"other {i}".encode() for i in range(20)]
        failed = [h for h in receiver.hits if h.status == 500]
        assert failed
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

    async def test_dead_letter_listed_and_retried(
        self, fast: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        up = False

        async def answer(n: int) -> int:
            return 200 if up else 503

        receiver.answer = answer
        app_id, secret = await fast.create_app(webhook_url=receiver.url)
        dev = await device(fast, http, app_id)
        failed = metric("failed")
        await dev.emit("doomed", b"first")
        await wait_for(lambda: metric("failed") == failed + 1)
        assert len(receiver.hits) == 4  # webhook_max_attempts
        base = f"{fast.url}/v1/applications/{app_id}/webhooks"
        (dead,) = (await get_json(http, base + "/dead", secret))["dead"]
        assert dead["kind"] == "event" and dead["device_id"] == "dev1"
        assert dead["event"] == "doomed" and dead["attempts"] == 4
        assert (dead["last_status"], dead["last_error"]) == (503, "HTTP 503")
        assert isinstance(dead["event_id"], int) and dead["created_at"] > 0
        # A dead delivery does not block the device's later ones.
        up = True
        await dev.emit("later", b"second")
        await wait_for(lambda: [h.body for h in receiver.ok()] == [b"second"])
        # Another app's secret cannot see or retry it; an unknown id is 404.
        _, other_secret = await fast.create_app("other")
        async with http.get(base + "/dead", headers=auth(other_secret)) as r:
            assert r.status == 403
        async with http.post(base + "/dead/999999/retry", headers=auth(secret)) as r:
            assert r.status == 404
        async with http.post(f"{base}/dead/{dead['id']}/retry", headers=auth(secret)) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"id": dead["id"], "state": "pending"}
        await wait_for(lambda: [h.body for h in receiver.ok()] == [b"second", b"first"])
        assert (await get_json(http, base + "/dead", secret))["dead"] == []
        async with http.post(f"{base}/dead/{dead['id']}/retry", headers=auth(secret)) as r:
            assert r.status == 404  # no longer dead
        await dev.close()

    async def test_unreachable_receiver_ends_dead(
        self, fast: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await fast.create_app(webhook_url=f"http://127.0.0.1:{free_port()}/x")
        dev = await device(fast, http, app_id)
        await dev.emit("e", b"nowhere")
        url = f"{fast.url}/v1/applications/{app_id}/webhooks/dead"

        async def dead() -> bool:
            return bool((await get_json(http, url, secret))["dead"])

        await wait_async(dead)
        (row,) = (await get_json(http, url, secret))["dead"]
        assert row["last_status"] is None and row["last_error"]
        await dev.close()


class TestDeniedNetworks:
    """``webhook_deny_networks``: addresses the server refuses to POST to."""

    async def dead_error(
        self, server: RunningServer, http: aiohttp.ClientSession, webhook_url: str
    ) -> str:
        app_id, secret = await server.create_app(webhook_url=webhook_url)
        dev = await device(server, http, app_id)
        await dev.emit("e", b"x")
        url = f"{server.url}/v1/applications/{app_id}/webhooks/dead"

        async def dead() -> bool:
            return bool((await get_json(http, url, secret))["dead"])

        await wait_async(dead)
        (row,) = (await get_json(http, url, secret))["dead"]
        await dev.close()
        return str(row["last_error"])

    async def test_metadata_address_is_refused_by_default(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(**FAST)
        error = await self.dead_error(server, http, "http://169.254.169.254/latest/meta-data")
        assert error == "address_denied"

    async def test_a_name_resolving_to_a_denied_address_is_refused(
        self, make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        server = await make_server(**FAST, webhook_deny_networks=["127.0.0.0/8", "::1"])
        by_name = receiver.url.replace("127.0.0.1", "localhost")
        assert await self.dead_error(server, http, by_name) == "address_denied"
        assert receiver.hits == []

    async def test_an_empty_list_allows_everything(
        self, make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        server = await make_server(webhook_deny_networks=[])
        app_id, _ = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        await dev.emit("e", b"through")
        await wait_for(lambda: bool(receiver.ok()))
        assert receiver.ok()[0].body == b"through"
        await dev.close()


class TestKinds:
    """Presence and call-completion webhooks, per application."""

    async def test_presence_and_call_when_enabled(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app_id, secret = await server.create_app(
            webhook_url=receiver.url, webhook_kinds=("presence", "call")
        )
        dev = await device(server, http, app_id)
        dev.serve()
        async with http.post(
            f"{server.url}/v1/applications/{app_id}/devices/dev1/send",
            data=b"ping",
            headers=auth(secret),
        ) as r:
            assert r.status == 200
        async with http.post(
            f"{server.url}/v1/applications/{app_id}/devices/ghost/send",
            data=b"ping",
            headers=auth(secret),
        ) as r:
            assert r.status != 200
        await dev.emit("e", b"not an event webhook")
        await dev.close()
        await wait_for(lambda: len(receiver.ok()) == 4)
        await asyncio.sleep(0.1)
        hits = receiver.ok()
        kinds = [(h.headers["X-Backchannel-Kind"], h.headers["X-Backchannel-Event"]) for h in hits]
        presence = [h for h in hits if h.headers["X-Backchannel-Kind"] == "presence"]
        calls = [h for h in hits if h.headers["X-Backchannel-Kind"] == "call"]
        assert sorted(kinds) == sorted(
            [
                ("presence", "connect"),
                ("presence", "disconnect"),
                ("call", "call"),
                ("call", "call"),
            ]
        )
        connect, disconnect = (orjson.loads(h.body) for h in presence)
        assert (connect["device_id"], connect["online"], connect["reason"]) == ("dev1", True, None)
        assert disconnect["online"] is False and disconnect["reason"]
        assert presence[0].headers["Content-Type"] == "application/json"
        results = sorted((c["device_id"], c["status"], c["error"]) for c in map(_json, calls))
        assert results == [("dev1", "ok", None), ("ghost", "error", "device_offline")]
        assert all(_json(c)["duration_ms"] >= 0 for c in calls)
        for hit in hits:
            h = hit.headers
            assert verify_webhook(
                secret, hit.body, h["X-Backchannel-Timestamp"], h["X-Backchannel-Signature"]
            )

    async def test_only_events_by_default(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        app_id, secret = await server.create_app(webhook_url=receiver.url)
        dev = await device(server, http, app_id)
        dev.serve()
        async with http.post(
            f"{server.url}/v1/applications/{app_id}/devices/dev1/send",
            data=b"ping",
            headers=auth(secret),
        ) as r:
            assert r.status == 200
        await dev.emit("e", b"event")
        await dev.close()
        await wait_for(lambda: len(receiver.hits) == 1)
        await asyncio.sleep(0.2)
        assert [(h.headers["X-Backchannel-Kind"], h.body) for h in receiver.hits] == [
            ("event", b"event")
        ]

    async def test_admin_api_sets_kinds(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        url = f"{server.url}/admin/v1/apps"
        async with http.post(
            url, json={"name": "k", "webhook_kinds": ["call", "event"]}, headers=headers
        ) as r:
            assert r.status == 201
            app = await r.json()
        assert app["webhook_kinds"] == ["event", "call"]
        async with http.patch(
            f"{url}/{app['app_id']}", json={"webhook_kinds": ["bogus"]}, headers=headers
        ) as r:
            assert r.status == 400
        async with http.patch(
            f"{url}/{app['app_id']}", json={"webhook_kinds": None}, headers=headers
        ) as r:
            assert r.status == 200
            assert (await r.json())["webhook_kinds"] == ["event"]


def _json(hit: Any) -> Any:
    return orjson.loads(hit.body)


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
