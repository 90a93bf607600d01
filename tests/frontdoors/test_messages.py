"""Offline semantics per call: fail, wait, queue (with TTL and status), and idempotency keys.

Every test runs a real in-process server and real native devices over WebSockets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from backchannel.core.credentials import valid_device_id
from backchannel.wire.native.frames import Call
from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.rawdevice import RawDevice, connect
from tests.webhook_receiver import Receiver


class Setup:
    """An app, its provisioned devices, and shortcuts for its API."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""
        self.keys: dict[str, str] = {}

    async def create(self) -> Setup:
        self.app_id, self.secret = await self.server.create_app()
        return self

    async def device(self, device_id: str = "dev1") -> RawDevice:
        if device_id not in self.keys:
            self.keys[device_id] = await self.server.provision(self.app_id, device_id)
        return await connect(
            self.http, self.server.ws_url, self.app_id, device_id, self.keys[device_id]
        )

    def url(self, path: str) -> str:
        return f"{self.server.url}/v1/applications/{self.app_id}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"OAuth {self.secret}"}

    async def send(
        self, body: bytes, query: str = "", device: str = "dev1", key: str | None = None
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        if "offline=queue" in query and device not in self.keys and valid_device_id(device):
            # Queued messages are only taken for devices that can connect.
            self.keys[device] = await self.server.provision(self.app_id, device)
        async with self.http.post(
            self.url(f"/devices/{device}/send{query}"), data=body, headers=headers
        ) as r:
            return r.status, await r.read(), r

    async def queue(self, body: bytes, query: str = "", **kw: Any) -> dict[str, Any]:
        status, raw, _ = await self.send(body, "?offline=queue" + query, **kw)
        assert status == 202, raw
        data: dict[str, Any] = orjson.loads(raw)
        return data

    async def message(self, message_id: str) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.url(f"/messages/{message_id}"), headers=self.auth) as r:
            return r.status, orjson.loads(await r.read())

    async def state_of(self, message_id: str) -> str:
        status, data = await self.message(message_id)
        assert status == 200, data
        return str(data["state"])

    async def wait_state(self, message_id: str, state: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, data = await self.message(message_id)
            assert status == 200, data
            if data["state"] == state:
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"message {message_id} is {data['state']}, not {state}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def setup(server: RunningServer, http: aiohttp.ClientSession) -> Setup:
    return await Setup(server, http).create()


def recorder(log: list[bytes], reply: bytes | None = b"ok") -> Any:
    """A device handler that records every body it gets."""

    async def handle(call: Call) -> bytes | None:
        log.append(call.body)
        return reply if reply is None else reply + b":" + call.body

    return handle


class TestQueue:
    """``?offline=queue``: 202, persisted, delivered in order when the device connects."""

    async def test_queued_while_offline_then_delivered_with_reply(self, setup: Setup) -> None:
        accepted = await setup.queue(b"hello")
        assert accepted["state"] == "queued"
        assert accepted["message_id"].startswith("msg_")
        assert accepted["device_id"] == "dev1"
        assert accepted["expires_at"] > accepted["created_at"]
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        done = await setup.wait_state(accepted["message_id"], "replied")
        assert got == [b"hello"]
        assert done["reply"] == "ok:hello"
        assert done["attempts"] == 1

    async def test_location_and_message_id_headers(self, setup: Setup) -> None:
        status, raw, resp = await setup.send(b"x", "?offline=queue")
        assert status == 202
        message_id = orjson.loads(raw)["message_id"]
        assert resp.headers["Location"] == f"/v1/applications/{setup.app_id}/messages/{message_id}"
        assert resp.headers["X-Backchannel-Message-Id"] == message_id

    async def test_order_is_kept(self, setup: Setup) -> None:
        ids = [(await setup.queue(f"m{i}".encode()))["message_id"] for i in range(30)]
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        await setup.wait_state(ids[-1], "replied")
        assert got == [f"m{i}".encode() for i in range(30)]

    async def test_queued_while_online_is_delivered_at_once(self, setup: Setup) -> None:
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        accepted = await setup.queue(b"now")
        await setup.wait_state(accepted["message_id"], "replied", timeout=2)
        assert got == [b"now"]

    async def test_binary_reply_is_base64(self, setup: Setup) -> None:
        async def binary(call: Call) -> bytes:
            return b"\xff\x00\xfe"

        (await setup.device()).serve(binary)
        accepted = await setup.queue(b"b")
        done = await setup.wait_state(accepted["message_id"], "replied")
        assert done["reply_base64"] == "/wD+"
        assert "reply" not in done

    async def test_device_error_fails_the_message(self, setup: Setup) -> None:
        dev = await setup.device()

        async def refuse(call: Call) -> None:
            await dev.error_reply(call.call_id, "no such relay")

        dev.serve(refuse)
        accepted = await setup.queue(b"x")
        done = await setup.wait_state(accepted["message_id"], "failed")
        assert done["error"] == "device_error"
        assert "no such relay" in done["detail"]

    async def test_no_reply_ends_delivered_and_is_never_resent(self, setup: Setup) -> None:
        got: list[bytes] = []
        dev = (await setup.device()).serve(recorder(got, reply=None))
        accepted = await setup.queue(b"silent", "&timeout=0.3")
        done = await setup.wait_state(accepted["message_id"], "delivered")
        assert done["error"] == "timeout_no_reply"
        await dev.close()
        (await setup.device()).serve(recorder(got))
        await asyncio.sleep(0.3)
        assert got == [b"silent"]

    async def test_ttl_expires_a_queued_message(self, setup: Setup) -> None:
        accepted = await setup.queue(b"late", "&ttl=0.2")
        done = await setup.wait_state(accepted["message_id"], "expired", timeout=3)
        assert done["error"] == "expired"
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        kept = await setup.queue(b"fresh")
        await setup.wait_state(kept["message_id"], "replied")
        assert got == [b"fresh"]

    async def test_expired_messages_are_skipped_in_the_queue(self, setup: Setup) -> None:
        await setup.queue(b"a", "&ttl=0.1")
        keep = await setup.queue(b"b", "&ttl=60")
        await asyncio.sleep(0.2)
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        await setup.wait_state(keep["message_id"], "replied")
        assert got == [b"b"]

    async def test_cancel_a_queued_message(self, setup: Setup) -> None:
        first = await setup.queue(b"cancel-me")
        second = await setup.queue(b"keep-me")
        async with setup.http.delete(
            setup.url(f"/messages/{first['message_id']}"), headers=setup.auth
        ) as r:
            assert r.status == 200
            body = orjson.loads(await r.read())
        assert (body["state"], body["error"]) == ("failed", "cancelled")
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        await setup.wait_state(second["message_id"], "replied")
        assert got == [b"keep-me"]
        async with setup.http.delete(
            setup.url(f"/messages/{second['message_id']}"), headers=setup.auth
        ) as r:
            assert r.status == 409
            assert orjson.loads(await r.read())["error"] == "not_queued"

    async def test_list_a_devices_messages(self, setup: Setup) -> None:
        ids = [(await setup.queue(f"{i}".encode()))["message_id"] for i in range(3)]
        async with setup.http.get(
            setup.url("/devices/dev1/messages?state=queued&limit=2"), headers=setup.auth
        ) as r:
            assert r.status == 200
            data = orjson.loads(await r.read())
        assert data["queued"] == 3
        assert [m["message_id"] for m in data["messages"]] == ids[:2]
        async with setup.http.get(
            setup.url("/devices/dev1/messages?state=bogus"), headers=setup.auth
        ) as r:
            assert r.status == 400
            assert orjson.loads(await r.read())["error"] == "invalid_state"

    async def test_list_the_whole_application_page_by_page(self, setup: Setup) -> None:
        ids = [(await setup.queue(b"x", device=f"dev{i % 3}"))["message_id"] for i in range(7)]
        seen: list[str] = []
        after = ""
        while True:
            async with setup.http.get(
                setup.url(f"/messages?state=queued&limit=3{after}"), headers=setup.auth
            ) as r:
                assert r.status == 200
                page = orjson.loads(await r.read())
            assert "device_id" not in page
            seen += [m["message_id"] for m in page["messages"]]
            if page["next"] is None:
                break
            after = f"&after={page['next']}"
        assert seen == ids
        async with setup.http.get(setup.url("/messages?after=x"), headers=setup.auth) as r:
            assert r.status == 400
            assert orjson.loads(await r.read())["error"] == "invalid_after"

    async def test_queued_body_limit(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(message_max_body_size=1000)
        setup = await Setup(server, http).create()
        status, raw, _ = await setup.send(b"x" * 1001, "?offline=queue")
        body = orjson.loads(raw)
        assert (status, body["error"], body["limit"]) == (413, "body_too_large", 1000)
        await setup.queue(b"x" * 1000)
        # A plain call is not queued: the server's max_body_size applies, not this limit.
        assert (await setup.send(b"x" * 5000))[0] == 418

    async def test_queue_limit_per_device(self, make_server: ServerFactory) -> None:
        server = await make_server(max_queued_per_device=3)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(server, http).create()
            for i in range(3):
                await setup.queue(f"{i}".encode())
            status, raw, _ = await setup.send(b"4", "?offline=queue")
            assert status == 429
            assert orjson.loads(raw)["error"] == "queue_full"
            # Another device has its own queue.
            await setup.queue(b"other", device="dev2")

    @pytest.mark.parametrize(
        ("query", "error"),
        [
            ("?offline=later", "invalid_offline"),
            ("?offline=queue&ttl=0", "invalid_ttl"),
            ("?offline=queue&ttl=-1", "invalid_ttl"),
            ("?offline=queue&ttl=nan", "invalid_ttl"),
            ("?offline=queue&ttl=abc", "invalid_ttl"),
            ("?offline=queue&ttl=99999999", "invalid_ttl"),
            ("?offline=wait&wait=0", "invalid_wait"),
            ("?offline=wait&wait=100000", "invalid_wait"),
        ],
    )
    async def test_bad_parameters(self, setup: Setup, query: str, error: str) -> None:
        status, raw, _ = await setup.send(b"x", query)
        assert status == 400
        body = orjson.loads(raw)
        assert body["error"] == error
        assert body["detail"]

    async def test_a_device_that_can_never_connect_is_refused(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        setup = await Setup(server, http).create()
        async with http.post(
            setup.url("/devices/ghost/send?offline=queue"), data=b"x", headers=setup.auth
        ) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "unknown_device"
        # An app that lets devices in without a key takes messages for any id.
        open_app = Setup(server, http)
        open_app.app_id, open_app.secret = await server.create_app(allow_open_attach=True)
        async with http.post(
            open_app.url("/devices/ghost/send?offline=queue"), data=b"x", headers=open_app.auth
        ) as r:
            assert r.status == 202

    async def test_bad_device_id_is_refused(self, setup: Setup) -> None:
        status, raw, _ = await setup.send(b"x", "?offline=queue", device="bad%20id")
        assert status == 400
        assert orjson.loads(raw)["error"] == "invalid_device_id"

    async def test_unknown_message(self, setup: Setup) -> None:
        status, data = await setup.message("msg_nope")
        assert status == 404
        assert data["error"] == "unknown_message"

    async def test_apps_cannot_read_each_others_messages(
        self, setup: Setup, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        accepted = await setup.queue(b"secret")
        other = await Setup(server, http).create()
        status, body = await other.message(accepted["message_id"])
        assert (status, body["error"]) == (404, "unknown_message")
        # The other app's device of the same id never gets it.
        got: list[bytes] = []
        other.keys["dev1"] = await server.provision(other.app_id, "dev1")
        (await other.device()).serve(recorder(got))
        await asyncio.sleep(0.3)
        assert got == []
        async with http.get(
            setup.url(f"/messages/{accepted['message_id']}"),
            headers={"Authorization": f"OAuth {other.secret}"},
        ) as r:
            assert r.status == 403

    async def test_takeover_does_not_deliver_twice(self, setup: Setup) -> None:
        got: list[bytes] = []
        ids = [(await setup.queue(f"t{i}".encode()))["message_id"] for i in range(10)]
        first = (await setup.device()).serve(recorder(got))
        second = (await setup.device()).serve(recorder(got))

        async def settled() -> bool:
            states = {await setup.state_of(i) for i in ids}
            assert states <= {"queued", "sent", "replied", "delivered"}
            return not states & {"queued", "sent"}

        deadline = time.monotonic() + 5
        while not await settled():
            assert time.monotonic() < deadline, "the queue did not settle"
            await asyncio.sleep(0.02)
        counts = Counter(got)
        assert all(n == 1 for n in counts.values()), counts
        await first.close()
        await second.close()


class TestFlapping:
    """A device that keeps dropping its connection receives each queued message once."""

    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    async def test_each_message_once(
        self, make_server: ServerFactory, http: aiohttp.ClientSession, store: str
    ) -> None:
        # The SQLite store yields to the loop on every write, which opens the races between
        # a drain putting a message back and the device's next connection.
        setup = await Setup(await make_server(store=store), http).create()
        total = 60
        ids = [(await setup.queue(f"f{i}".encode()))["message_id"] for i in range(total)]
        got: list[bytes] = []
        drops = 0
        while len(got) < total:
            dev = await setup.device()
            dropped = asyncio.Event()

            async def flaky(
                call: Call, dev: RawDevice = dev, dropped: asyncio.Event = dropped
            ) -> bytes | None:
                got.append(call.body)
                if len(got) % 7 == 0:
                    # Drop the connection mid-call: this message gets no reply.
                    dropped.set()
                    return None
                return b"ok"

            dev.serve(flaky)
            await wait_for(lambda d=dropped: d.is_set() or len(got) >= total, 5)  # type: ignore[misc]
            drops += dropped.is_set()
            await dev.close()
        state: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = {i: await setup.state_of(i) for i in ids}
            if not {"queued", "sent"} & set(state.values()):
                break
            await asyncio.sleep(0.05)
        counts = Counter(got)
        assert all(n == 1 for n in counts.values()), f"delivered twice: {counts.most_common(3)}"
        assert len(got) == total
        # The messages cut off mid-call end ``delivered`` (the device may have acted on
        # them); every other one was replied.
        finals = Counter(state.values())
        assert finals == {"replied": total - drops, "delivered": drops}, finals
        assert drops == total // 7


class TestWait:
    """``?offline=wait``: hold the call until the device connects, within ``wait``."""

    async def test_call_waits_for_the_device(self, setup: Setup) -> None:
        call = asyncio.ensure_future(setup.send(b"ping", "?offline=wait&wait=5"))
        await asyncio.sleep(0.3)
        assert not call.done()
        (await setup.device()).serve()
        status, reply, _ = await call
        assert (status, reply) == (200, b"ping")

    async def test_wait_runs_out(self, setup: Setup) -> None:
        started = time.monotonic()
        status, raw, _ = await setup.send(b"ping", "?offline=wait&wait=0.4")
        elapsed = time.monotonic() - started
        assert status == 418
        assert orjson.loads(raw)["error"] == "device_offline"
        assert 0.35 < elapsed < 2.0

    async def test_online_device_does_not_wait(self, setup: Setup) -> None:
        (await setup.device()).serve()
        status, reply, _ = await setup.send(b"now", "?offline=wait&wait=5")
        assert (status, reply) == (200, b"now")

    async def test_default_fail_is_immediate(self, setup: Setup) -> None:
        status, raw, _ = await setup.send(b"x")
        assert status == 418
        assert orjson.loads(raw)["error"] == "device_offline"


class TestIdempotency:
    """``Idempotency-Key`` makes a retried call safe: one delivery, the same answer."""

    async def test_retry_gets_the_first_reply(self, setup: Setup) -> None:
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        s1, r1, h1 = await setup.send(b"once", key="k-1")
        s2, r2, h2 = await setup.send(b"once", key="k-1")
        assert (s1, r1) == (s2, r2) == (200, b"ok:once")
        assert got == [b"once"]
        assert "Idempotent-Replayed" not in h1.headers
        assert h2.headers["Idempotent-Replayed"] == "true"
        assert h1.headers["X-Backchannel-Message-Id"] == h2.headers["X-Backchannel-Message-Id"]

    async def test_concurrent_retries_make_one_call(self, setup: Setup) -> None:
        got: list[bytes] = []

        async def slow(call: Call) -> bytes:
            got.append(call.body)
            await asyncio.sleep(0.3)
            return b"done"

        (await setup.device()).serve(slow)
        results = await asyncio.gather(*(setup.send(b"x", key="same") for _ in range(5)))
        assert [(s, r) for s, r, _ in results] == [(200, b"done")] * 5
        assert got == [b"x"]

    async def test_key_with_another_body_is_refused(self, setup: Setup) -> None:
        (await setup.device()).serve()
        assert (await setup.send(b"a", key="k"))[0] == 200
        status, raw, _ = await setup.send(b"b", key="k")
        assert status == 422
        assert orjson.loads(raw)["error"] == "idempotency_key_reused"
        status, raw, _ = await setup.send(b"a", "?offline=queue", key="k")
        assert status == 422

    async def test_offline_is_not_recorded(self, setup: Setup) -> None:
        status, _, _ = await setup.send(b"x", key="retry-me")
        assert status == 418
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        status, reply, resp = await setup.send(b"x", key="retry-me")
        assert (status, reply) == (200, b"ok:x")
        assert "Idempotent-Replayed" not in resp.headers
        assert got == [b"x"]

    async def test_device_error_is_replayed(self, setup: Setup) -> None:
        dev = await setup.device()
        calls: list[int] = []

        async def refuse(call: Call) -> None:
            calls.append(call.call_id)
            await dev.error_reply(call.call_id, "broken")

        dev.serve(refuse)
        first = await setup.send(b"x", key="err")
        second = await setup.send(b"x", key="err")
        assert first[0] == second[0] == 502
        assert orjson.loads(first[1])["error"] == orjson.loads(second[1])["error"] == "device_error"
        assert len(calls) == 1

    async def test_queue_key_returns_the_same_message(self, setup: Setup) -> None:
        status1, raw1, _ = await setup.send(b"q", "?offline=queue", key="qk")
        status2, raw2, resp2 = await setup.send(b"q", "?offline=queue", key="qk")
        assert status1 == status2 == 202
        assert orjson.loads(raw1)["message_id"] == orjson.loads(raw2)["message_id"]
        assert resp2.headers["Idempotent-Replayed"] == "true"
        got: list[bytes] = []
        (await setup.device()).serve(recorder(got))
        await setup.wait_state(orjson.loads(raw1)["message_id"], "replied")
        assert got == [b"q"]

    async def test_keys_are_per_application(
        self, setup: Setup, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        other = await Setup(server, http).create()
        a = await setup.queue(b"1", key="shared")
        b = await other.queue(b"1", key="shared")
        assert a["message_id"] != b["message_id"]

    @pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
    async def test_bad_keys(self, setup: Setup, key: str) -> None:
        async with setup.http.post(
            setup.url("/devices/dev1/send"),
            data=b"x",
            headers={**setup.auth, "Idempotency-Key": key},
        ) as r:
            assert r.status == 400
            assert orjson.loads(await r.read())["error"] == "invalid_idempotency_key"


class TestRestart:
    """Queued messages and idempotency records live in the store."""

    async def test_queue_survives_a_graceful_restart(
        self, make_server: ServerFactory, tmp_path: Path
    ) -> None:
        data_dir = tmp_path / "kept"
        first = await make_server(store="sqlite", data_dir=data_dir)
        async with aiohttp.ClientSession() as http:
            setup = await Setup(first, http).create()
            setup.keys["dev1"] = await first.provision(setup.app_id, "dev1")
            ids = [(await setup.queue(f"r{i}".encode()))["message_id"] for i in range(20)]
            await first.stop()
            second = await make_server(store="sqlite", data_dir=data_dir)
            setup.server = second
            assert await setup.state_of(ids[0]) == "queued"
            got: list[bytes] = []
            (await setup.device()).serve(recorder(got))
            await setup.wait_state(ids[-1], "replied")
            assert got == [f"r{i}".encode() for i in range(20)]


class TestNotifications:
    """A queued message's final state reaches the event stream and a ``message`` webhook."""

    async def status_records(self, setup: Setup) -> list[dict[str, Any]]:
        async with setup.http.get(
            setup.url("/events?format=json&type=message_status"), headers=setup.auth
        ) as r:
            assert r.status == 200
            page = orjson.loads(await r.read())
        return [orjson.loads(e["data"]) for e in page["events"]]

    async def test_replied_and_expired_reach_the_stream_and_the_webhook(
        self, server: RunningServer, http: aiohttp.ClientSession, receiver: Receiver
    ) -> None:
        setup = Setup(server, http)
        setup.app_id, setup.secret = await server.create_app(
            webhook_url=receiver.url, webhook_kinds=("message",)
        )
        replied = await setup.queue(b"hi")
        expired = await setup.queue(b"late", "&ttl=0.1")
        await setup.wait_state(expired["message_id"], "expired", timeout=3)
        (await setup.device()).serve(recorder([]))
        await setup.wait_state(replied["message_id"], "replied")
        await wait_for(lambda: len(receiver.ok()) == 2, 5)
        bodies = {h.headers["X-Backchannel-Event"]: orjson.loads(h.body) for h in receiver.ok()}
        assert {h.headers["X-Backchannel-Kind"] for h in receiver.ok()} == {"message"}
        assert bodies["replied"]["message_id"] == replied["message_id"]
        assert bodies["replied"]["reply"] == "ok:hi"
        assert bodies["replied"]["attempts"] == 1
        assert (bodies["replied"]["app_id"], bodies["replied"]["device_id"]) == (
            setup.app_id,
            "dev1",
        )
        assert bodies["expired"]["message_id"] == expired["message_id"]
        assert bodies["expired"]["error"] == "expired"
        records = await self.status_records(setup)
        assert {(r["message_id"], r["state"]) for r in records} == {
            (replied["message_id"], "replied"),
            (expired["message_id"], "expired"),
        }

    async def test_cancel_and_device_error_are_announced(self, setup: Setup) -> None:
        cancelled = await setup.queue(b"c")
        async with setup.http.delete(
            setup.url(f"/messages/{cancelled['message_id']}"), headers=setup.auth
        ) as r:
            assert r.status == 200
        dev = await setup.device()

        async def refuse(call: Call) -> None:
            await dev.error_reply(call.call_id, "nope")

        dev.serve(refuse)
        failed = await setup.queue(b"f")
        await setup.wait_state(failed["message_id"], "failed")
        deadline = time.monotonic() + 5
        while len(records := await self.status_records(setup)) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        by_id = {r["message_id"]: r for r in records}
        assert by_id[cancelled["message_id"]]["error"] == "cancelled"
        assert by_id[failed["message_id"]]["error"] == "device_error"

    async def test_idempotent_calls_are_not_announced(self, setup: Setup) -> None:
        (await setup.device()).serve()
        assert (await setup.send(b"x", key="k"))[0] == 200
        queued = await setup.queue(b"y")
        await setup.wait_state(queued["message_id"], "replied")
        deadline = time.monotonic() + 5
        while not (records := await self.status_records(setup)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert [r["message_id"] for r in records] == [queued["message_id"]]


async def metric(http: aiohttp.ClientSession, server: RunningServer, line_start: str) -> float:
    """The value of one sample of ``/metrics`` (0 when absent)."""
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_queue_metrics(setup: Setup) -> None:
    queued = "backchannel_messages_queued"
    replied = 'backchannel_messages_final_total{state="replied"}'
    before_q = await metric(setup.http, setup.server, queued)
    before_r = await metric(setup.http, setup.server, replied)
    accepted = [await setup.queue(b"%d" % i) for i in range(3)]
    assert await metric(setup.http, setup.server, queued) == before_q + 3
    (await setup.device()).serve()
    await setup.wait_state(accepted[-1]["message_id"], "replied")
    assert await metric(setup.http, setup.server, queued) == before_q
    assert await metric(setup.http, setup.server, replied) == before_r + 3
