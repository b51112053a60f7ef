"""StaticResolver and SystemResolver. SystemResolver is only asked about
numeric hosts and 'localhost' (answered from /etc/hosts), never a DNS name."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from tether.policy import Resolver as PolicyResolver
from tether.resolver import ResolutionError, Resolver, StaticResolver, SystemResolver


def test_static_resolver_matches_case_insensitively_without_trailing_dot() -> None:
    resolver = StaticResolver({"Mail.Test.": ["127.0.0.1", "::1"], "web.test": ["10.0.0.1"]})
    assert list(resolver.resolve("mail.test")) == ["127.0.0.1", "::1"]
    assert list(resolver.resolve("MAIL.TEST.")) == ["127.0.0.1", "::1"]
    assert "Web.Test" in resolver
    assert "other.test" not in resolver


def test_static_resolver_unknown_name_is_eai_noname() -> None:
    with pytest.raises(ResolutionError) as info:
        StaticResolver({}).resolve("nowhere.test")
    assert info.value.eai == socket.EAI_NONAME
    assert info.value.message == "Name or service not known"
    assert "Name or service not known" in str(info.value)


def test_static_resolver_checks_addresses_up_front() -> None:
    with pytest.raises(ValueError, match="not a numeric address"):
        StaticResolver({"a.test": ["a.example.com"]})
    with pytest.raises(TypeError):
        StaticResolver({"a.test": "127.0.0.1"})


def test_resolvers_satisfy_the_protocol() -> None:
    assert Resolver is PolicyResolver
    assert isinstance(StaticResolver({}), Resolver)
    assert isinstance(SystemResolver(), Resolver)


def _localhost_in_etc_hosts() -> bool:
    try:
        text = Path("/etc/hosts").read_text()
    except OSError:
        return False
    return any("localhost" in line.split("#")[0].split()[1:] for line in text.splitlines())


@pytest.mark.skipif(not _localhost_in_etc_hosts(), reason="localhost must come from /etc/hosts")
def test_system_resolver_localhost() -> None:
    answers = SystemResolver().resolve("localhost")
    assert answers
    assert all(ipaddress.ip_address(a).is_loopback for a in answers)


def test_system_resolver_numeric() -> None:
    assert list(SystemResolver().resolve("127.0.0.1")) == ["127.0.0.1"]


def test_system_resolver_maps_gaierror(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ResolutionError) as info:
        SystemResolver().resolve("nowhere.test")
    assert info.value.eai == socket.EAI_NONAME


def test_system_resolver_deduplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    def answers(*args: Any, **kwargs: Any) -> Any:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", answers)
    assert list(SystemResolver().resolve("dup.test")) == ["192.0.2.1", "2001:db8::1"]
