"""The SDK's event stream: the SSE parser, ``AsyncClient.events`` with resume, ``Client.events``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from backchannel import AsyncClient, Client, Device
from backchannel.app import EVENTS
from backchannel.sdk import BackchannelError, Event, NotFound, Unauthorized
from backchannel.sdk._events import SseMessage, SseParser
from tests.conftest import RunningServer, wait_for


class TestParser:
    STREAM = (
        b"retry: 2000\nid: 7\n\n"
        b": a comment\n"
        b'id: 8\nevent: temp\ndata: {"a":1}\n\n'
        b"id: 9\r\nevent:no-space\r\ndata: line1\r\ndata:line2\r\ndata\r\n\r\n"
        b"data: unnamed\n\n"
        b"event: nodata\n\n"
        b"id: bad\0id\ndata: x\n\n"
    )
    EXPECTED = [
        SseMessage("temp", '{"a":1}', "8"),
        SseMessage("no-space", "line1\nline2\n", "9"),
        SseMessage("message", "unnamed", "9"),
        SseMessage("message", "x", "9"),
    ]

    def test_whole(self) -> None:
        parser = SseParser()
        assert parser.feed(self.STREAM) == self.EXPECTED
        assert parser.retry == 2000
        assert parser.last_id == "9"

    def test_split_at_every_byte(self) -> None:
        for cut in range(len(self.STREAM)):
            parser = SseParser()
            got = parser.feed(self.STREAM[:cut]) + parser.feed(self.STREAM[cut:])
            assert got == self.EXPECTED, cut

    def test_position_only_at_a_dispatch(self) -> None:
        parser = SseParser()
        assert parser.feed(b"retry: 2000\nid: 41\n\nid: 42\nevent: t\ndata: {") == []
        assert parser.last_id == "41"  # 42 is not complete: resuming must not skip it
        assert parser.feed(b"}\n\n") == [SseMessage("t", "{}", "42")]
        assert parser.last_id == "42"

    def test_event_objects(self) -> None:
        text = Event.from_object(
            {"id": 3, "device_id": "d", "type": "t", "ts": 1.5, "data": "é", "data_b64": None}
        )
        assert text == Event(3, "d", "t", 1.5, "é".encode())
        assert text.text == "é"
        blob = Event.from_object(
            {"id": 4, "device_id": "d", "type": "t", "ts": 2, "data": None, "data_b64": "AP8="}
        )
        assert blob.data == b"\x00\xff"
        assert Event(5, "d", "presence", 0.0, b'{"online":true}').json() == {"online": True}
        for bad in ({}, {"id": "x"}, [], {"id": 1, "device_id": "d", "type": "t", "ts": 0}):
            with pytest.raises(BackchannelError) as info:
                Event.from_object(bad)
            assert info.value.error == "bad_response"


class Proxy:
    """A TCP proxy in front of the server whose connections a test can cut."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""
        self.connections = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        """Drop every open connection at once."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(server: RunningServer) -> AsyncIterator[Proxy]:
    p = await Proxy(int(server.url.rsplit(":", 1)[1])).start()
    yield p
    await p.stop()


@contextlib.asynccontextmanager
async def emitter(server: RunningServer, app_id: str, device_id: str) -> AsyncIterator[Device]:
    key = await server.provision(app_id, device_id)
    device = Device(server.url, app_id, device_id, key, backoff_initial=0.01, backoff_max=0.1)
    task = asyncio.get_running_loop().create_task(device.serve())
    try:
        await device.wait_connected(5)
        yield device
    finally:
        await device.stop()
        await asyncio.wait_for(task, 5)


async def test_events_resume_across_cut_connections(server: RunningServer, proxy: Proxy) -> None:
    app_id, secret = await server.create_app()
    total, step = 420, 35
    got: list[Event] = []
    async with (
        emitter(server, app_id, "d1") as device,
        AsyncClient(proxy.url, app_id, secret) as client,
    ):

        async def produce() -> None:
            await wait_for(lambda: server.runner.app[EVENTS].subscribers(app_id) == 1)
            for n in range(total):
                await device.emit("n", b"%d" % n, ack=n % step == step - 1)
                if n % step == step - 1:
                    # Let the reader catch up, so each cut hits a live connection; the next
                    # events then arrive while the client reconnects.
                    await wait_for(lambda n=n: len(got) > n, timeout=10)

        producer = asyncio.create_task(produce())
        async for event in client.events(types=["n"]):
            got.append(event)
            if len(got) % (2 * step) == 0:
                proxy.cut()  # mid-stream, while the device keeps emitting
            if len(got) == total:
                break
        await producer
    assert [e.data for e in got] == [b"%d" % n for n in range(total)]
    assert [e.id for e in got] == sorted({e.id for e in got})
    assert all(e.type == "n" and e.device_id == "d1" for e in got)
    assert proxy.connections == total // (2 * step)


async def test_a_cut_before_the_first_event_loses_nothing(
    server: RunningServer, proxy: Proxy
) -> None:
    app_id, secret = await server.create_app()
    events = server.runner.app[EVENTS]
    async with (
        emitter(server, app_id, "d1") as device,
        AsyncClient(proxy.url, app_id, secret) as client,
    ):
        stream = client.events(devices=["d1"], types=["door"])
        first = asyncio.create_task(anext(stream))
        await wait_for(lambda: events.subscribers(app_id) == 1)
        proxy.cut()  # the client knows the server's position (the initial id: line) only
        await device.emit("door", b"open", ack=True)
        await device.emit("door", b"closed", ack=True)
        assert (await asyncio.wait_for(first, 10)).data == b"open"
        assert (await asyncio.wait_for(anext(stream), 5)).data == b"closed"
        await stream.aclose()


async def test_replay_filters_and_presence(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with emitter(server, app_id, "d1") as d1, emitter(server, app_id, "d2") as d2:
        await d1.emit("temp", b"\x00\x01", ack=True)
        await d2.emit("temp", b"two", ack=True)
        await d1.emit("", b"unnamed", ack=True)
    async with AsyncClient(server.url, app_id, secret) as client:
        got: list[Event] = []
        async for event in client.events(after=0, devices=["d1"]):
            got.append(event)
            if len(got) == 4:
                break
    assert [(e.type, e.device_id) for e in got] == [
        ("presence", "d1"),
        ("temp", "d1"),
        ("message", "d1"),
        ("presence", "d1"),
    ]
    assert got[1].data == b"\x00\x01"
    assert got[0].json()["online"] is True
    assert got[3].json()["online"] is False and got[3].json()["reason"] == "peer_closed"


async def test_refusals_are_raised(server: RunningServer) -> None:
    app_id, _ = await server.create_app()
    async with AsyncClient(server.url, app_id, "wrong") as client:
        with pytest.raises(Unauthorized):
            await anext(client.events())
    async with AsyncClient(server.url, "ffffffffffffffffffff", server.admin_token) as client:
        with pytest.raises(NotFound):
            await anext(client.events())


async def test_without_reconnect_the_iterator_ends(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with AsyncClient(server.url, app_id, secret) as client:
        stream = client.events(reconnect=False)
        task = asyncio.create_task(anext(stream))
        await wait_for(lambda: server.runner.app[EVENTS].subscribers(app_id) == 1)
        await server.stop()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(task, 5)


async def test_sync_client_events(server: RunningServer) -> None:
    app_id, secret = await server.create_app()
    async with emitter(server, app_id, "d1") as device:
        for n in range(3):
            await device.emit("n", b"%d" % n, ack=True)

        def consume() -> list[Event]:
            got: list[Event] = []
            with Client(server.url, app_id, secret) as client:
                for event in client.events(after=0, types=["n"]):
                    got.append(event)
                    if len(got) == 3:
                        break
            return got

        got = await asyncio.to_thread(consume)
    assert [e.data for e in got] == [b"0", b"1", b"2"]
