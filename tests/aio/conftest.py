"""Fixtures of the asyncio tests: each test runs on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop
from aiosupport import Runner


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Runs a coroutine to completion on a new loop of the parametrized kind."""
    if request.param == "uvloop":
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run
