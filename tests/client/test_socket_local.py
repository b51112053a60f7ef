"""Client behaviour that needs no gateway: refusals, pass-through, validation."""

from __future__ import annotations

import errno
import socket as std

import pytest

import tether.socket as ts


def test_unix_sockets_pass_through() -> None:
    a, b = ts.socketpair()
    with a, b:
        a.sendall(b"ping")
        assert b.recv(4) == b"ping"
        assert a.family == std.AF_UNIX


def test_unix_socket_class_passthrough(tmp_path: object) -> None:
    s = ts.socket(std.AF_UNIX, std.SOCK_STREAM)
    with s:
        assert s.family == std.AF_UNIX
        assert s.getsockname() == ""


@pytest.mark.parametrize(
    ("address", "allowed"),
    [(("", 0), True), (("0.0.0.0", 0), True), (("", 8080), False), (("0.0.0.0", 8080), False)],
)
def test_bind_only_to_any(address: tuple[str, int], allowed: bool) -> None:
    with ts.socket() as s:
        if allowed:
            s.bind(address)
        else:
            with pytest.raises(PermissionError, match="outbound only") as info:
                s.bind(address)
            assert info.value.errno == errno.EACCES


@pytest.mark.parametrize("op", ["listen", "accept"])
def test_listen_and_accept_refused(op: str) -> None:
    with ts.socket() as s:
        with pytest.raises(OSError, match="outbound only") as info:
            getattr(s, op)()
        assert info.value.errno == errno.EOPNOTSUPP


def test_create_server_refused() -> None:
    with pytest.raises(OSError, match="outbound only"):
        ts.create_server(("127.0.0.1", 0))


@pytest.mark.parametrize(
    ("level", "name", "label"),
    [
        (std.SOL_SOCKET, std.SO_BROADCAST, "SO_BROADCAST"),
        (std.IPPROTO_TCP, std.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"),
        (std.IPPROTO_IP, std.IP_TTL, "IP_TTL"),
    ],
)
def test_unsupported_option_named(level: int, name: int, label: str) -> None:
    with ts.socket() as s:
        with pytest.raises(OSError, match=label) as info:
            s.setsockopt(level, name, 1)
        assert info.value.errno == errno.ENOPROTOOPT
        with pytest.raises(OSError, match=label):
            s.getsockopt(level, name)


def test_options_before_connect_are_kept() -> None:
    with ts.socket() as s:
        assert s.getsockopt(std.IPPROTO_TCP, std.TCP_NODELAY) == 0
        s.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
        assert s.getsockopt(std.IPPROTO_TCP, std.TCP_NODELAY) == 1
        assert s.getsockopt(std.SOL_SOCKET, std.SO_TYPE) == std.SOCK_STREAM
        assert s.getsockopt(std.SOL_SOCKET, std.SO_ERROR) == 0


def test_unconnected_addresses() -> None:
    with ts.socket() as s:
        assert s.getsockname() == ("0.0.0.0", 0)
        with pytest.raises(OSError) as info:
            s.getpeername()
        assert info.value.errno == errno.ENOTCONN
    with ts.socket(std.AF_INET6) as s6:
        assert s6.getsockname() == ("::", 0, 0, 0)


def test_raw_is_refused_clearly() -> None:
    # UDP is offered (tests/client/test_udp.py); raw sockets are not.
    with pytest.raises(OSError, match="TCP"):
        ts.socket(std.AF_INET, std.SOCK_RAW)


@pytest.mark.parametrize(
    ("address", "exc"),
    [
        ("127.0.0.1:80", TypeError),
        (("127.0.0.1",), TypeError),
        (("127.0.0.1", "80"), TypeError),
        (("127.0.0.1", 70000), OverflowError),
    ],
)
def test_connect_validates_like_stdlib(address: object, exc: type[Exception]) -> None:
    with ts.socket() as s, pytest.raises(exc):
        s.connect(address)
    with std.socket() as plain, pytest.raises(exc):
        plain.connect(address)


def test_not_configured_is_a_clear_connection_error() -> None:
    with ts.socket() as s, pytest.raises(ConnectionError, match="no gateway configured"):
        s.connect(("127.0.0.1", 9))


def test_unreachable_gateway_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port nothing listens on: bind and close, then use it.
    probe = std.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setenv("TETHER_GATEWAY", f"127.0.0.1:{port}")
    monkeypatch.setenv("TETHER_APP", "x")
    monkeypatch.setenv("TETHER_KEY", "y")
    with ts.socket() as s, pytest.raises(ConnectionError, match=f"127.0.0.1:{port}") as info:
        s.connect(("127.0.0.1", 9))
    assert type(info.value) is ConnectionError
    assert "unreachable" in str(info.value)


def test_closed_socket_addresses_raise_ebadf() -> None:
    s = ts.socket()
    s.close()
    with pytest.raises(OSError) as info:
        s.getsockname()
    assert info.value.errno == errno.EBADF


def test_loopback_bind_makes_a_local_socket_pair() -> None:
    # pika and paho-mqtt build their wake-up pairs this way under install():
    # a loopback listener of this process, and a connect straight to it.
    with ts.socket() as listener:
        listener.setsockopt(std.SOL_SOCKET, std.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        host, port = listener.getsockname()
        assert host == "127.0.0.1" and port > 0
        with ts.socket() as client:
            client.connect((host, port))  # no gateway is configured: local only
            server, _ = listener.accept()
            with server:
                client.sendall(b"wake")
                assert server.recv(4) == b"wake"
                assert client.getpeername() == (host, port)


def test_loopback_bind_v6_and_any() -> None:
    with ts.socket() as s:
        s.bind(("", 0))
        s.bind(("", 0))  # still "any": fine
    with ts.socket(std.AF_INET6) as s6:
        s6.bind(("::1", 0))  # a local socket of the v6 family
        assert s6.getsockname()[:2][0] == "::1"
        assert s6.family == std.AF_INET6
