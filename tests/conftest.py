"""Fixtures shared by the test packages: a real gateway process, install()."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from support import Gateway, gateway_config, start_gateway

import tether


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
    tether.install(gateway=gateway.address, app=gateway.app, key=gateway.key)
    try:
        yield gateway
    finally:
        tether.uninstall()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own TETHER_* settings must not leak into the suite.
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)
