"""The native WebSocket transport: handshake, auth, takeover, heartbeats, protocol errors."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from backchannel.wire.native import SUBPROTOCOL
from backchannel.wire.native.frames import HEADER, Ping
from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.rawdevice import RawDevice, connect


async def device(
    server: RunningServer, http: aiohttp.ClientSession, device_id: str = "d1"
) -> tuple[str, str, RawDevice]:
    app_id, secret = await server.create_app()
    key = await server.provision(app_id, device_id)
    return app_id, secret, await connect(http, server.ws_url, app_id, device_id, key)


async def send(
    http: aiohttp.ClientSession, server: RunningServer, app_id: str, secret: str, dev: str
) -> tuple[int, bytes]:
    url = f"{server.url}/v1/applications/{app_id}/devices/{dev}/send"
    async with http.post(url, data=b"ping", headers={"Authorization": f"OAuth {secret}"}) as r:
        return r.status, await r.read()


class TestHandshake:
    """docs/protocol.md § Connecting and § Session start."""

    async def test_hello(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        _, _, dev = await device(server, http)
        assert dev.hello.version == 1
        assert dev.hello.heartbeat == 25.0
        assert dev.hello.timeout == 75.0
        assert dev.hello.max_frame >= 10_000_000
        assert dev.hello.server.startswith("backchannel/")
        assert dev.ws.protocol == SUBPROTOCOL

    async def test_query_credentials(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, _ = await server.create_app()
        key = await server.provision(app_id, "q1")
        url = f"{server.ws_url}?app={app_id}&device=q1&key={key}"
        async with http.ws_connect(url, protocols=[SUBPROTOCOL]) as ws:
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.BINARY
            assert msg.data[0] == 0x01  # HELLO

    async def test_missing_subprotocol_is_400(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(server.ws_url)
        assert info.value.status == 400
        async with http.get(
            server.ws_url,
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as r:
            assert r.status == 400
            assert orjson.loads(await r.read())["error"] == "unsupported_protocol"

    @pytest.mark.parametrize(
        ("case", "reason"),
        [
            ("bad_key", "bad_key"),
            ("no_key", "missing_key"),
            ("unknown_app", "unknown_app"),
            ("bad_device_id", "bad_device_id"),
        ],
    )
    async def test_auth_failure_closes_4001(
        self, server: RunningServer, http: aiohttp.ClientSession, case: str, reason: str
    ) -> None:
        app_id, _ = await server.create_app()
        key: str | None = await server.provision(app_id, "d1")
        device_id = "d1"
        if case == "bad_key":
            key = "x" * 43
        elif case == "no_key":
            key = None
        elif case == "unknown_app":
            app_id = "f" * 20
        else:
            device_id = "bad id!"
        with pytest.raises(ConnectionError, match=f"4001 authentication failed: {reason}"):
            await connect(http, server.ws_url, app_id, device_id, key)

    async def test_open_attach_without_key(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app(allow_open_attach=True)
        dev = (await connect(http, server.ws_url, app_id, "anyone", None)).serve()
        assert await send(http, server, app_id, secret, "anyone") == (200, b"ping")
        await dev.close()

    async def test_open_attach_does_not_bypass_a_provisioned_key(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, _ = await server.create_app(allow_open_attach=True)
        key = await server.provision(app_id, "owned")
        with pytest.raises(ConnectionError, match="missing_key"):
            await connect(http, server.ws_url, app_id, "owned", None)
        await connect(http, server.ws_url, app_id, "owned", key)

    async def test_refused_with_503_while_shutting_down(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, _ = await server.create_app()
        key = await server.provision(app_id, "late")
        await server.relay.shutdown(0)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await connect(http, server.ws_url, app_id, "late", key)
        assert info.value.status == 503

    async def test_allow_list_without_key(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, _ = await server.create_app(allowed_devices=("AABBCCDDEEFF",))
        await connect(http, server.ws_url, app_id, "AABBCCDDEEFF", None)
        with pytest.raises(ConnectionError, match="4001"):
            await connect(http, server.ws_url, app_id, "other", None)


class TestTakeover:
    """A new authenticated connection replaces the old one at once (close code 4002)."""

    async def test_takeover(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        app_id, secret = await server.create_app()
        key = await server.provision(app_id, "d1")
        old = (await connect(http, server.ws_url, app_id, "d1", key)).serve()
        new = (await connect(http, server.ws_url, app_id, "d1", key)).serve()
        assert await old.wait_closed() == 4002
        assert "replaced" in old.close_reason
        # The old session's disconnect must not unregister the new one.
        await asyncio.sleep(0.1)
        assert await send(http, server, app_id, secret, "d1") == (200, b"ping")
        assert server.relay.hub.get(app_id, "d1") is not None
        assert len(server.relay.hub) == 1
        await new.close()
        await wait_for(lambda: len(server.relay.hub) == 0)

    async def test_calls_in_flight_on_replaced_session_fail(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, secret = await server.create_app()
        key = await server.provision(app_id, "d1")

        async def silent(call: object) -> None:
            return None

        (await connect(http, server.ws_url, app_id, "d1", key)).serve(silent)  # type: ignore[arg-type]
        pending = asyncio.ensure_future(send(http, server, app_id, secret, "d1"))
        await asyncio.sleep(0.1)
        (await connect(http, server.ws_url, app_id, "d1", key)).serve()
        status, body = await pending
        assert status == 502
        assert orjson.loads(body)["error"] == "device_disconnected"


class TestHeartbeats:
    """docs/protocol.md § Heartbeats."""

    async def test_server_pings_and_measures_latency(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(heartbeat_interval=0.2, heartbeat_timeout=1.0)
        app_id, _, dev = await device(server, http)
        dev.serve()
        assert dev.hello.heartbeat == 0.2
        await wait_for(lambda: any(isinstance(f, Ping) for f in dev.frames), timeout=3)
        session = server.relay.hub.get(app_id, "d1")
        assert session is not None
        await wait_for(lambda: session.stats.latency_ms is not None, timeout=3)

    async def test_silent_device_is_dropped(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(heartbeat_interval=0.2, heartbeat_timeout=0.6)
        app_id, _, dev = await device(server, http)
        # A device that reads but never answers PINGs nor sends anything.
        assert server.relay.hub.get(app_id, "d1") is not None
        while True:
            msg = await dev.ws.receive(timeout=5)
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4004
        assert server.relay.hub.get(app_id, "d1") is None

    async def test_device_ping_gets_pong(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        _, _, dev = await device(server, http)
        await dev.ws.send_bytes(Ping(77).serialize())
        msg = await dev.ws.receive(timeout=5)
        assert HEADER.unpack_from(msg.data) == (0x03, 0, 77)


class TestEvents:
    """Upstream events are counted now; delivery comes with the events issue."""

    async def test_events_counted_and_acked(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        app_id, _, dev = await device(server, http)
        dev.serve()
        await dev.emit("temperature", b"21.5")
        event_id = await dev.emit("door", b"open", ack=True)
        await wait_for(lambda: dev.acks == [event_id])
        session = server.relay.hub.get(app_id, "d1")
        assert session is not None
        assert session.stats.events == 2


class TestMisbehavingDevice:
    """Bad frames close only the offending session, with a reason."""

    @pytest.mark.parametrize(
        ("payload", "code", "reason"),
        [
            (b"\x7f\x00\x00\x00\x00\x01", 4000, "unknown frame type 0x7f"),
            (b"\x11\x00", 4000, "shorter than the 6-byte header"),
            (b"\x10\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00", 4000, "CALL is not allowed"),
            (b"\x20\x00\x00\x00\x00\x00\x09ab", 4000, "EVENT: name truncated"),
        ],
    )
    async def test_bad_frame(
        self,
        server: RunningServer,
        http: aiohttp.ClientSession,
        payload: bytes,
        code: int,
        reason: str,
    ) -> None:
        app_id, secret = await server.create_app()
        good = (
            await connect(
                http, server.ws_url, app_id, "good", await server.provision(app_id, "good")
            )
        ).serve()
        bad = (
            await connect(http, server.ws_url, app_id, "bad", await server.provision(app_id, "bad"))
        ).serve()
        await bad.ws.send_bytes(payload)
        assert await bad.wait_closed() == code
        assert reason in bad.close_reason
        assert await send(http, server, app_id, secret, "good") == (200, b"ping")
        assert not good.closed.is_set()

    async def test_text_frame(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        _, _, dev = await device(server, http)
        dev.serve()
        await dev.ws.send_str("hello")
        assert await dev.wait_closed() == 4000
        assert "text messages" in dev.close_reason

    async def test_frame_too_large(
        self, make_server: ServerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_server(max_body_size=4096)
        _, _, dev = await device(server, http)
        dev.serve()
        await dev.ws.send_bytes(b"\x11\x00\x00\x00\x00\x01" + b"x" * 8192)
        assert await dev.wait_closed() == 1009

    async def test_stream_open_is_reset_until_streams_exist(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        _, _, dev = await device(server, http)
        dev.serve()
        _, frame = dev.conn.open_stream({"kind": "test"})
        await dev.ws.send_bytes(frame)
        from backchannel.wire.native.frames import StreamReset

        await wait_for(lambda: any(isinstance(f, StreamReset) for f in dev.frames))
        assert not dev.closed.is_set()
