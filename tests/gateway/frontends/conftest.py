"""Fixtures shared by the front-end tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The gateway's audit and log lines as they are written (support.audit_lines reads them)."""
    caplog.set_level(logging.INFO, logger="tether.audit")
    caplog.set_level(logging.INFO, logger="tether.gateway")
    return caplog
