"""tether.socket must offer every name of the stdlib socket module."""

from __future__ import annotations

import inspect
import socket as std

import pytest

import tether.socket as ts


def test_all_matches_stdlib() -> None:
    assert sorted(ts.__all__) == sorted(std.__all__)


@pytest.mark.parametrize("name", sorted(std.__all__))
def test_every_name_present(name: str) -> None:
    assert hasattr(ts, name), name


@pytest.mark.parametrize("name", sorted(set(std.__all__) - set(ts.OVERRIDDEN)))
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
    except ValueError:  # a C function without a signature
        pytest.skip(f"stdlib {name} has no introspectable signature")
    assert [p.name for p in ours.parameters.values()] == [
        p.name for p in theirs.parameters.values()
    ]


def test_socket_method_signatures_match_stdlib() -> None:
    for name in ("__init__", "dup"):
        ours = inspect.signature(getattr(ts.socket, name))
        theirs = inspect.signature(getattr(std.socket, name))
        assert list(ours.parameters) == list(theirs.parameters), name
