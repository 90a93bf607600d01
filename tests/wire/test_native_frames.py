"""Frames of the native protocol: layout, round trips, malformed input, the fuzz invariant."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel.wire.errors import (
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    UnknownFrameType,
)
from backchannel.wire.native.frames import (
    HEADER,
    HEADER_SIZE,
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

DEFAULT_MAX_FRAME = 16 * 1024 * 1024 + 512

ALL_FRAMES: list[Frame] = [
    Hello("sess-1", 25.0, 75.0, DEFAULT_MAX_FRAME, "backchannel/0.1"),
    Ping(1),
    Pong(MAX_ID),
    Call(7, b"\x00\x01body", "light.set", 5000),
    Call(8, b""),
    Reply(7, b"ok"),
    Reply(9, b"device on fire", error=True),
    Cancel(7),
    Event("temperature", b"\x12\x34", 3),
    Event("boot", b""),
    EventAck(3),
    Push("config", b"{}"),
    Subscribe(1, "sensors/+/temp"),
    Unsubscribe(MAX_ID, "sensors/#"),
    SubscribeAck(1),
    SubscribeAck(2, error=True, reason="too many subscriptions"),
    StreamOpen(1, 256 * 1024, {"method": "GET", "path": "/", "headers": [["host", "x"]]}),
    StreamOpen(2, 1024, fin=True),
    StreamData(1, b"chunk"),
    StreamData(1, b"", fin=True),
    StreamCredit(1, 128 * 1024),
    StreamReset(1, 2, "upstream closed"),
    StreamReset(3),
]


def frame_bytes(ftype: int, payload: bytes = b"", *, flags: int = 0, ident: int = 0) -> bytes:
    """Build raw frame bytes, bypassing the serializers (for malformed input)."""
    return HEADER.pack(ftype, flags, ident) + payload


class TestFrameHeader:
    """docs/protocol.md § Frame header, § Example: a CALL and its REPLY."""

    def test_header_is_six_bytes_type_flags_big_endian_id(self) -> None:
        assert HEADER_SIZE == 6
        assert frame_bytes(0x11, flags=0x01, ident=0x01020304) == bytes.fromhex("11 01 01020304")

    def test_call_exact_bytes(self) -> None:
        data = Call(7, b"hi", "ping", 5000).serialize()
        assert data == bytes.fromhex(
            "10"  # type CALL
            "00"  # flags
            "00000007"  # call id 7
            "00001388"  # timeout 5000 ms
            "04"  # method length
            "70696e67"  # "ping"
            "6869"  # body "hi"
        )

    def test_reply_exact_bytes(self) -> None:
        assert Reply(7, b"ok").serialize() == bytes.fromhex("11 00 00000007 6f6b")
        assert Reply(7, b"no", error=True).serialize() == bytes.fromhex("11 01 00000007 6e6f")

    def test_type_bytes(self) -> None:
        assert {t.name: t.value for t in FrameType} == {
            "HELLO": 0x01,
            "PING": 0x02,
            "PONG": 0x03,
            "CALL": 0x10,
            "REPLY": 0x11,
            "CANCEL": 0x12,
            "EVENT": 0x20,
            "EVENT_ACK": 0x21,
            "PUSH": 0x22,
            "SUBSCRIBE": 0x23,
            "UNSUBSCRIBE": 0x24,
            "SUBSCRIBE_ACK": 0x25,
            "STREAM_OPEN": 0x30,
            "STREAM_DATA": 0x31,
            "STREAM_CREDIT": 0x32,
            "STREAM_RESET": 0x33,
        }


class TestRoundTrip:
    """docs/protocol.md § Frame types."""

    @pytest.mark.parametrize("frame", ALL_FRAMES, ids=lambda f: type(f).__name__)
    def test_serialize_then_parse_gives_an_equal_frame(self, frame: Frame) -> None:
        parsed = parse_frame(frame.serialize())
        assert type(parsed) is type(frame)
        assert parsed == frame

    def test_every_frame_type_is_covered(self) -> None:
        assert {f.type for f in ALL_FRAMES} == set(FrameType)

    def test_hello_is_a_msgpack_map_with_the_documented_keys(self) -> None:
        data = Hello("s", 25.0, 75.0, DEFAULT_MAX_FRAME, "bc").serialize()
        assert data[:HEADER_SIZE] == b"\x01" + bytes(5)
        assert msgpack.unpackb(data[HEADER_SIZE:]) == {
            "version": 1,
            "session": "s",
            "heartbeat": 25.0,
            "timeout": 75.0,
            "max_frame": DEFAULT_MAX_FRAME,
            "server": "bc",
        }

    def test_hello_accepts_integer_timers_and_unknown_keys(self) -> None:
        payload = msgpack.packb(
            {"session": "s", "heartbeat": 10, "timeout": 30, "max_frame": 1024, "future": [1]}
        )
        frame = parse_frame(frame_bytes(FrameType.HELLO, payload))
        assert frame == Hello("s", 10.0, 30.0, 1024, server="", version=1)

    def test_subscribe_exact_bytes(self) -> None:
        assert Subscribe(5, "a/+").serialize() == bytes.fromhex("23 00 00000005 03 612f2b")
        assert Unsubscribe(5, "#").serialize() == bytes.fromhex("24 00 00000005 01 23")

    def test_subscribe_ack_exact_bytes(self) -> None:
        assert SubscribeAck(5).serialize() == bytes.fromhex("25 00 00000005")
        assert SubscribeAck(5, True, "no").serialize() == bytes.fromhex("25 01 00000005 6e6f")

    def test_subscribe_ack_error_may_have_an_empty_reason(self) -> None:
        data = frame_bytes(FrameType.SUBSCRIBE_ACK, flags=0x01, ident=3)
        assert parse_frame(data) == SubscribeAck(3, True, "")

    def test_unknown_flag_bits_are_ignored(self) -> None:
        assert parse_frame(frame_bytes(FrameType.REPLY, b"x", flags=0xFE, ident=1)) == Reply(
            1, b"x"
        )

    def test_names_longer_than_255_bytes_cannot_be_sent(self) -> None:
        with pytest.raises(ValueError):
            Call(1, b"", "m" * 256).serialize()
        with pytest.raises(ValueError):
            Event("é" * 128, b"").serialize()
        with pytest.raises(ValueError):
            Push("t" * 256, b"").serialize()
        with pytest.raises(ValueError):
            Subscribe(1, "t" * 256).serialize()


MALFORMED: list[tuple[str, bytes, type[ProtocolError]]] = [
    ("empty", b"", MalformedFrame),
    ("short header", b"\x10\x00\x00\x00\x00", MalformedFrame),
    ("unknown type 0x00", frame_bytes(0x00), UnknownFrameType),
    ("unknown type 0x7f", frame_bytes(0x7F, b"payload"), UnknownFrameType),
    ("CALL without fixed head", frame_bytes(FrameType.CALL, b"\x00\x00\x00"), MalformedFrame),
    (
        "CALL truncated method",
        frame_bytes(FrameType.CALL, struct.pack("!IB", 0, 10) + b"abc"),
        MalformedFrame,
    ),
    (
        "CALL method not UTF-8",
        frame_bytes(FrameType.CALL, struct.pack("!IB", 0, 2) + b"\xff\xfe"),
        MalformedFrame,
    ),
    ("EVENT without name length", frame_bytes(FrameType.EVENT), MalformedFrame),
    ("EVENT name truncated", frame_bytes(FrameType.EVENT, b"\x05ab"), MalformedFrame),
    ("EVENT name not UTF-8", frame_bytes(FrameType.EVENT, b"\x02\xc3\x28"), MalformedFrame),
    ("PUSH topic not UTF-8", frame_bytes(FrameType.PUSH, b"\x01\x80data"), MalformedFrame),
    ("STREAM_CREDIT 3 bytes", frame_bytes(FrameType.STREAM_CREDIT, b"\x00" * 3), MalformedFrame),
    ("STREAM_CREDIT 5 bytes", frame_bytes(FrameType.STREAM_CREDIT, b"\x00" * 5), MalformedFrame),
    ("STREAM_OPEN no window", frame_bytes(FrameType.STREAM_OPEN, b"\x00\x01"), MalformedFrame),
    (
        "STREAM_OPEN meta not msgpack",
        frame_bytes(FrameType.STREAM_OPEN, b"\x00\x00\x01\x00\xc1"),
        MalformedFrame,
    ),
    (
        "STREAM_OPEN meta not a map",
        frame_bytes(FrameType.STREAM_OPEN, b"\x00\x00\x01\x00" + msgpack.packb([1])),
        MalformedFrame,
    ),
    ("STREAM_RESET no code", frame_bytes(FrameType.STREAM_RESET, b"\x00"), MalformedFrame),
    (
        "STREAM_RESET reason not UTF-8",
        frame_bytes(FrameType.STREAM_RESET, b"\x00\x01\xff"),
        MalformedFrame,
    ),
    ("HELLO not msgpack", frame_bytes(FrameType.HELLO, b"\xc1"), MalformedFrame),
    ("HELLO trailing bytes", frame_bytes(FrameType.HELLO, b"\x80\x80"), MalformedFrame),
    ("HELLO not a map", frame_bytes(FrameType.HELLO, msgpack.packb([1, 2])), MalformedFrame),
    (
        "HELLO missing field",
        frame_bytes(FrameType.HELLO, msgpack.packb({"session": "s"})),
        MalformedFrame,
    ),
    (
        "HELLO infinite max_frame",
        frame_bytes(
            FrameType.HELLO,
            msgpack.packb(
                {"session": "s", "heartbeat": 1, "timeout": 2, "max_frame": float("inf")}
            ),
        ),
        MalformedFrame,
    ),
    ("SUBSCRIBE without length", frame_bytes(FrameType.SUBSCRIBE, ident=1), MalformedFrame),
    ("SUBSCRIBE id 0", frame_bytes(FrameType.SUBSCRIBE, b"\x01a"), MalformedFrame),
    (
        "SUBSCRIBE pattern truncated",
        frame_bytes(FrameType.SUBSCRIBE, b"\x05ab", ident=1),
        MalformedFrame,
    ),
    (
        "SUBSCRIBE pattern not UTF-8",
        frame_bytes(FrameType.SUBSCRIBE, b"\x01\xff", ident=1),
        MalformedFrame,
    ),
    (
        "SUBSCRIBE trailing bytes",
        frame_bytes(FrameType.SUBSCRIBE, b"\x01ab", ident=1),
        MalformedFrame,
    ),
    ("UNSUBSCRIBE id 0", frame_bytes(FrameType.UNSUBSCRIBE, b"\x01a"), MalformedFrame),
    (
        "UNSUBSCRIBE trailing bytes",
        frame_bytes(FrameType.UNSUBSCRIBE, b"\x00x", ident=1),
        MalformedFrame,
    ),
    (
        "SUBSCRIBE_ACK payload without ERROR",
        frame_bytes(FrameType.SUBSCRIBE_ACK, b"x", ident=1),
        MalformedFrame,
    ),
    (
        "SUBSCRIBE_ACK reason not UTF-8",
        frame_bytes(FrameType.SUBSCRIBE_ACK, b"\xff", flags=0x01, ident=1),
        MalformedFrame,
    ),
    ("PING with payload", frame_bytes(FrameType.PING, b"x"), MalformedFrame),
    ("PONG with payload", frame_bytes(FrameType.PONG, b"x"), MalformedFrame),
    ("CANCEL with payload", frame_bytes(FrameType.CANCEL, b"x"), MalformedFrame),
    ("EVENT_ACK with payload", frame_bytes(FrameType.EVENT_ACK, b"x"), MalformedFrame),
]


class TestMalformed:
    """docs/protocol.md § Frame types, § Limits, § Close codes."""

    @pytest.mark.parametrize(
        ("data", "error"), [(d, e) for _, d, e in MALFORMED], ids=[n for n, _, _ in MALFORMED]
    )
    def test_raises_the_right_protocol_error(self, data: bytes, error: type[ProtocolError]) -> None:
        with pytest.raises(error) as info:
            parse_frame(data)
        assert type(info.value) is error
        assert info.value.close_code == 4000

    def test_frame_too_large(self) -> None:
        frame = Reply(1, b"x" * 100).serialize()
        assert parse_frame(frame, max_size=len(frame)) == Reply(1, b"x" * 100)
        with pytest.raises(FrameTooLarge) as info:
            parse_frame(frame, max_size=len(frame) - 1)
        assert info.value.close_code == 1009
        assert info.value.status_hint == 413

    def test_size_is_checked_before_anything_else(self) -> None:
        with pytest.raises(FrameTooLarge):
            parse_frame(b"\xff" * 10, max_size=8)

    def test_max_size_zero_means_unlimited(self) -> None:
        assert parse_frame(StreamData(1, b"x" * 100_000).serialize(), max_size=0)


# -- hypothesis ----------------------------------------------------------------------------

ids = st.integers(min_value=0, max_value=MAX_ID)
names = st.text(st.characters(codec="utf-8"), max_size=60)  # at most 240 bytes encoded
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
numberish = st.floats() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | msgpack_values
hello_fields = st.fixed_dictionaries(
    {"session": msgpack_values} | {k: numberish for k in ("heartbeat", "timeout", "max_frame")},
    optional={"server": msgpack_values, "version": numberish, "extra": msgpack_values},
)


def assert_parses_or_protocol_error(data: bytes) -> None:
    """The fuzz invariant: a frame comes back or a ProtocolError is raised, nothing else."""
    try:
        frame = parse_frame(data)
    except ProtocolError:
        return
    assert frame.type in set(FrameType)


@given(st.binary(max_size=512))
def test_fuzz_invariant_arbitrary_bytes(data: bytes) -> None:
    assert_parses_or_protocol_error(data)


@given(st.sampled_from(FrameType), st.integers(0, 255), ids, st.binary(max_size=256))
def test_fuzz_invariant_known_type_arbitrary_payload(
    ftype: FrameType, flags: int, ident: int, payload: bytes
) -> None:
    assert_parses_or_protocol_error(frame_bytes(ftype, payload, flags=flags, ident=ident))


@settings(max_examples=500)
@given(hello_fields)
def test_fuzz_invariant_hello_with_arbitrary_fields(fields: dict[str, Any]) -> None:
    assert_parses_or_protocol_error(frame_bytes(FrameType.HELLO, msgpack.packb(fields)))


@given(msgpack_values)
def test_fuzz_invariant_stream_open_with_arbitrary_metadata(meta: Any) -> None:
    payload = struct.pack("!I", 1024) + msgpack.packb(meta)
    assert_parses_or_protocol_error(frame_bytes(FrameType.STREAM_OPEN, payload, ident=1))


@given(ids, st.binary(max_size=1024), names, st.integers(0, MAX_ID))
def test_call_round_trip(call_id: int, body: bytes, method: str, timeout_ms: int) -> None:
    frame = Call(call_id, body, method, timeout_ms)
    assert parse_frame(frame.serialize()) == frame


@given(ids, st.binary(max_size=1024), st.booleans())
def test_reply_round_trip(call_id: int, body: bytes, error: bool) -> None:
    frame = Reply(call_id, body, error)
    assert parse_frame(frame.serialize()) == frame


@given(names, st.binary(max_size=1024), ids)
def test_event_round_trip(name: str, data: bytes, event_id: int) -> None:
    frame = Event(name, data, event_id)
    assert parse_frame(frame.serialize()) == frame


@given(st.integers(min_value=1, max_value=MAX_ID), names, st.booleans())
def test_subscribe_round_trip(request_id: int, pattern: str, unsubscribe: bool) -> None:
    frame = Unsubscribe(request_id, pattern) if unsubscribe else Subscribe(request_id, pattern)
    assert parse_frame(frame.serialize()) == frame


@given(ids, st.booleans(), st.text(max_size=100))
def test_subscribe_ack_round_trip(request_id: int, error: bool, reason: str) -> None:
    frame = SubscribeAck(request_id, error, reason if error else "")
    assert parse_frame(frame.serialize()) == frame


@given(ids, st.binary(max_size=1024), st.booleans())
def test_stream_data_round_trip(stream_id: int, data: bytes, fin: bool) -> None:
    frame = StreamData(stream_id, data, fin)
    assert parse_frame(frame.serialize()) == frame


class TestHelloValues:
    """docs/protocol.md § Session start: timers must be usable."""

    @pytest.mark.parametrize(
        "fields",
        [
            {"heartbeat": float("nan")},
            {"heartbeat": -1.0},
            {"timeout": 0.0},
            {"max_frame": -5},
            {"max_frame": 1 << 50},
        ],
    )
    def test_rejects_unusable_values(self, fields: dict[str, float]) -> None:
        base = {"session": "s", "heartbeat": 25.0, "timeout": 75.0, "max_frame": 1024}
        payload = msgpack.packb({**base, **fields})
        with pytest.raises(MalformedFrame):
            parse_frame(HEADER.pack(FrameType.HELLO, 0, 0) + payload)
