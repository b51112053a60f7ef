"""The HTTP proxy's request machine (tether.proxy.http): heads in, events and answers out."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.proxy.http import (
    MAX_HEAD,
    NEED_DATA,
    Closed,
    Credentials,
    Forward,
    HttpProxy,
    ProxyRequestError,
    State,
    Tunnel,
    header_value,
    response,
)


def basic(app: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{app}:{key}".encode()).decode()


def feed(data: bytes, *, chunks: list[int] | None = None) -> tuple[HttpProxy, object]:
    """Feed `data` (in pieces of the given sizes, the rest at once); the first event."""
    proxy = HttpProxy()
    pos = 0
    for size in chunks or []:
        proxy.receive_data(data[pos : pos + size])
        pos += size
        event = proxy.next_event()
        if event is not NEED_DATA:
            return proxy, event
    proxy.receive_data(data[pos:])
    return proxy, proxy.next_event()


AUTH = f"Proxy-Authorization: {basic('billing', 's3cret:with:colons')}\r\n"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            f"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n{AUTH}\r\n",
            Tunnel("api.example.com", 443, Credentials("billing", "s3cret:with:colons")),
        ),
        ("CONNECT 10.0.0.1:5432 HTTP/1.0\r\n\r\n", Tunnel("10.0.0.1", 5432, None)),
        ("CONNECT [::1]:6379 HTTP/1.1\r\nHost: [::1]:6379\r\n\r\n", Tunnel("::1", 6379, None)),
        (
            # the address comes back written the usual way
            "CONNECT [0:0::1]:1 HTTP/1.1\r\nHost: [::1]:1\r\n\r\n",
            Tunnel("::1", 1, None),
        ),
        (
            "CONNECT x.test:80 HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Bearer abc\r\n\r\n",
            Tunnel(
                "x.test",
                80,
                None,
                "Proxy-Authorization scheme 'Bearer' is not served (Basic with APP:KEY is)",
            ),
        ),
        (
            "CONNECT x.test:80 HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic !!!\r\n\r\n",
            Tunnel("x.test", 80, None, "Proxy-Authorization Basic is not base64 of UTF-8 APP:KEY"),
        ),
        (
            f"CONNECT x.test:80 HTTP/1.1\r\nHost: h\r\n{AUTH}{AUTH}\r\n",
            Tunnel("x.test", 80, None, "more than one Proxy-Authorization header"),
        ),
    ],
)
def test_connect_requests(head: str, expected: Tunnel) -> None:
    proxy, event = feed(head.encode())
    assert event == expected
    assert proxy.state is State.DECIDING


def test_basic_credentials_without_a_colon() -> None:
    token = base64.b64encode(b"nokey").decode()
    _, event = feed(
        f"CONNECT x.test:80 HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic {token}"
        "\r\n\r\n".encode()
    )
    assert event == Tunnel("x.test", 80, None, "Proxy-Authorization Basic must be APP:KEY")


def test_an_absolute_uri_is_forwarded_in_origin_form() -> None:
    head = (
        "POST http://www.test:8080/a/b?c=d#frag HTTP/1.1\r\n"
        "Host: wrong.test\r\n"
        f"{AUTH}"
        "Proxy-Connection: keep-alive\r\n"
        "Connection: keep-alive, X-Secret\r\n"
        "X-Secret: hop\r\n"
        "Content-Length: 5\r\n"
        "X-Keep: Me\r\n"
        "\r\n"
    )
    proxy, event = feed(head.encode() + b"hello" + b"GET next")
    assert isinstance(event, Forward)
    assert (event.host, event.port, event.method) == ("www.test", 8080, "POST")
    assert event.credentials == Credentials("billing", "s3cret:with:colons")
    assert event.head == (
        b"POST /a/b?c=d HTTP/1.1\r\n"
        b"Host: www.test:8080\r\n"
        b"Content-Length: 5\r\n"
        b"X-Keep: Me\r\n"
        b"Via: 1.1 tether\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert proxy.forwarded() == event.head
    # What followed the head is the destination's, untouched (and in order).
    assert proxy.trailing_data == b"helloGET next"
    assert proxy.state is State.RELAY


@pytest.mark.parametrize(
    ("target", "host", "port", "path"),
    [
        ("http://www.test", "www.test", 80, b"/"),
        ("HTTP://www.test:81?x", "www.test", 81, b"/?x"),
        ("http://[::1]:8080/p", "::1", 8080, b"/p"),
        ("http://127.0.0.1/", "127.0.0.1", 80, b"/"),
    ],
)
def test_absolute_uri_forms(target: str, host: str, port: int, path: bytes) -> None:
    _, event = feed(f"GET {target} HTTP/1.0\r\n\r\n".encode())
    assert isinstance(event, Forward)
    assert (event.host, event.port) == (host, port)
    assert event.head.startswith(b"GET " + path + b" HTTP/1.0\r\nHost: ")
    assert event.credentials is None


@pytest.mark.parametrize(
    ("head", "status", "words"),
    [
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "this is a proxy"),
        ("GET https://www.test/ HTTP/1.1\r\nHost: h\r\n\r\n", 501, "use CONNECT"),
        ("GET ftp://www.test/ HTTP/1.1\r\nHost: h\r\n\r\n", 501, "plain http://"),
        (
            "GET http://user:pw@www.test/ HTTP/1.1\r\nHost: h\r\n\r\n",
            400,
            "credentials in an http URI",
        ),
        ("CONNECT www.test HTTP/1.1\r\nHost: h\r\n\r\n", 400, "give the port"),
        ("CONNECT www.test:0 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "from 1 to 65535"),
        ("CONNECT www.test:65536 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "from 1 to 65535"),
        ("CONNECT www.test:http HTTP/1.1\r\nHost: h\r\n\r\n", 400, "from 1 to 65535"),
        ("CONNECT [::1:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "closing ']'"),
        ("CONNECT [nothex]:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "not an IPv6 address"),
        ("CONNECT [::1]x:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "expected ':port'"),
        ("CONNECT bad/host:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "not a host name"),
        (f"CONNECT {'a' * 254}:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "at most 253"),
        ("GET http://www.test/ HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not served"),
        ("NOT A REQUEST\r\n\r\n", 400, "malformed request head"),
    ],
)
def test_refused_heads(head: str, status: int, words: str) -> None:
    proxy = HttpProxy()
    proxy.receive_data(head.encode())
    with pytest.raises(ProxyRequestError) as caught:
        proxy.next_event()
    assert caught.value.status == status
    assert words in caught.value.message
    assert proxy.state is State.CLOSED


def test_a_head_past_the_limit_is_431() -> None:
    proxy = HttpProxy()
    proxy.receive_data(
        b"GET http://www.test/ HTTP/1.1\r\nHost: h\r\n" + b"X-Pad: " + b"a" * MAX_HEAD
    )
    with pytest.raises(ProxyRequestError) as caught:
        proxy.next_event()
    assert caught.value.status == 431


@pytest.mark.parametrize(
    ("data", "partial"),
    [(b"", False), (b"CONNECT www.te", True)],
)
def test_the_app_closing_before_a_whole_head(data: bytes, partial: bool) -> None:
    proxy = HttpProxy()
    proxy.receive_data(data)
    assert proxy.next_event() is NEED_DATA or not data
    proxy.receive_data(b"")
    assert proxy.next_event() == Closed(partial=partial)
    assert proxy.state is State.CLOSED


def test_answers_and_their_order() -> None:
    proxy, event = feed(b"CONNECT www.test:443 HTTP/1.1\r\nHost: h\r\n\r\n\x16\x03\x01")
    assert isinstance(event, Tunnel)
    with pytest.raises(RuntimeError, match="no Forward request"):
        proxy.forwarded()
    assert proxy.established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert proxy.trailing_data == b"\x16\x03\x01"  # a TLS ClientHello sent early
    with pytest.raises(RuntimeError):
        proxy.established()
    with pytest.raises(RuntimeError, match="next_event"):
        proxy.next_event()


def test_a_refusal_is_a_whole_response_and_closes() -> None:
    proxy, _ = feed(b"CONNECT www.test:443 HTTP/1.1\r\nHost: h\r\n\r\n")
    data = proxy.refuse(403, "tether: denied: r\u00e9ason", [("X-Tether-Refusal", "a\r\nX: b")])
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 403 Forbidden",
        b"X-Tether-Refusal: a\\x0d\\x0aX: b",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
    ]
    assert body == "tether: denied: r\u00e9ason\n".encode()
    assert proxy.state is State.CLOSED
    assert proxy.next_event() == Closed(partial=False)


# -- properties ------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hosts = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ports = st.integers(1, 65535)
_tokens = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
_header_names = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
_header_values = st.from_regex(r"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        if point > last:  # b"" would say the app closed its side
            pieces.append(data[last:point])
        last = point
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    host=_hosts,
    port=_ports,
    app=_label,
    key=_tokens,
    extra=st.lists(st.tuples(_header_names, _header_values), max_size=5),
    body=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    connect=st.booleans(),
)
def test_any_split_of_a_request_gives_the_same_event(
    host: str,
    port: int,
    app: str,
    key: str,
    extra: list[tuple[str, str]],
    body: bytes,
    cuts: list[int],
    connect: bool,
) -> None:
    lines = [
        f"CONNECT {host}:{port} HTTP/1.1"
        if connect
        else f"GET http://{host}:{port}/p?q=1 HTTP/1.1",
        f"Host: {host}:{port}",
    ]
    lines.append(f"Proxy-Authorization: {basic(app, key)}")
    lines += [f"{name}: {value}" for name, value in extra]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    proxy = HttpProxy()
    event: object = NEED_DATA
    for piece in _chunked(data, cuts):
        proxy.receive_data(piece)
        if event is NEED_DATA:
            event = proxy.next_event()
    assert isinstance(event, Tunnel | Forward)
    assert (event.host, event.port) == (host, port)
    assert event.credentials == Credentials(app, key)
    assert isinstance(event, Tunnel) == connect
    # What came after the head is exactly what the destination gets first.
    answer = proxy.established() if connect else proxy.forwarded()
    assert proxy.trailing_data == body
    if not connect:
        assert answer.startswith(f"GET /p?q=1 HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
        assert b"proxy-authorization" not in answer.lower()
        for name, value in extra:
            assert f"\r\n{name}: {value}\r\n".encode() in answer


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=2048),
    cuts=st.lists(st.integers(0, 4096), max_size=6),
    close=st.booleans(),
)
def test_any_bytes_give_an_event_or_a_refusal_and_nothing_else(
    data: bytes, cuts: list[int], close: bool
) -> None:
    proxy = HttpProxy()
    try:
        for piece in [*_chunked(data, cuts), *([b""] if close else [])]:
            proxy.receive_data(piece)
            event = proxy.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Tunnel | Forward | Closed)
                break
    except ProxyRequestError as exc:
        assert 400 <= exc.status < 600
        assert proxy.state is State.CLOSED
        answer = proxy.refuse(exc.status, exc.message, [("X-Tether-Refusal", exc.message)])
        head = answer.partition(b"\r\n\r\n")[0]
        # The app's bytes quoted in a header never add or end a header line.
        assert len(head.split(b"\r\n")) == 5


@given(st.text(max_size=200))
def test_a_header_value_never_breaks_the_head(text: str) -> None:
    value = header_value(text)
    assert all(" " <= c <= "~" for c in value)
    data = response(403, text, [("X-Tether-Refusal", text)])
    assert data.count(b"\r\n\r\n") >= 1
    assert len(data.partition(b"\r\n\r\n")[0].split(b"\r\n")) == 5
