"""Fixtures shared by the test packages: a real gateway process, install(), target servers."""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Iterator

import pytest
import trustme
from support import Gateway, gateway_config, installed, start_gateway
from tcpservers import echo, serving

from tether.demo.servers import HTTPServer, IMAPServer, POP3Server, SMTPServer, make_ca


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One real gateway process for the session, allowing loopback on every port but 25."""
    key = secrets.token_urlsafe(16)
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), gateway_config(key), key)
    yield gw
    gw.process.stop()


@pytest.fixture
def tethered(gateway: Gateway) -> Iterator[Gateway]:
    """The stdlib socket module routed through the session gateway for one test."""
    with installed(gateway):
        yield gateway


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own TETHER_* settings must not leak into the suite.
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A stdlib echo server on loopback (the target, not tethered)."""
    with serving(echo) as server:
        yield server.port


# -- tether.demo.servers on 127.0.0.1 (module scope: started before a test installs tether)


@pytest.fixture(scope="module")
def tls_ca() -> tuple[trustme.CA, ssl.SSLContext]:
    """A throwaway CA and a server context for the demo servers' names."""
    return make_ca()


@pytest.fixture(scope="module")
def https_server(tls_ca: tuple[trustme.CA, ssl.SSLContext]) -> Iterator[HTTPServer]:
    with HTTPServer(tls_ca[1]) as server:
        yield server


@pytest.fixture(scope="module")
def pop3_server() -> Iterator[POP3Server]:
    with POP3Server() as server:
        yield server


@pytest.fixture(scope="module")
def imap_server() -> Iterator[IMAPServer]:
    with IMAPServer() as server:
        yield server


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[SMTPServer]:
    """Plain SMTP (no STARTTLS)."""
    with SMTPServer() as server:
        yield server
