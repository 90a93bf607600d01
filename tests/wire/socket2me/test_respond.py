"""The client's ``respond(status, body, headers)`` acknowledgement, as an HTTP response."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire.errors import ProtocolError, RemoteProtocolError
from backchannel.wire.socket2me import MalformedRespond, Respond, parse_respond

TEXT = ("Content-Type", "text/html; charset=utf-8")
JSON = ("Content-Type", "application/json; charset=utf-8")
BINARY = ("Content-Type", "application/octet-stream")
PROVIDED = ("X-Provided-By", "Socket2Me")


class TestArgumentForms:
    """COMPAT.md, Socket2me, Socket.IO side: arguments read by position and type."""

    def test_status_body_headers(self) -> None:
        assert parse_respond((200, "x", {"X-A": "1"})) == Respond(
            200, [("X-A", "1"), TEXT, PROVIDED], b"x"
        )

    def test_body_only(self) -> None:
        assert parse_respond(("x",)) == Respond(200, [TEXT, PROVIDED], b"x")

    def test_object_only(self) -> None:
        assert parse_respond(({"a": 1},)) == Respond(200, [JSON, PROVIDED], b'{"a":1}')

    def test_body_and_headers_without_status(self) -> None:
        assert parse_respond(("x", {"X-A": "1"})) == Respond(
            200, [("X-A", "1"), TEXT, PROVIDED], b"x"
        )

    def test_no_arguments(self) -> None:
        assert parse_respond(()) == Respond(200, [TEXT, PROVIDED], b"OK")

    def test_status_only_gives_ok(self) -> None:
        assert parse_respond((201,)) == Respond(201, [TEXT, PROVIDED], b"OK")

    def test_no_content_status_only(self) -> None:
        assert parse_respond((204,)) == Respond(204, [PROVIDED], b"")

    def test_status_and_null(self) -> None:
        assert parse_respond((201, None)) == Respond(201, [PROVIDED], b"")

    def test_null_alone_is_an_empty_body(self) -> None:
        assert parse_respond((None,)) == Respond(200, [PROVIDED], b"")

    def test_binary_body(self) -> None:
        assert parse_respond((b"\x00\xff",)) == Respond(200, [BINARY, PROVIDED], b"\x00\xff")

    def test_non_dict_headers_ignored(self) -> None:
        assert parse_respond((200, "x", "not-a-dict")) == Respond(200, [TEXT, PROVIDED], b"x")

    @pytest.mark.parametrize("headers", [None, ["X-A", "1"], 5, True, b"X-A: 1"])
    def test_other_non_dict_headers_ignored(self, headers: Any) -> None:
        assert parse_respond((200, "x", headers)) == Respond(200, [TEXT, PROVIDED], b"x")

    def test_extra_arguments_ignored(self) -> None:
        assert parse_respond((200, "x", {}, "more", 5)) == Respond(200, [TEXT, PROVIDED], b"x")

    def test_list_input(self) -> None:
        assert parse_respond([404, "nope"]) == Respond(404, [TEXT, PROVIDED], b"nope")


class TestStatus:
    @pytest.mark.parametrize("status", [200, 201, 302, 400, 404, 418, 500, 599])
    def test_accepted(self, status: int) -> None:
        assert parse_respond((status, "x")).status == status

    def test_integral_float(self) -> None:
        # JavaScript numbers may arrive as floats.
        respond = parse_respond((404.0, "x"))
        assert respond.status == 404
        assert type(respond.status) is int

    @pytest.mark.parametrize("status", [0, -1, 99, 600, 1000, 10**400, 600.0, 1e300])
    def test_out_of_range(self, status: float) -> None:
        with pytest.raises(MalformedRespond, match="status"):
            parse_respond((status, "x"))

    @pytest.mark.parametrize("status", [100, 101, 103, 199])
    def test_interim_statuses_refused(self, status: int) -> None:
        # A 1xx cannot be sent as a final response.
        with pytest.raises(MalformedRespond, match="status"):
            parse_respond((status, "x"))

    @pytest.mark.parametrize("status", [200.5, float("nan"), float("inf"), float("-inf")])
    def test_non_integer_number(self, status: float) -> None:
        with pytest.raises(MalformedRespond, match="status"):
            parse_respond((status, "x"))

    @pytest.mark.parametrize(("flag", "text"), [(True, b"true"), (False, b"false")])
    def test_bool_is_a_body_not_a_status(self, flag: bool, text: bytes) -> None:
        assert parse_respond((flag,)) == Respond(200, [JSON, PROVIDED], text)

    def test_numeric_string_is_a_body(self) -> None:
        assert parse_respond(("404",)) == Respond(200, [TEXT, PROVIDED], b"404")

    @pytest.mark.parametrize("status", [204, 304])
    def test_no_body_statuses_empty_the_body(self, status: int) -> None:
        # As Express's res.send does: no body, and no Content-Type.
        respond = parse_respond((status, "text", {"Content-Type": "text/plain", "X-A": "1"}))
        assert respond == Respond(status, [("X-A", "1"), PROVIDED], b"")


class TestBodies:
    def test_text_utf8(self) -> None:
        assert parse_respond(("héllo ☃",)).body == "héllo ☃".encode()

    def test_empty_text(self) -> None:
        assert parse_respond(("",)) == Respond(200, [TEXT, PROVIDED], b"")

    def test_lone_surrogate_replaced(self) -> None:
        assert parse_respond(("a\ud800b",)).body == "a\ufffdb".encode()

    def test_list_as_json(self) -> None:
        assert parse_respond(([1, "a", None, True],)) == Respond(
            200, [JSON, PROVIDED], b'[1,"a",null,true]'
        )

    def test_json_is_compact_and_not_ascii_escaped(self) -> None:
        body = parse_respond((200, {"a": [1, 2], "é": {"b": None}})).body
        assert body == '{"a":[1,2],"é":{"b":null}}'.encode()

    def test_empty_object(self) -> None:
        assert parse_respond(({},)) == Respond(200, [JSON, PROVIDED], b"{}")

    @pytest.mark.parametrize(("number", "text"), [(5, b"5"), (1.5, b"1.5"), (-3, b"-3")])
    def test_number_after_status_as_json(self, number: float, text: bytes) -> None:
        assert parse_respond((200, number)) == Respond(200, [JSON, PROVIDED], text)

    @pytest.mark.parametrize("body", [bytearray(b"\x01\x02"), memoryview(b"\x01\x02")])
    def test_other_binary_types(self, body: Any) -> None:
        respond = parse_respond((body,))
        assert respond == Respond(200, [BINARY, PROVIDED], b"\x01\x02")
        assert type(respond.body) is bytes

    def test_empty_binary(self) -> None:
        assert parse_respond((b"",)) == Respond(200, [BINARY, PROVIDED], b"")

    def test_client_content_type_kept_for_text(self) -> None:
        respond = parse_respond((200, "a,b", {"content-type": "text/csv"}))
        assert respond == Respond(200, [("content-type", "text/csv"), PROVIDED], b"a,b")

    def test_client_content_type_any_case(self) -> None:
        respond = parse_respond((200, {"a": 1}, {"CONTENT-TYPE": "application/vnd.x+json"}))
        assert respond.headers == [("CONTENT-TYPE", "application/vnd.x+json"), PROVIDED]

    def test_client_content_type_kept_for_binary(self) -> None:
        respond = parse_respond((200, b"\x89PNG", {"Content-Type": "image/png"}))
        assert respond.headers == [("Content-Type", "image/png"), PROVIDED]

    def test_null_body_adds_no_content_type(self) -> None:
        assert parse_respond((200, None, {"X-A": "1"})).headers == [("X-A", "1"), PROVIDED]

    def test_null_body_keeps_client_content_type(self) -> None:
        respond = parse_respond((200, None, {"Content-Type": "text/plain"}))
        assert respond.headers == [("Content-Type", "text/plain"), PROVIDED]

    @pytest.mark.parametrize(
        "body",
        [
            {"a": b"\x00"},  # an attachment inside an object has no JSON form
            {"a": float("nan")},
            [float("inf")],
            {"a": {1, 2}},
            {1, 2},
            object(),
            ("tuple",),
        ],
    )
    def test_unsendable_bodies(self, body: Any) -> None:
        with pytest.raises(MalformedRespond, match="body"):
            parse_respond((200, body))

    def test_circular_body(self) -> None:
        body: list[Any] = []
        body.append(body)
        with pytest.raises(MalformedRespond, match="body"):
            parse_respond((body,))

    def test_huge_integer_body(self) -> None:
        with pytest.raises(MalformedRespond, match="body"):
            parse_respond((200, [10**5000]))


class TestHeaders:
    def test_order_and_case_kept(self) -> None:
        respond = parse_respond((200, "x", {"X-b": "1", "x-A": "2", "Cache-Control": "no-store"}))
        assert respond.headers == [
            ("X-b", "1"),
            ("x-A", "2"),
            ("Cache-Control", "no-store"),
            TEXT,
            PROVIDED,
        ]

    def test_list_values_one_line_each(self) -> None:
        respond = parse_respond((200, None, {"Set-Cookie": ["a=1", "b=2"], "X-A": "z"}))
        assert respond.headers == [
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-A", "z"),
            PROVIDED,
        ]

    def test_empty_list_gives_no_line(self) -> None:
        assert parse_respond((200, None, {"X-A": []})).headers == [PROVIDED]

    @pytest.mark.parametrize(
        ("value", "text"),
        [
            (True, "true"),
            (False, "false"),
            (42, "42"),
            (-1, "-1"),
            (1.5, "1.5"),
            (3.0, "3"),
            (float("nan"), "NaN"),
            (float("inf"), "Infinity"),
            (float("-inf"), "-Infinity"),
        ],
    )
    def test_scalar_values_as_javascript_strings(self, value: Any, text: str) -> None:
        assert parse_respond((200, None, {"X-A": value})).headers == [("X-A", text), PROVIDED]

    def test_list_of_mixed_scalars(self) -> None:
        respond = parse_respond((200, None, {"X-A": ["a", 1, True, None]}))
        assert respond.headers == [("X-A", "a"), ("X-A", "1"), ("X-A", "true"), PROVIDED]

    def test_null_value_gives_no_line(self) -> None:
        assert parse_respond((200, None, {"X-A": None, "X-B": "1"})).headers == [
            ("X-B", "1"),
            PROVIDED,
        ]

    def test_empty_value_kept(self) -> None:
        assert parse_respond((200, None, {"X-A": ""})).headers == [("X-A", ""), PROVIDED]

    def test_tab_and_latin1_allowed(self) -> None:
        respond = parse_respond((200, None, {"X-A": "a\tb é"}))
        assert respond.headers == [("X-A", "a\tb é"), PROVIDED]

    @pytest.mark.parametrize(
        "name",
        [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "Transfer-Encoding",
            "TE",
            "Trailer",
            "Upgrade",
            "Content-Length",
            "content-length",
        ],
    )
    def test_hop_by_hop_and_framing_dropped(self, name: str) -> None:
        respond = parse_respond((200, "x", {name: "1", "X-A": "2"}))
        assert respond.headers == [("X-A", "2"), TEXT, PROVIDED]

    def test_dropped_header_value_not_checked(self) -> None:
        respond = parse_respond((200, "x", {"Content-Length": {"odd": 1}}))
        assert respond.headers == [TEXT, PROVIDED]

    @pytest.mark.parametrize("name", ["X-Provided-By", "x-provided-by", "X-PROVIDED-BY"])
    def test_provided_by_replaced(self, name: str) -> None:
        respond = parse_respond((200, "x", {name: "someone else"}))
        assert respond.headers == [TEXT, PROVIDED]

    def test_provided_by_always_last(self) -> None:
        assert parse_respond((200, b"", {"X-A": "1"})).headers[-1] == PROVIDED

    @pytest.mark.parametrize(
        "value",
        [
            "a\r\nX-Injected: 1",
            "a\nb",
            "a\rb",
            "a\x00b",
            ["ok", "bad\r\n"],
        ],
    )
    def test_bad_value_refused(self, value: Any) -> None:
        with pytest.raises(MalformedRespond, match="X-Bad"):
            parse_respond((200, "x", {"X-Good": "1", "X-Bad": value}))

    @pytest.mark.parametrize(
        "name",
        ["", "Bad Header", "Bad:Header", "Bad\r\nHeader", "Ünicode", "a(b)", "x\x00"],
    )
    def test_bad_name_refused(self, name: str) -> None:
        with pytest.raises(MalformedRespond, match="header name"):
            parse_respond((200, "x", {name: "1"}))

    def test_non_string_name_refused(self) -> None:
        with pytest.raises(MalformedRespond, match="header name"):
            parse_respond((200, "x", {1: "1"}))

    @pytest.mark.parametrize("value", [{"a": 1}, b"bytes", [["nested"]], [{"a": 1}], object()])
    def test_unsupported_value_types_refused(self, value: Any) -> None:
        with pytest.raises(MalformedRespond, match="X-Bad"):
            parse_respond((200, "x", {"X-Bad": value}))

    def test_huge_integer_value_refused(self) -> None:
        with pytest.raises(MalformedRespond, match="X-Bad"):
            parse_respond((200, "x", {"X-Bad": 10**5000}))


class TestError:
    def test_hierarchy(self) -> None:
        # A ValueError for the caller, and a ProtocolError like every other wire parser's error.
        assert issubclass(MalformedRespond, ValueError)
        assert issubclass(MalformedRespond, RemoteProtocolError)
        assert MalformedRespond.status_hint == 502

    def test_respond_is_frozen(self) -> None:
        respond = parse_respond(("x",))
        with pytest.raises(AttributeError):
            respond.status = 500  # type: ignore[misc]


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.binary(max_size=16),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(), inner)),
    max_leaves=12,
)
statuses = st.one_of(st.integers(-1000, 1000), st.sampled_from([200, 204, 304, 404, 200.0]))
header_dicts = st.dictionaries(
    st.one_of(st.text(), st.sampled_from(["Content-Type", "Set-Cookie", "Connection"])),
    json_values,
    max_size=5,
)


@given(
    st.one_of(
        st.lists(json_values, max_size=4),
        st.tuples(statuses, json_values, header_dicts),
        st.tuples(json_values, header_dicts),
    )
)
def test_parse_respond_raises_only_malformed(args: Any) -> None:
    try:
        respond = parse_respond(args)
    except MalformedRespond as exc:
        assert isinstance(exc, ProtocolError)
        assert str(exc)
        return
    assert 200 <= respond.status <= 599
    assert isinstance(respond.body, bytes)
    assert respond.headers[-1] == PROVIDED
    for name, value in respond.headers:
        assert isinstance(name, str)
        assert isinstance(value, str)
        assert not any(c in value for c in "\r\n\x00")
