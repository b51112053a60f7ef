"""tether.socket must offer every name of the stdlib socket module.

The expected names are read from the stdlib module itself (its public
attributes), not from tether.socket's ``__all__``, which is built from the
stdlib's: comparing the two would only restate how it is built.
"""

from __future__ import annotations

import inspect
import socket as std
import types

import pytest

import tether.socket as ts

# What `import socket` itself pulls in for its own use, not part of its API.
_HELPERS = {"IntEnum", "IntFlag"}
PUBLIC = sorted(
    name
    for name in dir(std)
    if not name.startswith("_")
    and name not in _HELPERS
    and not isinstance(getattr(std, name), types.ModuleType)
)


def test_public_names_are_read() -> None:
    # The list the tests below run over is the real one (a typo in the filter
    # would otherwise make them pass vacuously).
    assert {"socket", "AF_INET", "SOCK_STREAM", "timeout", "SocketIO", "MsgFlag"} <= set(PUBLIC)
    assert len(PUBLIC) > 200


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_present(name: str) -> None:
    assert hasattr(ts, name), name


def test_star_import_offers_the_documented_names() -> None:
    # A fixed sample from the socket module's documentation.
    namespace: dict[str, object] = {}
    exec("from tether.socket import *", namespace)
    documented = {
        "socket", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
        "getnameinfo", "socketpair", "fromfd", "has_ipv6", "timeout", "gaierror", "herror",
        "AF_INET", "AF_INET6", "SOCK_STREAM", "SOCK_DGRAM", "SOL_SOCKET", "SO_REUSEADDR",
        "IPPROTO_TCP", "TCP_NODELAY", "SHUT_RDWR", "MSG_PEEK", "getdefaulttimeout",
        "setdefaulttimeout", "SocketType", "AddressFamily", "SocketKind",
    }
    assert documented <= set(namespace)


@pytest.mark.parametrize("name", sorted(set(PUBLIC) - set(ts.OVERRIDDEN) - {"SocketType"}))
def test_non_network_names_are_the_stdlib_objects(name: str) -> None:
    # Constants and exception classes must be the very same objects, so that
    # `except socket.timeout` and `== socket.AF_INET` keep working.
    assert getattr(ts, name) is getattr(std, name)


@pytest.mark.parametrize("name", ["timeout", "gaierror", "herror", "error"])
def test_exception_classes_are_stdlib(name: str) -> None:
    assert getattr(ts, name) is getattr(std, name)


def test_socket_class_is_a_stdlib_socket() -> None:
    assert issubclass(ts.socket, std.socket)
    assert issubclass(ts.socket, std.SocketType)


@pytest.mark.parametrize(
    "name",
    [
        "create_connection",
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
        "getnameinfo",
        "getfqdn",
    ],
)
def test_signatures_match_stdlib(name: str) -> None:
    ours = inspect.signature(getattr(ts, name))
    theirs_obj = getattr(std, name)
    try:
        theirs = inspect.signature(theirs_obj)
    except ValueError:
        # A C function without a signature: its docstring's first line is
        # "name(a, b) -> ...", and it takes its arguments by position only.
        head = theirs_obj.__doc__.split("\n", 1)[0]
        assert head.startswith(f"{name}("), head
        arity = len([a for a in head[len(name) + 1 : head.index(")")].split(",") if a.strip()])
        positional = [
            p for p in ours.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        assert len(positional) == len(ours.parameters) == arity, (head, ours)
        return
    assert [p.name for p in ours.parameters.values()] == [
        p.name for p in theirs.parameters.values()
    ]


def test_socket_method_signatures_match_stdlib() -> None:
    for name in ("__init__", "dup"):
        ours = inspect.signature(getattr(ts.socket, name))
        theirs = inspect.signature(getattr(std.socket, name))
        assert list(ours.parameters) == list(theirs.parameters), name
