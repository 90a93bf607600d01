"""The Cometa connection: events from device chunks, messages to the device, liveness."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire.cometa import (
    ChunkTooLarge,
    CometaConnection,
    Heartbeat,
    MalformedChunk,
    Reply,
    Upstream,
    accept_head,
    parse_attach,
)
from backchannel.wire.errors import LocalProtocolError, ProtocolError

HEARTBEAT = b"1\r\n\x06\r\n"


def connection(now: float = 0.0) -> CometaConnection:
    return CometaConnection(max_chunk=64 * 1024, now=now)


class TestEvents:
    """COMPAT.md, Cometa, Device side, point 4."""

    def test_heartbeat(self) -> None:
        conn = connection()
        assert conn.receive_data(HEARTBEAT, 5.0) == [Heartbeat()]
        assert conn.last_heartbeat == 5.0

    def test_upstream(self) -> None:
        conn = connection()
        assert conn.receive_data(b"6\r\n\x07temp=\r\n", 1.0) == [Upstream(b"temp=")]
        assert conn.receive_data(b"1\r\n\x07\r\n", 1.0) == [Upstream(b"")]

    @pytest.mark.parametrize(
        ("stream", "body"),
        [
            (b'8\r\n{"ok":1}\r\n', b'{"ok":1}'),
            (b"0\r\n\r\n", b""),
            (b"2\r\n\r\n", b""),
            (b"2\r\n\x06\x06\r\n", b"\x06\x06"),  # a heartbeat is exactly one 0x06 byte
            (b"2\r\n\x06\x07\r\n", b"\x06\x07"),
            (b"1\r\n\x00\r\n", b"\x00"),
        ],
    )
    def test_reply(self, stream: bytes, body: bytes) -> None:
        conn = connection()
        assert conn.receive_data(stream, 1.0) == [Reply(body)]
        assert conn.last_heartbeat == 0.0

    def test_mixed_stream_in_order(self) -> None:
        stream = HEARTBEAT + b"4\r\n\x07abc\r\n" + b"2\r\n\r\n" + b"2\r\nok\r\n" + HEARTBEAT
        events = connection().receive_data(stream, 1.0)
        assert events == [Heartbeat(), Upstream(b"abc"), Reply(b""), Reply(b"ok"), Heartbeat()]

    def test_split_at_every_byte(self) -> None:
        stream = HEARTBEAT + b"4\r\n\x07abc\r\n" + b"0\r\n\r\n" + b"2\r\nok\r\n"
        expected = [Heartbeat(), Upstream(b"abc"), Reply(b""), Reply(b"ok")]
        for k in range(len(stream) + 1):
            conn = connection()
            assert conn.receive_data(stream[:k], 1.0) + conn.receive_data(stream[k:], 2.0) == (
                expected
            )

    def test_events_are_frozen_and_slotted(self) -> None:
        for event in (Heartbeat(), Upstream(b"x"), Reply(b"y")):
            assert not hasattr(event, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            Upstream(b"x").data = b"z"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            Reply(b"y").body = b"z"  # type: ignore[misc]

    def test_garbage(self) -> None:
        with pytest.raises(MalformedChunk):
            connection().receive_data(b"hello\r\n", 1.0)

    def test_chunk_over_max_chunk(self) -> None:
        conn = CometaConnection(max_chunk=16, now=0.0)
        assert conn.max_chunk == 16
        with pytest.raises(ChunkTooLarge):
            conn.receive_data(b"11\r\n", 1.0)


class TestAttachThenStream:
    """COMPAT.md, Cometa, Device side, points 1-2: one read may carry the attach and chunks."""

    def test_coalesced_read(self) -> None:
        attach = (
            b"POST /v1/applications/app/devices/AABBCCDDEEFF HTTP/1.1\r\n"
            b"Host: h\r\nContent-Length:5\r\n\r\nLinux"
        )
        data = attach + HEARTBEAT + b"1\r\n\x07\r\n"
        request = parse_attach(data)
        assert request is not None
        assert accept_head(60, 1).startswith(b"HTTP/1.1 200 OK\r\n")
        conn = connection(now=10.0)
        assert conn.receive_data(data[request.consumed :], 10.0) == [Heartbeat(), Upstream(b"")]


class TestMessages:
    """COMPAT.md, Cometa, Device side, point 3."""

    def test_one_chunk(self) -> None:
        assert connection().message(b'{"id":1}') == b'8\r\n{"id":1}\r\n'

    def test_empty_is_refused(self) -> None:
        with pytest.raises(LocalProtocolError):
            connection().message(b"")


class TestLiveness:
    """COMPAT.md, Cometa, Device side, point 5: any byte shows life."""

    def test_clocks_start_at_attach(self) -> None:
        conn = connection(now=100.0)
        assert (conn.last_received, conn.last_heartbeat) == (100.0, 100.0)
        assert not conn.is_dead(219.9, 120.0)
        assert conn.is_dead(220.0, 120.0)

    def test_any_bytes_keep_it_alive(self) -> None:
        conn = connection()
        assert conn.receive_data(b"5\r\nhel", 100.0) == []  # even an incomplete chunk
        assert conn.last_received == 100.0
        assert conn.last_heartbeat == 0.0
        assert not conn.is_dead(200.0, 120.0)
        assert conn.is_dead(220.0, 120.0)

    def test_heartbeat_updates_both(self) -> None:
        conn = connection()
        conn.receive_data(HEARTBEAT, 60.0)
        assert (conn.last_received, conn.last_heartbeat) == (60.0, 60.0)
        conn.receive_data(b"2\r\nok\r\n", 90.0)
        assert (conn.last_received, conn.last_heartbeat) == (90.0, 60.0)

    def test_no_bytes_no_update(self) -> None:
        conn = connection()
        conn.receive_data(b"", 50.0)
        assert conn.last_received == 0.0

    def test_liveness_is_configurable(self) -> None:
        conn = connection()
        assert conn.is_dead(30.0, 30.0)
        assert not conn.is_dead(30.0, 300.0)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_invariant(pieces: list[bytes]) -> None:
    """Events come back or a ProtocolError is raised; nothing else escapes."""
    conn = CometaConnection(max_chunk=32, now=0.0)
    try:
        for i, piece in enumerate(pieces):
            for event in conn.receive_data(piece, float(i)):
                assert isinstance(event, Heartbeat | Upstream | Reply)
    except ProtocolError:
        return
