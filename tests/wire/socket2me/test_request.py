"""The ``request`` event payload: headers, method, url, query, body and rawBody."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire.socket2me import REQUEST_EVENT, build_request


def build(
    method: str = "GET",
    path: str = "",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> dict[str, Any]:
    """build_request with defaults for the parts a test does not care about."""
    return build_request(method, path, query, headers or [], body)


def body_of(content_type: str, body: bytes) -> Any:
    """The parsed ``body`` field for a body sent with ``content_type``."""
    return build("POST", headers=[("Content-Type", content_type)], body=body)["body"]


def test_event_name() -> None:
    assert REQUEST_EVENT == "request"


class TestShape:
    """COMPAT.md, Socket2me, Socket.IO side: exactly these fields, in this order."""

    def test_keys_in_order(self) -> None:
        payload = build("get", "help/me", "x=1", [("Host", "relay")], b"hi")
        assert list(payload) == ["headers", "method", "url", "query", "body", "rawBody"]

    def test_full_example(self) -> None:
        payload = build(
            "post",
            "help/me",
            "x=1",
            [("Host", "relay"), ("Content-Type", "application/json")],
            b'{"a":1}',
        )
        assert payload == {
            "headers": {"host": "relay", "content-type": "application/json"},
            "method": "POST",
            "url": "help/me",
            "query": {"x": "1"},
            "body": {"a": 1},
            "rawBody": b'{"a":1}',
        }

    def test_payload_is_json_except_raw_body(self) -> None:
        payload = build("GET", "a", "a[20]=x&b=1&b=2", [("X", "1")], b"\x00\xff")
        raw = payload.pop("rawBody")
        assert isinstance(raw, bytes)
        assert json.loads(json.dumps(payload, allow_nan=False)) == payload


class TestMethod:
    @pytest.mark.parametrize(
        ("given", "sent"),
        [("get", "GET"), ("Post", "POST"), ("DELETE", "DELETE"), ("head", "HEAD"), ("pUt", "PUT")],
    )
    def test_upper_case(self, given: str, sent: str) -> None:
        assert build(given)["method"] == sent


class TestUrl:
    """``/go/T/help/me?x=1`` gives ``help/me``; no key at all for ``/go/T`` and ``/go/T/``."""

    def test_path(self) -> None:
        assert build(path="help/me")["url"] == "help/me"

    def test_empty_path_has_no_key(self) -> None:
        assert "url" not in build(path="")

    def test_lone_slash_has_no_key(self) -> None:
        assert "url" not in build(path="/")

    def test_one_leading_slash_is_stripped(self) -> None:
        assert build(path="/help/me")["url"] == "help/me"

    def test_only_one_leading_slash_is_stripped(self) -> None:
        assert build(path="//help")["url"] == "/help"

    def test_trailing_slash_kept(self) -> None:
        assert build(path="help/")["url"] == "help/"

    def test_decoded_path_passed_as_given(self) -> None:
        # The caller has already percent-decoded the path; no second decoding happens here.
        assert build(path="a b/%41/é")["url"] == "a b/%41/é"

    def test_query_is_not_in_url(self) -> None:
        assert build(path="help/me", query="x=1")["url"] == "help/me"


class TestHeaders:
    """Names lower-cased, everything passed through, repeats merged as Node's http module does."""

    def test_names_lower_cased(self) -> None:
        headers = build(headers=[("Host", "h"), ("X-Custom-Thing", "v"), ("ACCEPT", "*/*")])
        assert headers["headers"] == {"host": "h", "x-custom-thing": "v", "accept": "*/*"}

    def test_order_kept(self) -> None:
        headers = build(headers=[("B", "1"), ("A", "2"), ("C", "3")])["headers"]
        assert list(headers) == ["b", "a", "c"]

    def test_empty(self) -> None:
        assert build()["headers"] == {}

    def test_hop_by_hop_passed_through(self) -> None:
        headers = build(headers=[("Connection", "keep-alive"), ("Upgrade", "websocket")])
        assert headers["headers"] == {"connection": "keep-alive", "upgrade": "websocket"}

    def test_repeated_joined_with_comma(self) -> None:
        headers = build(headers=[("X-A", "1"), ("x-a", "2"), ("X-a", "3")])["headers"]
        assert headers == {"x-a": "1, 2, 3"}

    def test_repeated_accept_joined(self) -> None:
        headers = build(headers=[("Accept", "text/html"), ("Accept", "application/json")])
        assert headers["headers"] == {"accept": "text/html, application/json"}

    def test_cookie_joined_with_semicolon(self) -> None:
        headers = build(headers=[("Cookie", "a=1"), ("Cookie", "b=2")])["headers"]
        assert headers == {"cookie": "a=1; b=2"}

    def test_set_cookie_is_a_list(self) -> None:
        headers = build(headers=[("Set-Cookie", "a=1"), ("set-cookie", "b=2")])["headers"]
        assert headers == {"set-cookie": ["a=1", "b=2"]}

    def test_single_set_cookie_is_a_list(self) -> None:
        assert build(headers=[("Set-Cookie", "a=1")])["headers"] == {"set-cookie": ["a=1"]}

    @pytest.mark.parametrize(
        "name",
        ["content-type", "content-length", "host", "authorization", "user-agent", "referer"],
    )
    def test_singletons_keep_the_first(self, name: str) -> None:
        headers = build(headers=[(name.title(), "first"), (name, "second")])["headers"]
        assert headers == {name: "first"}

    def test_first_content_type_decides_the_body(self) -> None:
        payload = build(
            "POST",
            headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")],
            body=b'{"a":1}',
        )
        assert payload["body"] == {"a": 1}

    def test_empty_value(self) -> None:
        assert build(headers=[("X-Empty", "")])["headers"] == {"x-empty": ""}


class TestQuery:
    """Parsed like ``qs`` in extended mode (Express 4's default query parser)."""

    @pytest.mark.parametrize(
        ("query", "parsed"),
        [
            ("", {}),
            ("x=1", {"x": "1"}),
            ("x=1&y=2", {"x": "1", "y": "2"}),
            ("a[b]=1", {"a": {"b": "1"}}),
            ("a[b][c]=1&a[b][d]=2", {"a": {"b": {"c": "1", "d": "2"}}}),
            ("a=1&a=2", {"a": ["1", "2"]}),
            ("a=1&a=2&a=3", {"a": ["1", "2", "3"]}),
            ("a[]=1&a[]=2", {"a": ["1", "2"]}),
            ("a[0]=x&a[1]=y", {"a": ["x", "y"]}),
            ("a[1]=y&a[0]=x", {"a": ["x", "y"]}),
            ("a[0][b]=1", {"a": [{"b": "1"}]}),
            ("flag", {"flag": ""}),
            ("x=", {"x": ""}),
            ("&&x=1&&", {"x": "1"}),
            ("a.b=1", {"a.b": "1"}),
        ],
    )
    def test_parsed(self, query: str, parsed: dict[str, Any]) -> None:
        assert build(query=query)["query"] == parsed

    @pytest.mark.parametrize(
        ("query", "parsed"),
        [
            ("x=hello%20world", {"x": "hello world"}),
            ("x=a+b", {"x": "a b"}),
            ("x=%C3%A9", {"x": "é"}),
            ("x=%F0%9F%98%80", {"x": "😀"}),
            ("a%5Bb%5D=1", {"a": {"b": "1"}}),
            ("x%20y=1", {"x y": "1"}),
            ("x=%26%3D", {"x": "&="}),
            ("x=100%", {"x": "100%"}),
            ("%ZZ=1", {"%ZZ": "1"}),
        ],
    )
    def test_percent_decoding(self, query: str, parsed: dict[str, Any]) -> None:
        assert build(query=query)["query"] == parsed

    def test_depth_limit_is_five(self) -> None:
        # qs keeps the remainder past depth 5 as one literal key.
        assert build(query="a[b][c][d][e][f][g][h]=1")["query"] == {
            "a": {"b": {"c": {"d": {"e": {"f": {"[g][h]": "1"}}}}}}
        }

    def test_high_index_becomes_an_object(self) -> None:
        # qs's arrayLimit of 20: an index past it gives an object, not a sparse list.
        assert build(query="a[100]=x")["query"] == {"a": {"100": "x"}}

    def test_index_below_limit_is_a_list(self) -> None:
        assert build(query="a[5]=x")["query"] == {"a": ["x"]}

    def test_parameter_limit_is_a_thousand(self) -> None:
        query = "&".join(f"k{i}=v" for i in range(1200))
        parsed = build(query=query)["query"]
        assert len(parsed) == 1000
        assert "k999" in parsed
        assert "k1000" not in parsed

    def test_result_is_plain_dicts_and_lists(self) -> None:
        query = "&".join(f"a={i}" for i in range(30)) + "&b[c]=1&d[]=1"

        def plain(value: Any) -> bool:
            if isinstance(value, dict):
                return type(value) is dict and all(plain(v) for v in value.values())
            if isinstance(value, list):
                return type(value) is list and all(plain(v) for v in value)
            return isinstance(value, str)

        assert plain(build(query=query)["query"])


class TestJsonBody:
    """body-parser's ``json()``: parsed for application/json, ``{}`` when it cannot parse."""

    def test_object(self) -> None:
        assert body_of("application/json", b'{"a":1,"b":[true,null,"x"]}') == {
            "a": 1,
            "b": [True, None, "x"],
        }

    def test_array(self) -> None:
        assert body_of("application/json", b"[1,2,3]") == [1, 2, 3]

    def test_nested(self) -> None:
        assert body_of("application/json", b'{"a":{"b":{"c":[{"d":1.5}]}}}') == {
            "a": {"b": {"c": [{"d": 1.5}]}}
        }

    def test_charset_param(self) -> None:
        assert body_of("application/json; charset=utf-8", b'{"a":"\xc3\xa9"}') == {"a": "é"}

    def test_case_insensitive_type(self) -> None:
        assert body_of("Application/JSON; Charset=UTF-8", b'{"a":1}') == {"a": 1}

    def test_quoted_charset(self) -> None:
        assert body_of('application/json; charset="utf-8"', b'{"a":1}') == {"a": 1}

    def test_utf16_charset(self) -> None:
        body = '{"a":"é"}'.encode("utf-16")
        assert body_of("application/json; charset=utf-16", body) == {"a": "é"}

    def test_non_utf_charset_refused(self) -> None:
        # body-parser answers 415 to a JSON body in any charset but UTF-*.
        assert body_of("application/json; charset=latin1", b'{"a":1}') == {}

    def test_unknown_utf_charset(self) -> None:
        assert body_of("application/json; charset=utf-99", b'{"a":1}') == {}

    def test_bom_dropped(self) -> None:
        assert body_of("application/json", b'\xef\xbb\xbf{"a":1}') == {"a": 1}

    def test_whitespace_around(self) -> None:
        assert body_of("application/json", b'  \n{"a":1}\n ') == {"a": 1}

    @pytest.mark.parametrize("media_type", ["application/vnd.api+json", "application/ld+json"])
    def test_structured_suffix(self, media_type: str) -> None:
        assert body_of(media_type, b'{"a":1}') == {"a": 1}

    @pytest.mark.parametrize("media_type", ["text/json", "application/jsonx", "text/plain"])
    def test_other_types_not_parsed(self, media_type: str) -> None:
        assert body_of(media_type, b'{"a":1}') == {}

    @pytest.mark.parametrize(
        "body",
        [
            b"{",
            b'{"a":1,}',
            b"{'a':1}",
            b"not json",
            b'{"a":1} trailing',
            b"\xff\xfe\x00",
            b'{"a":NaN}',
            b"[Infinity]",
            b"[-Infinity]",
            b"[" * 100_000,
        ],
    )
    def test_malformed_gives_empty_object(self, body: bytes) -> None:
        payload = build("POST", headers=[("Content-Type", "application/json")], body=body)
        assert payload["body"] == {}
        assert payload["rawBody"] == body

    @pytest.mark.parametrize("body", [b'"text"', b"42", b"true", b"null", b"1.5"])
    def test_strict_mode_refuses_scalars(self, body: bytes) -> None:
        # body-parser's json() is strict by default: only objects and arrays.
        assert body_of("application/json", body) == {}

    def test_overflowing_number_is_null(self) -> None:
        # JavaScript parses it as Infinity, which JSON.stringify sends as null.
        assert body_of("application/json", b"[1e400, -1e400]") == [None, None]

    def test_very_long_integer(self) -> None:
        assert body_of("application/json", b"[" + b"9" * 5000 + b"]") == [None]

    def test_long_integer_kept_exact(self) -> None:
        assert body_of("application/json", b"[123456789012345678901234567890]") == [
            123456789012345678901234567890
        ]

    def test_invalid_utf8_replaced(self) -> None:
        assert body_of("application/json", b'{"a":"x\xffy"}') == {"a": "x\ufffdy"}

    def test_empty_body(self) -> None:
        assert body_of("application/json", b"") == {}


class TestFormBody:
    """body-parser's ``urlencoded({extended: true})``: the qs-parsed form."""

    FORM = "application/x-www-form-urlencoded"

    @pytest.mark.parametrize(
        ("body", "parsed"),
        [
            (b"a=1&b=2", {"a": "1", "b": "2"}),
            (b"a[b]=1&a[c]=2", {"a": {"b": "1", "c": "2"}}),
            (b"a=1&a=2", {"a": ["1", "2"]}),
            (b"name=J%C3%B6rg+M%C3%BCller", {"name": "Jörg Müller"}),
            (b"a%5Bb%5D=%3D", {"a": {"b": "="}}),
        ],
    )
    def test_parsed(self, body: bytes, parsed: dict[str, Any]) -> None:
        assert body_of(self.FORM, body) == parsed

    def test_charset_param_utf8(self) -> None:
        assert body_of(self.FORM + "; charset=UTF-8", b"a=%C3%A9") == {"a": "é"}

    def test_latin1_charset(self) -> None:
        assert body_of(self.FORM + "; charset=ISO-8859-1", b"a=%E9") == {"a": "é"}

    def test_raw_utf8_bytes(self) -> None:
        assert body_of(self.FORM, "a=é".encode()) == {"a": "é"}

    def test_invalid_utf8_replaced(self) -> None:
        assert body_of(self.FORM, b"a=x\xffy") == {"a": "x\ufffdy"}

    def test_deeper_than_qs_query_depth(self) -> None:
        # body-parser allows 32 levels, unlike the query's 5.
        body = b"a" + b"".join(b"[k%d]" % i for i in range(10)) + b"=1"
        parsed = body_of(self.FORM, body)
        for i in range(10):
            parsed = parsed[f"k{i}"] if i else parsed["a"][f"k{i}"]
        assert parsed == "1"

    def test_too_deep_gives_empty_object(self) -> None:
        body = b"a" + b"[k]" * 40 + b"=1"
        assert body_of(self.FORM, body) == {}

    def test_list_limit_follows_parameter_count(self) -> None:
        body = "&".join(f"a={i}" for i in range(150)).encode()
        assert body_of(self.FORM, body) == {"a": [str(i) for i in range(150)]}

    def test_index_up_to_a_hundred_is_a_list(self) -> None:
        assert body_of(self.FORM, b"a[50]=x") == {"a": ["x"]}

    def test_too_many_parameters_gives_empty_object(self) -> None:
        # body-parser refuses more than 1000 parameters rather than truncating.
        body = "&".join(f"k{i}=v" for i in range(1001)).encode()
        payload = build("POST", headers=[("Content-Type", self.FORM)], body=body)
        assert payload["body"] == {}
        assert payload["rawBody"] == body

    def test_a_thousand_parameters_parsed(self) -> None:
        body = "&".join(f"k{i}=v" for i in range(1000)).encode()
        assert len(body_of(self.FORM, body)) == 1000


class TestOtherBodies:
    """Anything else gives ``{}``; the bytes are always in ``rawBody``."""

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("text/plain", b"hello"),
            ("text/html; charset=utf-8", b"<p>hi</p>"),
            ("application/octet-stream", b"\x00\x01\xff"),
            ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
            ("application/xml", b"<a/>"),
            ("", b"hello"),
            ("garbage;;;=", b"hello"),
        ],
    )
    def test_body_empty_object_raw_kept(self, content_type: str, body: bytes) -> None:
        payload = build("POST", headers=[("Content-Type", content_type)], body=body)
        assert payload["body"] == {}
        assert payload["rawBody"] == body

    def test_no_content_type(self) -> None:
        payload = build("POST", body=b'{"a":1}')
        assert payload["body"] == {}
        assert payload["rawBody"] == b'{"a":1}'

    def test_empty_body(self) -> None:
        payload = build("GET")
        assert payload["body"] == {}
        assert payload["rawBody"] == b""

    def test_raw_body_is_bytes(self) -> None:
        payload = build_request("POST", "", "", [], bytearray(b"abc"))  # type: ignore[arg-type]
        assert type(payload["rawBody"]) is bytes
        assert payload["rawBody"] == b"abc"


header_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-16",
            "application/json; charset=utf-32",
            "application/json; charset=utf-7",
            "application/json; charset=idna",
            "application/vnd.x+json",
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded; charset=latin1",
            "text/plain",
        ]
    ),
    st.text(),
)


@given(
    method=st.text(),
    path=st.text(),
    query=st.one_of(st.text(), st.text(st.sampled_from("ab[]=&%.+5")), st.text("a[]=0&")),
    headers=st.lists(st.tuples(header_names, st.text())),
    content_type=content_types,
    body=st.one_of(st.binary(), st.text(st.sampled_from('ab[]=&%{}":,0.e-+')).map(str.encode)),
)
def test_build_request_never_raises(
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    content_type: str,
    body: bytes,
) -> None:
    payload = build_request(method, path, query, [("Content-Type", content_type), *headers], body)
    assert payload["rawBody"] == body
    assert isinstance(payload["query"], dict)
    assert isinstance(payload["body"], dict | list)
    raw = payload.pop("rawBody")
    assert isinstance(raw, bytes)
    json.dumps(payload, allow_nan=False)
