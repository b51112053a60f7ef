"""Every test here that points tether.socket at a gateway leaves no client settings behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tether.client import control
from tether.client import settings as client_settings


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)
