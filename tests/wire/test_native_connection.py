"""The native connection state machine, driven end to end by a server/client pair."""

from __future__ import annotations

from typing import Any

import pytest

from backchannel.wire.errors import (
    FlowControlError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from backchannel.wire.native import NativeConnection, Role
from backchannel.wire.native.frames import (
    MAX_ID,
    Call,
    Cancel,
    Event,
    EventAck,
    Frame,
    FrameType,
    Hello,
    Ping,
    Pong,
    Push,
    Reply,
    StreamCredit,
    StreamData,
    StreamOpen,
    StreamReset,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
    parse_frame,
)


class ProtocolPair:
    """A server-role and a client-role connection joined by handing bytes across directly."""

    def __init__(self, **kwargs: Any) -> None:
        self.server = NativeConnection(Role.SERVER, **kwargs)
        self.client = NativeConnection(Role.CLIENT, **kwargs)
        self.now = 0.0

    def to_client(self, data: bytes) -> Frame:
        """Deliver a message from the server to the client."""
        return self.client.receive_message(data, self.now)

    def to_server(self, data: bytes) -> Frame:
        """Deliver a message from the client to the server."""
        return self.server.receive_message(data, self.now)

    def pump(self) -> list[Frame]:
        """Exchange the frames both sides produced by themselves until both are quiet."""
        delivered: list[Frame] = []
        while True:
            from_server = self.server.data_to_send()
            from_client = self.client.data_to_send()
            if not from_server and not from_client:
                return delivered
            delivered += [self.to_client(d) for d in from_server]
            delivered += [self.to_server(d) for d in from_client]

    def open_from_server(self, meta: dict[str, Any] | None = None) -> int:
        """Open a stream from the server and complete the credit handshake."""
        sid, data = self.server.open_stream(meta or {})
        self.to_client(data)
        self.pump()
        return sid


class TestCalls:
    """docs/protocol.md § Calls."""

    def test_call_and_reply_ids_match(self) -> None:
        pair = ProtocolPair()
        call_id, data = pair.server.call(b"\x01\x02", "light.set", timeout_ms=3000)
        frame = pair.to_client(data)
        assert frame == Call(call_id, b"\x01\x02", "light.set", 3000)
        reply = pair.to_server(pair.client.reply(frame.call_id, b"done"))
        assert reply == Reply(call_id, b"done")

    def test_error_reply_carries_the_flag_and_a_message(self) -> None:
        pair = ProtocolPair()
        call_id, data = pair.server.call(b"")
        pair.to_client(data)
        reply = pair.to_server(pair.client.reply(call_id, b"no such method", error=True))
        assert reply == Reply(call_id, b"no such method", error=True)

    def test_many_concurrent_calls_answered_in_any_order(self) -> None:
        pair = ProtocolPair()
        bodies: dict[int, bytes] = {}
        frames: list[bytes] = []
        for i in range(200):
            call_id, data = pair.server.call(f"req {i}".encode())
            bodies[call_id] = f"req {i}".encode()
            frames.append(data)
        assert len(bodies) == 200
        assert 0 not in bodies
        received = [pair.to_client(data) for data in frames]
        for frame in reversed(received):  # answered out of order
            assert isinstance(frame, Call)
            reply = pair.to_server(pair.client.reply(frame.call_id, frame.body + b"!"))
            assert isinstance(reply, Reply)
            assert reply.body == bodies.pop(reply.call_id) + b"!"
        assert not bodies

    def test_call_ids_wrap_without_zero(self) -> None:
        conn = NativeConnection(Role.SERVER)
        conn._next_call = MAX_ID - 1
        assert [conn.call(b"")[0] for _ in range(3)] == [MAX_ID, 1, 2]

    def test_cancel_reaches_the_device(self) -> None:
        pair = ProtocolPair()
        call_id, data = pair.server.call(b"")
        pair.to_client(data)
        assert pair.to_client(pair.server.cancel(call_id)) == Cancel(call_id)

    def test_late_reply_after_cancel_is_still_parsed_for_the_adapter_to_drop(self) -> None:
        pair = ProtocolPair()
        call_id, data = pair.server.call(b"")
        pair.to_client(data)
        pair.to_client(pair.server.cancel(call_id))
        assert pair.to_server(pair.client.reply(call_id, b"late")) == Reply(call_id, b"late")


class TestEventsAndPush:
    """docs/protocol.md § Events, § Push."""

    def test_event_without_ack_has_id_zero(self) -> None:
        pair = ProtocolPair()
        event_id, data = pair.client.event("boot", b"v1")
        assert event_id == 0
        assert pair.to_server(data) == Event("boot", b"v1", 0)

    def test_event_with_ack_gets_a_nonzero_id_and_an_ack(self) -> None:
        pair = ProtocolPair()
        ids = [pair.client.event("t", b"", ack=True)[0] for _ in range(3)]
        assert ids == [1, 2, 3]
        assert pair.to_client(pair.server.event_ack(2)) == EventAck(2)

    def test_push(self) -> None:
        pair = ProtocolPair()
        assert pair.to_client(pair.server.push("config", b"{}")) == Push("config", b"{}")


class TestTopics:
    """docs/protocol.md § Topics."""

    def test_subscribe_and_unsubscribe_get_increasing_nonzero_request_ids(self) -> None:
        pair = ProtocolPair()
        first, data = pair.client.subscribe("a/+")
        second, data2 = pair.client.unsubscribe("a/+")
        assert (first, second) == (1, 2)
        assert pair.to_server(data) == Subscribe(1, "a/+")
        assert pair.to_server(data2) == Unsubscribe(2, "a/+")

    def test_request_ids_wrap_and_skip_zero(self) -> None:
        pair = ProtocolPair()
        pair.client._next_request = MAX_ID
        assert pair.client.subscribe("a")[0] == 1

    def test_ack_echoes_the_request_id_with_or_without_error(self) -> None:
        pair = ProtocolPair()
        request_id, _ = pair.client.subscribe("a")
        assert pair.to_client(pair.server.subscribe_ack(request_id)) == SubscribeAck(request_id)
        refused = pair.to_client(pair.server.subscribe_ack(request_id, "bad pattern"))
        assert refused == SubscribeAck(request_id, True, "bad pattern")

    def test_only_the_device_subscribes_and_only_the_server_acks(self) -> None:
        pair = ProtocolPair()
        with pytest.raises(LocalProtocolError):
            pair.server.subscribe("a")
        with pytest.raises(LocalProtocolError):
            pair.server.unsubscribe("a")
        with pytest.raises(LocalProtocolError):
            pair.client.subscribe_ack(1)

    def test_patterns_longer_than_255_bytes_cannot_be_sent(self) -> None:
        with pytest.raises(ValueError):
            ProtocolPair().client.subscribe("é" * 128)


def sample(ftype: FrameType, receiver: Role) -> bytes:
    """A valid frame of ``ftype``; stream ids have the parity of the receiver's peer."""
    sid = 2 if receiver is Role.SERVER else 1
    frames: dict[FrameType, Frame] = {
        FrameType.HELLO: Hello("s", 25.0, 75.0, 0),
        FrameType.PING: Ping(1),
        FrameType.PONG: Pong(1),
        FrameType.CALL: Call(1, b""),
        FrameType.REPLY: Reply(1, b""),
        FrameType.CANCEL: Cancel(1),
        FrameType.EVENT: Event("e", b""),
        FrameType.EVENT_ACK: EventAck(1),
        FrameType.PUSH: Push("t", b""),
        FrameType.SUBSCRIBE: Subscribe(1, "a/#"),
        FrameType.UNSUBSCRIBE: Unsubscribe(1, "a/#"),
        FrameType.SUBSCRIBE_ACK: SubscribeAck(1),
        FrameType.STREAM_OPEN: StreamOpen(sid, 1024),
        FrameType.STREAM_DATA: StreamData(sid, b""),
        FrameType.STREAM_CREDIT: StreamCredit(sid, 1),
        FrameType.STREAM_RESET: StreamReset(sid),
    }
    return frames[ftype].serialize()


BOTH = {FrameType.PING, FrameType.PONG} | {t for t in FrameType if t.name.startswith("STREAM_")}
SERVER_ONLY_SENDS = {
    FrameType.HELLO,
    FrameType.CALL,
    FrameType.CANCEL,
    FrameType.EVENT_ACK,
    FrameType.PUSH,
    FrameType.SUBSCRIBE_ACK,
}
DEVICE_ONLY_SENDS = {
    FrameType.REPLY,
    FrameType.EVENT,
    FrameType.SUBSCRIBE,
    FrameType.UNSUBSCRIBE,
}


class TestRoles:
    """docs/protocol.md § Frame types (the direction column)."""

    @pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
    def test_server_accepts_only_device_frames(self, ftype: FrameType) -> None:
        conn = NativeConnection(Role.SERVER)
        if ftype in BOTH | DEVICE_ONLY_SENDS:
            assert conn.receive_message(sample(ftype, Role.SERVER), 1.0).type is ftype
        else:
            with pytest.raises(RemoteProtocolError):
                conn.receive_message(sample(ftype, Role.SERVER), 1.0)

    @pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
    def test_client_accepts_only_server_frames(self, ftype: FrameType) -> None:
        conn = NativeConnection(Role.CLIENT)
        if ftype in BOTH | SERVER_ONLY_SENDS:
            assert conn.receive_message(sample(ftype, Role.CLIENT), 1.0).type is ftype
        else:
            with pytest.raises(RemoteProtocolError):
                conn.receive_message(sample(ftype, Role.CLIENT), 1.0)

    def test_server_receiving_call_is_a_protocol_error_with_close_code_4000(self) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            NativeConnection(Role.SERVER).receive_message(Call(1, b"").serialize(), 0.0)
        assert info.value.close_code == 4000

    def test_client_receiving_reply_is_a_protocol_error(self) -> None:
        with pytest.raises(RemoteProtocolError):
            NativeConnection(Role.CLIENT).receive_message(Reply(1, b"").serialize(), 0.0)

    def test_local_role_enforcement(self) -> None:
        pair = ProtocolPair()
        with pytest.raises(LocalProtocolError):
            pair.client.call(b"")
        with pytest.raises(LocalProtocolError):
            pair.server.reply(1, b"")
        with pytest.raises(LocalProtocolError):
            pair.server.event("e", b"")

    def test_garbage_raises_a_protocol_error(self) -> None:
        with pytest.raises(ProtocolError):
            NativeConnection(Role.SERVER).receive_message(b"\x7f\x00\x00\x00\x00\x00", 0.0)


class TestHeartbeats:
    """docs/protocol.md § Heartbeats, § Session start."""

    def test_ping_is_answered_with_a_pong_of_the_same_nonce_and_rtt_is_measured(self) -> None:
        pair = ProtocolPair(heartbeat=25.0)
        pair.now = 25.0
        ping = pair.server.heartbeat(pair.now)
        assert ping is not None
        frame = pair.to_client(ping)
        assert isinstance(frame, Ping)
        outgoing = pair.client.data_to_send()
        assert outgoing == [Pong(frame.nonce).serialize()]
        assert pair.client.data_to_send() == []  # drained
        assert pair.server.rtt is None
        pair.now = 25.125
        assert pair.to_server(outgoing[0]) == Pong(frame.nonce)
        assert pair.server.rtt == pytest.approx(0.125)

    def test_pong_with_a_stale_nonce_does_not_measure_rtt(self) -> None:
        pair = ProtocolPair(heartbeat=1.0)
        first = pair.server.heartbeat(1.0)
        second = pair.server.heartbeat(2.0)
        assert first is not None and second is not None
        assert parse_frame(second) == Ping(2)
        pair.to_server(Pong(1).serialize())
        assert pair.server.rtt is None

    def test_heartbeat_returns_a_ping_only_when_due(self) -> None:
        conn = NativeConnection(Role.CLIENT, heartbeat=25.0, now=100.0)
        assert conn.heartbeat(110.0) is None
        assert conn.heartbeat(124.9) is None
        first = conn.heartbeat(125.0)
        assert first is not None and parse_frame(first) == Ping(1)
        assert conn.heartbeat(126.0) is None
        second = conn.heartbeat(150.0)
        assert second is not None and parse_frame(second) == Ping(2)

    def test_is_dead_after_timeout_without_any_frame(self) -> None:
        pair = ProtocolPair(timeout=75.0)
        assert not pair.server.is_dead(75.0)
        assert pair.server.is_dead(75.5)
        pair.now = 70.0
        pair.to_server(pair.client.event("e", b"")[1])  # any frame counts
        assert not pair.server.is_dead(140.0)
        assert pair.server.is_dead(145.5)

    def test_hello_updates_the_clients_timers_and_frame_limit(self) -> None:
        server = NativeConnection(Role.SERVER, heartbeat=10.0, timeout=30.0, max_frame=1024)
        client = NativeConnection(Role.CLIENT)
        frame = client.receive_message(server.hello("sess-9", "backchannel/test"), 0.0)
        assert frame == Hello("sess-9", 10.0, 30.0, 1024, "backchannel/test")
        assert (client.heartbeat_interval, client.timeout, client.max_frame) == (10.0, 30.0, 1024)
        assert client.heartbeat(9.0) is None
        assert client.heartbeat(10.0) is not None
        assert client.is_dead(30.5)
        with pytest.raises(FrameTooLarge):
            client.receive_message(Push("t", b"x" * 1024).serialize(), 1.0)


class TestStreams:
    """docs/protocol.md § Streams and flow control."""

    def test_ids_server_odd_device_even(self) -> None:
        pair = ProtocolPair()
        assert [pair.server.open_stream({})[0] for _ in range(3)] == [1, 3, 5]
        assert [pair.client.open_stream({})[0] for _ in range(3)] == [2, 4, 6]

    def test_ids_wrap_within_their_parity(self) -> None:
        server = NativeConnection(Role.SERVER)
        client = NativeConnection(Role.CLIENT)
        server._next_stream, client._next_stream = MAX_ID, MAX_ID - 1
        assert [server.open_stream({})[0] for _ in range(2)] == [MAX_ID, 1]
        assert [client.open_stream({})[0] for _ in range(2)] == [MAX_ID - 1, 2]

    def test_open_grants_windows_both_ways(self) -> None:
        pair = ProtocolPair(stream_window=1000)
        pair.client.stream_window = 600
        sid, data = pair.server.open_stream({"path": "/x"})
        assert pair.server.send_credit(sid) == 0
        assert pair.to_client(data) == StreamOpen(sid, 1000, {"path": "/x"})
        assert pair.client.send_credit(sid) == 1000
        assert pair.pump() == [StreamCredit(sid, 600)]
        assert pair.server.send_credit(sid) == 600

    def test_send_data_spends_credit_and_beyond_credit_raises(self) -> None:
        pair = ProtocolPair(stream_window=100)
        sid = pair.open_from_server()
        assert pair.to_client(pair.server.send_data(sid, b"a" * 60)) == StreamData(sid, b"a" * 60)
        assert pair.server.send_credit(sid) == 40
        with pytest.raises(LocalProtocolError):
            pair.server.send_data(sid, b"b" * 41)
        pair.to_client(pair.server.send_data(sid, b"b" * 40))
        assert pair.server.send_credit(sid) == 0

    def test_receiving_beyond_the_window_is_a_flow_control_error(self) -> None:
        pair = ProtocolPair(stream_window=100)
        sid = pair.open_from_server()
        pair.to_server(pair.client.send_data(sid, b"x" * 90))
        with pytest.raises(FlowControlError) as info:
            pair.to_server(StreamData(sid, b"y" * 11).serialize())
        assert info.value.close_code == 4000

    def test_consumed_returns_credit_in_half_window_batches(self) -> None:
        pair = ProtocolPair(stream_window=1000)
        sid = pair.open_from_server()
        pair.to_server(pair.client.send_data(sid, b"x" * 1000))
        assert pair.client.send_credit(sid) == 0
        assert pair.server.consumed(sid, 300) is None
        assert pair.server.consumed(sid, 199) is None
        credit = pair.server.consumed(sid, 1)
        assert credit is not None
        assert pair.to_client(credit) == StreamCredit(sid, 500)
        assert pair.client.send_credit(sid) == 500
        pair.to_server(pair.client.send_data(sid, b"y" * 500))

    def test_long_transfer_never_exceeds_the_window(self) -> None:
        pair = ProtocolPair(stream_window=64)
        sid = pair.open_from_server()
        sent = received = 0
        while sent < 10_000:
            n = min(pair.server.send_credit(sid), 10_000 - sent, 7)
            assert n > 0, "sender starved"
            frame = pair.to_client(pair.server.send_data(sid, b"z" * n))
            assert isinstance(frame, StreamData)
            sent += n
            received += len(frame.data)
            credit = pair.client.consumed(sid, len(frame.data))
            if credit is not None:
                pair.to_server(credit)
        assert received == 10_000

    def test_fin_both_ways_forgets_the_stream(self) -> None:
        pair = ProtocolPair()
        sid = pair.open_from_server()
        frame = pair.to_client(pair.server.send_data(sid, b"req", fin=True))
        assert frame == StreamData(sid, b"req", fin=True)
        assert pair.server.send_credit(sid) == 0
        with pytest.raises(LocalProtocolError):
            pair.server.send_data(sid, b"more")
        assert pair.client.consumed(sid, 10**6) is None  # no credit after the peer's FIN
        assert pair.server.stream_open(sid) and pair.client.stream_open(sid)
        pair.to_server(pair.client.send_data(sid, b"resp", fin=True))
        assert not pair.server.stream_open(sid)
        assert not pair.client.stream_open(sid)

    def test_data_after_fin_is_a_protocol_error(self) -> None:
        pair = ProtocolPair()
        sid = pair.open_from_server()
        pair.to_client(pair.server.send_data(sid, b"", fin=True))
        with pytest.raises(RemoteProtocolError):
            pair.to_client(StreamData(sid, b"x").serialize())

    def test_open_with_fin_grants_no_credit_back(self) -> None:
        pair = ProtocolPair()
        sid, data = pair.client.open_stream({"topic": "logs"}, fin=True)
        assert pair.to_server(data) == StreamOpen(
            sid, pair.client.stream_window, {"topic": "logs"}, fin=True
        )
        assert pair.pump() == []
        pair.to_client(pair.server.send_data(sid, b"only one way", fin=True))
        assert not pair.server.stream_open(sid) and not pair.client.stream_open(sid)

    def test_reset_forgets_the_stream_on_both_sides(self) -> None:
        pair = ProtocolPair()
        sid = pair.open_from_server()
        frame = pair.to_server(pair.client.reset_stream(sid, 7, "gone"))
        assert frame == StreamReset(sid, 7, "gone")
        assert not pair.server.stream_open(sid) and not pair.client.stream_open(sid)
        with pytest.raises(LocalProtocolError):
            pair.server.send_data(sid, b"")
        # Frames racing the reset are ignored, not errors.
        assert pair.to_client(StreamData(sid, b"x" * 10**6).serialize()) == StreamData(
            sid, b"x" * 10**6
        )
        pair.to_client(StreamCredit(sid, 5).serialize())
        assert pair.client.consumed(sid, 10**6) is None

    @pytest.mark.parametrize(("role", "sid"), [(Role.SERVER, 1), (Role.CLIENT, 2)])
    def test_stream_id_with_the_wrong_parity_is_rejected(self, role: Role, sid: int) -> None:
        with pytest.raises(RemoteProtocolError):
            NativeConnection(role).receive_message(StreamOpen(sid, 10).serialize(), 0.0)

    def test_duplicate_open_is_rejected(self) -> None:
        pair = ProtocolPair()
        _, data = pair.server.open_stream({})
        pair.to_client(data)
        with pytest.raises(RemoteProtocolError):
            pair.to_client(data)
