"""The gateway fuzz target (tests/fuzz/gateway_machine.py), run briefly in the normal suite.

``make fuzz`` runs the same machine for FUZZ_SECONDS; a crash it finds
becomes a case in test_fuzz_regressions.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz.gateway_machine import GatewayFuzz, quiet_gateway_log, stop_shared_target
from hypothesis import HealthCheck, settings

# 50 sequences of up to 15 steps: about 10 s here; the long run is `make fuzz`.
BRIEF = settings(
    max_examples=50,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True, scope="module")
def _fuzz_gateway() -> Iterator[None]:
    yield
    stop_shared_target()


def test_gateway_survives_random_and_mutated_frames() -> None:
    with quiet_gateway_log():
        GatewayFuzz.TestCase.settings = BRIEF
        GatewayFuzz.TestCase().runTest()
