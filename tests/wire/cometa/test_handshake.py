"""The Cometa attach: sniffing, parsing, and the exact bytes of the answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel.wire.cometa.chunks import ChunkReader
from backchannel.wire.cometa.handshake import (
    ATTACH_PATH,
    MAX_ATTACH_HEAD,
    MAX_REQUEST_LINE,
    AttachRequest,
    MalformedAttach,
    Sniff,
    accept_head,
    parse_attach,
    reject,
    sniff,
)
from backchannel.wire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

ATTACH = (
    b"POST /v1/applications/0123456789abcdef0123/devices/A0B1C2D3E4F5 HTTP/1.1\r\n"
    b"Host: relay.example:8080\r\n"
    b"Content-Length: 12\r\n"
    b"\r\n"
    b"Linux-device"
)
# The C client: no space after the colon.
ATTACH_NO_SPACE = (
    b"POST /v1/applications/app1/devices/42 HTTP/1.1\r\n"
    b"Host: relay.example\r\n"
    b"Content-Length:7\r\n"
    b"\r\n"
    b"ESP8266"
)
STREAM = b"1\r\n\x06\r\n" + b"2\r\n\r\n"


class TestAcceptHead:
    """COMPAT.md, Cometa, Device side, point 2."""

    def test_exact_bytes(self) -> None:
        assert accept_head(60, 1441382935) == (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"\r\n"
            b"33\r\n"
            b'{"msg":"200","heartbeat":60,"timestamp":1441382935}'
            b"\r\n"
        )

    def test_other_values(self) -> None:
        head = accept_head(90, 1700000000)
        assert head.endswith(b'{"msg":"200","heartbeat":90,"timestamp":1700000000}\r\n')

    def test_first_chunk_starts_with_msg_200(self) -> None:
        head, _, body = accept_head(60, 1441382935).partition(b"\r\n\r\n")
        assert b"Content-Length" not in head
        (payload,) = ChunkReader(1024).feed(body)
        assert payload.startswith(b'{"msg":"200"')


class TestReject:
    """COMPAT.md, Cometa, Device side, point 2: a non-200 status, a msg body, then close."""

    @pytest.mark.parametrize(
        ("status", "reason"),
        [(403, "Forbidden"), (409, "Conflict"), (400, "Bad Request"), (503, "Service Unavailable")],
    )
    def test_exact_bytes(self, status: int, reason: str) -> None:
        body = b'{"msg":"%d %b"}' % (status, reason.encode())
        assert reject(status, reason) == (
            b"HTTP/1.1 %d %b\r\n" % (status, reason.encode())
            + b"Content-Type: application/json\r\n"
            + b"Content-Length: %d\r\n" % len(body)
            + b"Connection: close\r\n"
            + b"\r\n"
            + body
        )

    def test_forbidden_literal(self) -> None:
        assert reject(403, "Forbidden") == (
            b"HTTP/1.1 403 Forbidden\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 23\r\n"
            b"Connection: close\r\n"
            b"\r\n"
            b'{"msg":"403 Forbidden"}'
        )

    @pytest.mark.parametrize(
        ("status", "reason"), [(99, "x"), (600, "x"), (403, "Bad\r\nX: y"), (403, "Verboten é")]
    )
    def test_refuses_what_http_cannot_carry(self, status: int, reason: str) -> None:
        with pytest.raises(LocalProtocolError):
            reject(status, reason)


class TestAttachPath:
    @pytest.mark.parametrize(
        "path",
        [
            "/v1/applications/a/devices/d",
            "/v1/applications/0123456789abcdef0123/devices/A0B1C2D3E4F5",
            "/v1/applications/a/devices/AA%3ABB",
            "/v1/applications/a/devices/d?x=1&y=/z",
            "/v1/applications/a/devices/d?",
        ],
    )
    def test_matches(self, path: str) -> None:
        assert ATTACH_PATH.fullmatch(path)

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/applications/a/devices/d/",
            "/v1/applications/a/devices/d/send",
            "/v1/applications/a/devices/",
            "/v1/applications//devices/d",
            "/v1/applications/a/devices",
            "/v1/applications/a/devices/d#frag",
            "/v2/applications/a/devices/d",
        ],
    )
    def test_does_not_match(self, path: str) -> None:
        assert not ATTACH_PATH.fullmatch(path)

    def test_groups(self) -> None:
        match = ATTACH_PATH.fullmatch("/v1/applications/app/devices/dev?q=1")
        assert match is not None
        assert (match["app_id"], match["device_id"]) == ("app", "dev")


def first_other(data: bytes) -> int:
    """The length of the shortest prefix answered OTHER, checking every longer one is too."""
    results = [sniff(data[:k]) for k in range(len(data) + 1)]
    first = results.index(Sniff.OTHER)
    assert all(r is Sniff.NEED_MORE for r in results[:first]), results
    assert all(r is Sniff.OTHER for r in results[first:]), results
    return first


class TestSniff:
    """COMPAT.md, Cometa, Device side, point 1: the attach shares the API's port."""

    @pytest.mark.parametrize(
        "request_bytes",
        [
            ATTACH,
            ATTACH_NO_SPACE,
            b"POST /v1/applications/a/devices/d HTTP/1.0\n\n",
            b"POST /v1/applications/a/devices/AA%3ABB?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        ],
    )
    def test_every_prefix_of_an_attach(self, request_bytes: bytes) -> None:
        line_end = request_bytes.index(b"\n") + 1
        for k in range(len(request_bytes) + 1):
            expected = Sniff.ATTACH if k >= line_end else Sniff.NEED_MORE
            assert sniff(request_bytes[:k]) is expected, request_bytes[:k]

    @pytest.mark.parametrize(
        ("request_bytes", "deciding_prefix"),
        [
            (b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n", b"G"),
            (
                b"POST /v1/applications/a/devices/d/send HTTP/1.1\r\n\r\n",
                b"POST /v1/applications/a/devices/d/",
            ),
            (b"GET /v1/applications/a/devices/d HTTP/1.1\r\n\r\n", b"G"),
            (b"POST /go/x HTTP/1.1\r\n\r\n", b"POST /g"),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x16"),
            (b"PUT /v1/applications/a/devices/d HTTP/1.1\r\n\r\n", b"PU"),
            (b"post /v1/applications/a/devices/d HTTP/1.1\r\n\r\n", b"p"),
            (b"POST  /v1/applications/a/devices/d HTTP/1.1\r\n", b"POST  "),
            (b"\r\nPOST /v1/applications/a/devices/d HTTP/1.1\r\n", b"\r"),
            (b"POST /v1/applications//devices/d HTTP/1.1\r\n", b"POST /v1/applications//"),
            (
                b"POST /v1/applications/a/devices/ HTTP/1.1\r\n",
                b"POST /v1/applications/a/devices/ ",
            ),
            (
                b"POST /v1/applications/a/devices/d#x HTTP/1.1\r\n",
                b"POST /v1/applications/a/devices/d#",
            ),
            (
                b"POST /v1/applications/a\xc3\xa9/devices/d HTTP/1.1\r\n",
                b"POST /v1/applications/a\xc3",
            ),
            (
                b"POST /v1/applications/a/devices/d HTTP/2.0\r\n\r\n",
                b"POST /v1/applications/a/devices/d HTTP/2",
            ),
            (
                b"POST /v1/applications/a/devices/d HTTP/1.2\r\n\r\n",
                b"POST /v1/applications/a/devices/d HTTP/1.2",
            ),
            (
                b"POST /v1/applications/a/devices/d HTTP/1.1 \r\n\r\n",
                b"POST /v1/applications/a/devices/d HTTP/1.1 ",
            ),
            (
                b"POST /v1/applications/a/devices/d HTTP/1.1\rX\n",
                b"POST /v1/applications/a/devices/d HTTP/1.1\rX",
            ),
        ],
    )
    def test_other_requests_are_handed_on_as_early_as_possible(
        self, request_bytes: bytes, deciding_prefix: bytes
    ) -> None:
        # OTHER comes with the first byte that cannot continue an attach request line.
        assert request_bytes[: first_other(request_bytes)] == deciding_prefix

    def test_empty_needs_more(self) -> None:
        assert sniff(b"") is Sniff.NEED_MORE

    def test_gives_up_without_a_line_end(self) -> None:
        line = b"POST /v1/applications/a/devices/" + b"d" * 3000
        assert sniff(line[: MAX_REQUEST_LINE - 1]) is Sniff.NEED_MORE
        assert sniff(line[:MAX_REQUEST_LINE]) is Sniff.OTHER
        assert sniff(line) is Sniff.OTHER

    def test_longest_attach_line(self) -> None:
        prefix = b"POST /v1/applications/a/devices/"
        suffix = b" HTTP/1.1\r\n"
        longest = prefix + b"d" * (MAX_REQUEST_LINE - len(prefix) - len(suffix)) + suffix
        assert sniff(longest) is Sniff.ATTACH
        too_long = prefix + b"d" * (MAX_REQUEST_LINE - len(prefix) - len(suffix) + 1) + suffix
        assert sniff(too_long) is Sniff.OTHER

    @given(st.binary(max_size=256))
    def test_never_raises(self, data: bytes) -> None:
        assert sniff(data) in set(Sniff)

    @given(st.binary(max_size=128), st.data())
    def test_decisions_are_final(self, data: bytes, draw: st.DataObject) -> None:
        k = draw.draw(st.integers(0, len(data)))
        early = sniff(data[:k])
        if early is not Sniff.NEED_MORE:
            assert sniff(data) is early

    @given(
        st.text(st.sampled_from("abcXYZ019-_.~:%@!$&'()*+,;="), min_size=1, max_size=20),
        st.text(st.sampled_from("abcXYZ019-_.~:%@"), min_size=1, max_size=20),
        st.sampled_from(["", "?", "?a=b/c?d"]),
        st.sampled_from([b"\r\n", b"\n"]),
    )
    def test_generated_attach_lines(self, app: str, dev: str, query: str, eol: bytes) -> None:
        line = f"POST /v1/applications/{app}/devices/{dev}{query} HTTP/1.1".encode() + eol
        for k in range(len(line)):
            assert sniff(line[:k]) is Sniff.NEED_MORE
        assert sniff(line) is Sniff.ATTACH
        assert ATTACH_PATH.fullmatch(f"/v1/applications/{app}/devices/{dev}{query}")


class TestParseAttach:
    """COMPAT.md, Cometa, Device side, point 1."""

    def test_python_client(self) -> None:
        assert parse_attach(ATTACH) == AttachRequest(
            app_id="0123456789abcdef0123",
            device_id="A0B1C2D3E4F5",
            platform="Linux-device",
            headers={"host": "relay.example:8080", "content-length": "12"},
            consumed=len(ATTACH),
        )

    def test_content_length_without_space(self) -> None:
        request = parse_attach(ATTACH_NO_SPACE)
        assert request is not None
        assert (request.app_id, request.device_id, request.platform) == ("app1", "42", "ESP8266")
        assert request.consumed == len(ATTACH_NO_SPACE)

    def test_bytes_after_the_body_belong_to_the_chunk_stream(self) -> None:
        request = parse_attach(ATTACH + STREAM)
        assert request is not None
        assert request.consumed == len(ATTACH)
        assert (ATTACH + STREAM)[request.consumed :] == STREAM

    @pytest.mark.parametrize("data", [ATTACH, ATTACH_NO_SPACE])
    def test_split_at_every_byte(self, data: bytes) -> None:
        expected = parse_attach(data)
        assert expected is not None
        for k in range(len(data)):
            assert parse_attach(data[:k]) is None, k
        for k in range(len(STREAM) + 1):
            assert parse_attach(data + STREAM[:k]) == expected

    def test_lf_line_ends_and_header_case(self) -> None:
        data = b"POST /v1/applications/a/devices/d HTTP/1.0\nHOST: h\ncOnTeNt-LeNgTh:  3 \n\nabcXYZ"
        request = parse_attach(data)
        assert request is not None
        assert request.platform == "abc"
        assert request.headers == {"host": "h", "content-length": "3"}
        assert data[request.consumed :] == b"XYZ"

    def test_mixed_line_ends(self) -> None:
        data = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 2\n\r\nok"
        request = parse_attach(data)
        assert request is not None
        assert request.platform == "ok"

    def test_no_content_length_means_empty_platform(self) -> None:
        data = b"POST /v1/applications/a/devices/d HTTP/1.1\r\n\r\n1\r\n\x06\r\n"
        request = parse_attach(data)
        assert request is not None
        assert request.platform == ""
        assert request.headers == {}
        assert data[request.consumed :] == b"1\r\n\x06\r\n"

    def test_no_host_is_fine(self) -> None:
        request = parse_attach(b"POST /v1/applications/a/devices/d HTTP/1.1\r\n\r\n")
        assert request is not None

    def test_ids_are_percent_decoded(self) -> None:
        data = b"POST /v1/applications/a%20b/devices/AA%3ABB%3acaf%C3%A9 HTTP/1.1\r\n\r\n"
        request = parse_attach(data)
        assert request is not None
        assert (request.app_id, request.device_id) == ("a b", "AA:BB:café")

    def test_query_is_ignored(self) -> None:
        data = b"POST /v1/applications/a/devices/d?token=x/y HTTP/1.1\r\n\r\n"
        request = parse_attach(data)
        assert request is not None
        assert (request.app_id, request.device_id) == ("a", "d")

    def test_platform_is_decoded_with_replacement_and_stripped(self) -> None:
        body = b"  Linux \xff\xfe\r\n"
        data = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(
            body
        )
        request = parse_attach(data + body)
        assert request is not None
        assert request.platform == "Linux \ufffd\ufffd"

    def test_repeated_headers_are_joined(self) -> None:
        data = (
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nz"
        )
        request = parse_attach(data)
        assert request is not None
        assert request.headers == {"x-a": "1, 2", "content-length": "1"}

    def test_long_zero_padded_content_length(self) -> None:
        data = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: %b2\r\n\r\nok" % (
            b"0" * 5000
        )
        request = parse_attach(data)
        assert request is not None
        assert request.platform == "ok"

    def test_body_of_exactly_max_body(self) -> None:
        data = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 8\r\n\r\n12345678"
        request = parse_attach(data, max_body=8)
        assert request is not None
        assert request.platform == "12345678"

    @pytest.mark.parametrize(
        "head",
        [
            b"GET /v1/applications/a/devices/d HTTP/1.1\r\n\r\n",
            b"POST /v1/applications/a/devices/d/ HTTP/1.1\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/2.0\r\n\r\n",
            b"\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 1.5\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length:\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 4097\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: %b\r\n\r\n"
            % (b"9" * 5000),
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nHost h\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length : 1\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"POST /v1/applications/a/devices/d HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"POST /v1/applications/a/devices/%FF HTTP/1.1\r\n\r\n",
            b"POST /v1/applications/a/devices/a%2Fb HTTP/1.1\r\n\r\n",
            b"POST /v1/applications/a%00/devices/d HTTP/1.1\r\n\r\n",
            b"POST /v1/applications/a/devices/d%0A HTTP/1.1\r\n\r\n",
        ],
    )
    def test_malformed(self, head: bytes) -> None:
        with pytest.raises(MalformedAttach) as info:
            parse_attach(head)
        assert isinstance(info.value, RemoteProtocolError)
        assert info.value.status_hint == 400

    def test_body_over_max_body_is_refused_before_it_arrives(self) -> None:
        head = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
        with pytest.raises(MalformedAttach):
            parse_attach(head, max_body=99)

    def test_head_over_8_kib(self) -> None:
        start = b"POST /v1/applications/a/devices/d HTTP/1.1\r\nX: "
        assert parse_attach(start + b"x" * (MAX_ATTACH_HEAD - len(start) - 1)) is None
        with pytest.raises(MalformedAttach):
            parse_attach(start + b"x" * (MAX_ATTACH_HEAD - len(start)))
        fits = start + b"x" * (MAX_ATTACH_HEAD - len(start) - 4) + b"\r\n\r\n"
        assert len(fits) == MAX_ATTACH_HEAD
        assert parse_attach(fits) is not None
        with pytest.raises(MalformedAttach):
            parse_attach(start + b"x" * (MAX_ATTACH_HEAD - len(start) - 3) + b"\r\n\r\n")

    @given(st.binary(max_size=512))
    def test_fuzz_invariant_arbitrary_bytes(self, data: bytes) -> None:
        assert_parses_or_protocol_error(data)

    @settings(max_examples=300)
    @given(
        st.lists(
            st.binary(max_size=40)
            | st.sampled_from(
                [b"Content-Length: 3", b"Content-Length:12", b"content-length: x", b"Host: h"]
            ),
            max_size=5,
        ),
        st.sampled_from([b"\r\n", b"\n"]),
        st.binary(max_size=64),
    )
    def test_fuzz_invariant_attach_line_and_arbitrary_headers(
        self, headers: list[bytes], eol: bytes, body: bytes
    ) -> None:
        line = b"POST /v1/applications/a/devices/d HTTP/1.1"
        data = eol.join([line, *headers]) + eol + eol + body
        for k in range(0, len(data) + 1, 7):
            assert_parses_or_protocol_error(data[:k])
        assert_parses_or_protocol_error(data)


def assert_parses_or_protocol_error(data: bytes) -> None:
    """The fuzz invariant: an attach, None, or a ProtocolError; nothing else."""
    try:
        request = parse_attach(data, max_body=64)
    except ProtocolError:
        return
    if request is not None:
        assert 0 < request.consumed <= len(data)
        assert "/" not in request.app_id
        assert "/" not in request.device_id
