"""Stream channels over a pair of sans-I/O connections: flow control, FIN, reset, big transfers.

Two :class:`NativeConnection` objects (server and device roles) are wired back to back: what
one side sends is fed to the other's ``receive_message`` by a pump task, and stream frames
go to each side's :class:`StreamMux`. No sockets: only the credit rules limit the flow.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

import pytest

from backchannel.sdk._streams import (
    CONNECTION_LOST,
    StreamChannel,
    StreamMux,
    StreamResetError,
)
from backchannel.wire.errors import LocalProtocolError
from backchannel.wire.native import NativeConnection, Role
from backchannel.wire.native.frames import (
    HEADER_SIZE,
    FrameType,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
)


class End:
    """One side: its connection, its channels, and a pump feeding it the peer's frames."""

    def __init__(self, role: Role, window: int, max_frame: int = 0) -> None:
        self.conn = NativeConnection(role, stream_window=window, max_frame=max_frame)
        self.mux = StreamMux(self.conn, self.send)
        self.peer: End
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.accepted: asyncio.Queue[StreamChannel] = asyncio.Queue()
        self.sent: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.peer.inbox.put_nowait(frame)

    def sent_of(self, ftype: FrameType) -> list[bytes]:
        return [f for f in self.sent if f[0] == ftype]

    async def pump(self) -> None:
        while True:
            data = await self.inbox.get()
            frame = self.conn.receive_message(data, 0.0)
            if isinstance(frame, StreamOpen):
                self.accepted.put_nowait(self.mux.accept(frame))
            elif isinstance(frame, StreamData | StreamCredit | StreamReset):
                self.mux.dispatch(frame)
            for out in self.conn.data_to_send():
                await self.send(out)


class Pair:
    """A server end and a device end, pumping until closed."""

    def __init__(self, window: int = 64 * 1024, max_frame: int = 0) -> None:
        self.server = End(Role.SERVER, window, max_frame)
        self.device = End(Role.CLIENT, window, max_frame)
        self.server.peer, self.device.peer = self.device, self.server
        self.window = window
        loop = asyncio.get_running_loop()
        self.pumps = [loop.create_task(self.server.pump()), loop.create_task(self.device.pump())]

    async def open(
        self, meta: dict[str, object] | None = None, fin: bool = False
    ) -> tuple[StreamChannel, StreamChannel]:
        """A server-opened stream: (server's channel, device's channel)."""
        mine = await self.server.mux.open(meta or {"t": "test"}, fin=fin)
        theirs = await asyncio.wait_for(self.device.accepted.get(), 2)
        return mine, theirs

    async def settle(self) -> None:
        """Let the pumps deliver everything in flight."""
        for _ in range(50):
            await asyncio.sleep(0)
        self.check()

    def check(self) -> None:
        for pump in self.pumps:
            if pump.done():
                raise AssertionError(f"pump failed: {pump.exception()!r}")

    async def close(self) -> None:
        self.check()
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    yield p
    await p.close()


async def read_all(channel: StreamChannel, watch: list[int] | None = None) -> bytes:
    parts = []
    while chunk := await channel.receive():
        parts.append(chunk)
        if watch is not None:
            watch.append(channel.buffered)
    return b"".join(parts)


async def test_round_trip_and_fin_forget_the_stream(pair: Pair) -> None:
    mine, theirs = await pair.open({"t": "http", "m": "GET"})
    assert theirs.meta == {"t": "http", "m": "GET"}
    assert theirs.stream_id == mine.stream_id and mine.stream_id % 2 == 1
    await pair.settle()
    # The acceptor granted its window; the opener got the opener's window at STREAM_OPEN.
    assert pair.server.conn.send_credit(mine.stream_id) == pair.window
    assert pair.device.conn.send_credit(theirs.stream_id) == pair.window

    await mine.send(b"hello", fin=True)
    assert await theirs.receive() == b"hello"
    assert await theirs.receive() == b""
    assert await theirs.receive() == b""  # stays at the end
    await theirs.send(b"world")
    await theirs.send(b"!", fin=True)
    assert await read_all(mine) == b"world!"
    await pair.settle()
    for end, ch in ((pair.server, mine), (pair.device, theirs)):
        assert ch.finished and ch.error is None
        assert not end.conn.stream_open(ch.stream_id)
        assert len(end.mux) == 0


async def test_open_with_fin(pair: Pair) -> None:
    mine, theirs = await pair.open(fin=True)
    assert theirs.remote_fin
    assert await theirs.receive() == b""
    await pair.settle()
    assert pair.device.sent_of(FrameType.STREAM_CREDIT) == []  # no credit after a FIN open
    await theirs.send(b"answer", fin=True)
    assert await read_all(mine) == b"answer"
    await pair.settle()
    assert len(pair.server.mux) == len(pair.device.mux) == 0


async def test_empty_send_is_a_no_op_and_send_after_fin_fails(pair: Pair) -> None:
    mine, theirs = await pair.open()
    await mine.send(b"")
    assert pair.server.sent_of(FrameType.STREAM_DATA) == []
    await mine.close()
    await mine.close()  # once only
    assert len(pair.server.sent_of(FrameType.STREAM_DATA)) == 1
    with pytest.raises(LocalProtocolError):
        await mine.send(b"late")
    assert await theirs.receive() == b""


@pytest.mark.parametrize("direction", ["down", "up"])
async def test_large_transfer_is_exact_and_bounded(direction: str) -> None:
    window = 64 * 1024
    p = Pair(window=window)
    try:
        mine, theirs = await p.open()
        sender, receiver = (mine, theirs) if direction == "down" else (theirs, mine)
        rng = random.Random(7)
        block = rng.randbytes(1 << 20)
        total = 16 << 20
        expected = hashlib.sha256(block * (total // len(block))).hexdigest()

        async def produce() -> None:
            for _ in range(total // len(block)):
                await sender.send(block)
            await sender.send(b"", fin=True)

        producer = asyncio.get_running_loop().create_task(produce())
        seen: list[int] = []
        h = hashlib.sha256()
        n = 0
        while chunk := await receiver.receive():
            h.update(chunk)
            n += len(chunk)
            seen.append(receiver.buffered)
            if n % (1 << 20) < len(chunk):
                await asyncio.sleep(0)  # let the producer run ahead, if it could
        await producer
        assert n == total and h.hexdigest() == expected
        assert max(seen) <= window  # never more than the window buffered
        p.check()  # and no flow-control violation was raised by the receiving connection
    finally:
        await p.close()


async def test_slow_consumer_stalls_the_sender() -> None:
    pair = Pair(window=256 * 1024)  # four frames of 64 KiB
    try:
        mine, theirs = await pair.open()
        sender = asyncio.get_running_loop().create_task(mine.send(b"x" * (1 << 20), fin=True))
        await pair.settle()
        assert not sender.done()
        assert theirs.buffered == pair.window  # exactly the window, not a byte more
        assert pair.server.conn.send_credit(mine.stream_id) == 0
        credits = len(pair.device.sent_of(FrameType.STREAM_CREDIT))  # the initial grant only
        assert credits == 1
        # Consuming less than half a window returns nothing yet...
        taken = len(await theirs.receive())
        assert taken < pair.window // 2
        await pair.settle()
        assert len(pair.device.sent_of(FrameType.STREAM_CREDIT)) == credits
        assert theirs.buffered == pair.window - taken
        # ...half a window does, and the sender moves on (by that much only).
        while taken < pair.window // 2:
            taken += len(await theirs.receive())
        await pair.settle()
        assert len(pair.device.sent_of(FrameType.STREAM_CREDIT)) == credits + 1
        credit = StreamCredit.parse(0, 0, pair.device.sent_of(FrameType.STREAM_CREDIT)[-1][6:])
        assert credit.increment == taken
        assert theirs.buffered == pair.window
        assert not sender.done()
        rest = await read_all(theirs)
        await sender
        assert taken + len(rest) == 1 << 20
    finally:
        await pair.close()


async def test_frames_respect_max_frame() -> None:
    p = Pair(window=64 * 1024, max_frame=1000)
    try:
        mine, theirs = await p.open()
        body = bytes(range(256)) * 1000
        await asyncio.gather(mine.send(body, fin=True), read_all(theirs))
        frames = p.server.sent_of(FrameType.STREAM_DATA)
        assert frames and max(len(f) for f in frames) <= 1000
        assert sum(len(f) - HEADER_SIZE for f in frames) == len(body)
    finally:
        await p.close()


async def test_peer_reset_fails_pending_receive_and_send(pair: Pair) -> None:
    mine, theirs = await pair.open()
    loop = asyncio.get_running_loop()
    receiving = loop.create_task(theirs.receive())
    # Credit runs out after one window: the rest of this send waits for credit.
    sending = loop.create_task(theirs.send(b"y" * (pair.window * 3)))
    await pair.settle()
    assert not receiving.done() and not sending.done()
    await mine.reset(7, "caller went away")
    for task in (receiving, sending):
        with pytest.raises(StreamResetError) as info:
            await asyncio.wait_for(task, 2)
        assert (info.value.code, info.value.reason) == (7, "caller went away")
    assert theirs.finished and theirs.buffered == 0
    await pair.settle()
    assert not pair.device.conn.stream_open(theirs.stream_id)
    assert len(pair.device.mux) == len(pair.server.mux) == 0


async def test_local_reset_and_frames_racing_it(pair: Pair) -> None:
    mine, theirs = await pair.open()
    await theirs.reset(2, "cannot reach the local service")
    await theirs.reset(3, "twice")  # only the first counts
    with pytest.raises(StreamResetError):
        await theirs.receive()
    with pytest.raises(StreamResetError):
        await theirs.send(b"x")
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(mine.receive(), 2)
    assert info.value.code == 2 and info.value.reason == "cannot reach the local service"
    assert len(pair.device.sent_of(FrameType.STREAM_RESET)) == 1
    # Data racing the reset is dropped silently by the side that forgot the stream.
    late = StreamData(theirs.stream_id, b"late").serialize()
    frame = pair.device.conn.receive_message(late, 0.0)
    assert isinstance(frame, StreamData)
    assert pair.device.mux.dispatch(frame) is None


async def test_connection_lost_fails_every_channel(pair: Pair) -> None:
    _, a = await pair.open()
    _, b = await pair.open()
    waiting = asyncio.get_running_loop().create_task(a.receive())
    await pair.settle()
    pair.device.mux.connection_lost("connection closed")
    with pytest.raises(StreamResetError) as info:
        await waiting
    assert info.value.code == CONNECTION_LOST
    with pytest.raises(StreamResetError):
        await b.send(b"x")
    assert len(pair.device.mux) == 0


async def test_send_failure_is_a_reset() -> None:
    conn = NativeConnection(Role.CLIENT, stream_window=1024)

    async def broken(frame: bytes) -> None:
        raise ConnectionResetError("gone")

    mux = StreamMux(conn, broken)
    frame = conn.receive_message(StreamOpen(1, 1024, {"t": "x"}).serialize(), 0.0)
    assert isinstance(frame, StreamOpen)
    channel = mux.accept(frame)
    with pytest.raises(StreamResetError) as info:
        await channel.send(b"data")
    assert info.value.code == CONNECTION_LOST
    assert channel.finished and len(mux) == 0


async def test_half_close_keeps_the_other_direction(pair: Pair) -> None:
    mine, theirs = await pair.open()
    await mine.send(b"request", fin=True)
    assert await read_all(theirs) == b"request"
    await pair.settle()
    assert pair.device.conn.stream_open(theirs.stream_id)  # our direction is still open
    for i in range(10):
        await theirs.send(f"part {i};".encode())
    await theirs.close()
    assert await read_all(mine) == b"".join(f"part {i};".encode() for i in range(10))
