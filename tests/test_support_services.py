"""require_service(): a missing service is a skip for a developer, a failure in CI."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import support


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that is bound but never listens: a connect to it is refused."""
    holder = support.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    with holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("required", "outcome"),
    [(False, pytest.skip.Exception), (True, pytest.fail.Exception)],
)
def test_missing_service(
    monkeypatch: pytest.MonkeyPatch, closed_port: int, required: bool,
    outcome: type[BaseException],
) -> None:
    monkeypatch.setattr(support, "REQUIRE_SERVICES", required)
    with pytest.raises(outcome, match=f"Nothing is not reachable on 127.0.0.1:{closed_port}"):
        support.require_service(closed_port, "Nothing")


def test_present_service_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "REQUIRE_SERVICES", True)
    listener = support.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        support.require_service(listener.getsockname()[1], "A listener")  # returns, no raise
