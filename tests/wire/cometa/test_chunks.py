"""Cometa chunk framing: the server's strict chunks and the devices' looser ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire.cometa.chunks import (
    MAX_SIZE_LINE,
    ChunkReader,
    ChunkTooLarge,
    MalformedChunk,
    encode_chunk,
)
from backchannel.wire.errors import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)

HEARTBEAT = b"1\r\n\x06\r\n"
PY_EMPTY = b"0\r\n\r\n"  # the Python client's empty reply
C_EMPTY = b"2\r\n\r\n"  # the C client's: declares 2 bytes, sends only the CRLF


def feed_split(data: bytes, cuts: list[int], max_chunk: int = 1 << 16) -> list[bytes]:
    """Feed ``data`` to a fresh reader in pieces cut at ``cuts``; collect the payloads."""
    reader = ChunkReader(max_chunk)
    out: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out += reader.feed(data[start:cut])
        start = cut
    assert reader.buffered == 0
    return out


class TestEncode:
    """COMPAT.md, Cometa, Device side, point 3."""

    def test_exact_bytes(self) -> None:
        assert encode_chunk(b"hi") == b"2\r\nhi\r\n"
        assert encode_chunk(b'{"jsonrpc":"2.0"}') == b'11\r\n{"jsonrpc":"2.0"}\r\n'

    def test_lowercase_hex(self) -> None:
        assert encode_chunk(b"x" * 255).startswith(b"ff\r\n")
        assert encode_chunk(b"x" * 4096).startswith(b"1000\r\n")

    def test_empty_is_refused(self) -> None:
        with pytest.raises(LocalProtocolError):
            encode_chunk(b"")

    @given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
    def test_round_trip(self, payloads: list[bytes]) -> None:
        stream = b"".join(encode_chunk(p) for p in payloads)
        # b"\r\n" alone is the C client's empty reply (see TestEmptyReplies).
        assert ChunkReader(1024).feed(stream) == [b"" if p == b"\r\n" else p for p in payloads]


class TestEmptyReplies:
    """COMPAT.md, Cometa, Device side, point 4: both empty-reply framings."""

    @pytest.mark.parametrize("empty", [PY_EMPTY, C_EMPTY])
    def test_alone(self, empty: bytes) -> None:
        assert ChunkReader(1024).feed(empty) == [b""]

    @pytest.mark.parametrize("empty", [PY_EMPTY, C_EMPTY])
    def test_followed_directly_by_a_size_line(self, empty: bytes) -> None:
        stream = empty + HEARTBEAT + empty + b"3\r\nabc\r\n" + empty
        assert ChunkReader(1024).feed(stream) == [b"", b"\x06", b"", b"abc", b""]

    def test_c_empty_reply_does_not_eat_the_next_size_line(self) -> None:
        # After the 2 declared bytes (the CRLF) the next bytes are a size line, not a CRLF.
        assert ChunkReader(1024).feed(C_EMPTY + b"5\r\nhello") == [b"", b"hello"]

    def test_both_framings_at_every_split(self) -> None:
        stream = C_EMPTY + PY_EMPTY + HEARTBEAT + C_EMPTY + C_EMPTY + PY_EMPTY
        for k in range(len(stream) + 1):
            assert feed_split(stream, [k]) == [b"", b"", b"\x06", b"", b"", b""], k


class TestTolerance:
    """COMPAT.md, Cometa, Device side, point 4: the size line, the bytes, an optional CRLF."""

    @pytest.mark.parametrize(
        ("stream", "payloads"),
        [
            (b"5\r\nhello\r\n", [b"hello"]),
            (b"5\nhello\n", [b"hello"]),
            (b"5\r\nhello", [b"hello"]),
            (b"3\r\nabc4\r\nwxyz", [b"abc", b"wxyz"]),
            (b"3\r\nabc\n4\nwxyz\r\n", [b"abc", b"wxyz"]),
            (b"5;name=value\r\nhello\r\n", [b"hello"]),
            (b"5 ; ext\r\nhello\r\n", [b"hello"]),
            (b"  5  \r\nhello\r\n", [b"hello"]),
            (b"\t5\t\r\nhello\r\n", [b"hello"]),
            (b"A\r\n0123456789\r\n", [b"0123456789"]),
            (b"a\r\n0123456789\r\n", [b"0123456789"]),
            (b"0005\r\nhello\r\n", [b"hello"]),
            (b"\r\n\r\n\n  \r\n5\r\nhello\r\n\r\n\r\n1\r\n\x06", [b"hello", b"\x06"]),
            (b"3\r\n\r\n\r\r\n", [b"\r\n\r"]),
            (b"4\r\n\r\n\r\n", [b"\r\n\r\n"]),
            (b"\r5\r\nhello", [b"hello"]),
        ],
    )
    def test_tolerated(self, stream: bytes, payloads: list[bytes]) -> None:
        assert ChunkReader(1024).feed(stream) == payloads

    def test_payload_bytes_are_opaque(self) -> None:
        payload = bytes(range(256))
        assert ChunkReader(1024).feed(b"100\r\n" + payload + b"\r\n") == [payload]

    def test_back_to_back(self) -> None:
        stream = HEARTBEAT + b"4\r\n\x07abc\r\n" + b"2\r\nok\r\n"
        assert ChunkReader(1024).feed(stream) == [b"\x06", b"\x07abc", b"ok"]

    def test_split_at_every_byte_position(self) -> None:
        stream = HEARTBEAT + C_EMPTY + b"5;x=1 \r\nhello\r\n" + PY_EMPTY + b"3\nabc4\r\nwxyz"
        expected = [b"\x06", b"", b"hello", b"", b"abc", b"wxyz"]
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                assert feed_split(stream, [i, j]) == expected, (i, j)

    def test_one_byte_at_a_time(self) -> None:
        stream = b"".join(encode_chunk(b"x" * n) for n in range(1, 40))
        reader = ChunkReader(1024)
        out: list[bytes] = []
        for byte in stream:
            out += reader.feed(bytes([byte]))
        assert out == [b"x" * n for n in range(1, 40)]

    def test_empty_feed(self) -> None:
        reader = ChunkReader(1024)
        assert reader.feed(b"") == []
        assert reader.feed(b"5\r\nhel") == []
        assert reader.feed(b"") == []
        assert reader.buffered == 3
        assert reader.feed(b"lo") == [b"hello"]

    def test_size_line_of_exactly_the_limit(self) -> None:
        line = b"5".rjust(MAX_SIZE_LINE - 2) + b"\r\n"
        assert len(line) == MAX_SIZE_LINE
        reader = ChunkReader(1024)
        assert reader.feed(line[:-1]) == []
        assert reader.feed(line[-1:] + b"hello") == [b"hello"]

    def test_chunk_of_exactly_max_chunk(self) -> None:
        assert ChunkReader(16).feed(b"10\r\n" + b"y" * 16) == [b"y" * 16]

    def test_buffer_is_compacted(self) -> None:
        reader = ChunkReader(1 << 16)
        stream = b"".join(encode_chunk(b"%d" % n) for n in range(5000))
        assert len(reader.feed(stream + b"400\r\n" + b"z" * 100)) == 5000
        assert reader.buffered == 100
        assert len(reader._buf) == 100  # the consumed bytes did not stay in memory

    @given(
        st.lists(
            st.tuples(
                st.binary(max_size=200).filter(lambda p: p != b"\r\n"),
                st.sampled_from([b"%x\r\n", b"%X\n", b"%x;ext=1\r\n", b" %x \r\n", b"\r\n%x\r\n"]),
                st.sampled_from([b"\r\n", b"\n", b""]),
            ),
            max_size=10,
        ),
        st.lists(st.integers(0, 4000), max_size=6),
    )
    def test_any_framing_any_split(
        self, chunks: list[tuple[bytes, bytes, bytes]], cuts: list[int]
    ) -> None:
        stream = b"".join(line % len(payload) + payload + end for payload, line, end in chunks)
        cuts = [min(c, len(stream)) for c in cuts]
        assert feed_split(stream, cuts) == [payload for payload, _, _ in chunks]


class TestMalformed:
    """Broken framing is a RemoteProtocolError; the transport closes the device."""

    @pytest.mark.parametrize(
        "stream",
        [
            b"zz\r\n",
            b"0x5\r\nhello",
            b"-1\r\n",
            b"+5\r\nhello",
            b"1_0\r\n",
            b"5 5\r\nhello",
            b";ext\r\n",
            b"5\r\nhelloGARBAGE\r\n",
            b"\x06\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\xd9\xa3\r\n",
        ],
    )
    def test_garbage(self, stream: bytes) -> None:
        with pytest.raises(MalformedChunk) as info:
            ChunkReader(1024).feed(stream)
        assert isinstance(info.value, RemoteProtocolError)
        assert info.value.error_code == "malformed_chunk"

    def test_size_line_too_long_without_newline(self) -> None:
        reader = ChunkReader(1024)
        assert reader.feed(b"0" * MAX_SIZE_LINE) == []
        with pytest.raises(MalformedChunk):
            reader.feed(b"0")

    def test_size_line_too_long_with_newline(self) -> None:
        with pytest.raises(MalformedChunk):
            ChunkReader(1024).feed(b"5".rjust(MAX_SIZE_LINE) + b"\r\n")

    def test_chunk_over_max_chunk(self) -> None:
        with pytest.raises(ChunkTooLarge) as info:
            ChunkReader(16).feed(b"11\r\n")
        error = info.value
        assert isinstance(error, MalformedChunk)
        assert isinstance(error, FrameTooLarge)
        assert error.error_code == "frame_too_large"
        assert (error.close_code, error.status_hint) == (1009, 413)

    def test_huge_declared_size(self) -> None:
        with pytest.raises(ChunkTooLarge):
            ChunkReader(1 << 16).feed(b"f" * 30 + b"\r\n")

    def test_reader_stays_broken(self) -> None:
        reader = ChunkReader(1024)
        with pytest.raises(MalformedChunk):
            reader.feed(b"1\r\nx\r\nnope\r\n")
        with pytest.raises(MalformedChunk):
            reader.feed(HEARTBEAT)

    def test_max_chunk_must_admit_the_c_empty_reply(self) -> None:
        with pytest.raises(ValueError):
            ChunkReader(1)
        assert ChunkReader(2).feed(C_EMPTY) == [b""]


@given(st.binary(max_size=512), st.lists(st.integers(0, 512), max_size=4), st.integers(2, 64))
def test_fuzz_invariant(data: bytes, cuts: list[int], max_chunk: int) -> None:
    """Payloads come back or a ProtocolError is raised; nothing else escapes."""
    reader = ChunkReader(max_chunk)
    start = 0
    try:
        for cut in [*sorted(min(c, len(data)) for c in cuts), len(data)]:
            for payload in reader.feed(data[start:cut]):
                assert len(payload) <= max_chunk
            start = cut
    except ProtocolError:
        return
    assert reader.buffered <= len(data)
