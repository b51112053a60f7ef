"""The gateway's layers: the core and the data plane know no front-end.

Read from the source with ``ast``: every import counts, including one inside
a function or under ``if TYPE_CHECKING:``. (Import cycles are
tests/architecture's; this is the direction of the layers.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "src" / "tether" / "gateway"
# Modules a front-end may use and that must not use one back.
BELOW_FRONTENDS = sorted(
    [*GATEWAY.joinpath("core").glob("*.py"), *GATEWAY.glob("udp*.py"), GATEWAY / "relay.py"]
)
ABOVE = ("tether.gateway.frontends", "tether.gateway.server", "tether.gateway.embedded")


def imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_layers_are_found() -> None:
    names = {p.relative_to(GATEWAY).as_posix() for p in BELOW_FRONTENDS}
    assert {"core/admission.py", "core/dial.py", "udp.py", "relay.py"} <= names


@pytest.mark.parametrize("path", BELOW_FRONTENDS, ids=lambda p: p.relative_to(GATEWAY).as_posix())
def test_no_front_end_below_the_front_ends(path: Path) -> None:
    upward = sorted(m for m in imported(path) if m.startswith(ABOVE))
    assert not upward, f"{path.relative_to(GATEWAY)} imports {upward}"


# The peers (core/peers.py's Protocol) are above the core: a cluster node
# needs redis-py, the workers' links a supervisor; a gateway alone loads neither.
PEERS = ("tether.cluster", "tether.gateway.workerlink", "tether.gateway.supervisor")
CORE = sorted(GATEWAY.joinpath("core").glob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(GATEWAY).as_posix())
def test_the_core_knows_its_peers_only_by_their_protocol(path: Path) -> None:
    upward = sorted(m for m in imported(path) if m.startswith(PEERS))
    assert not upward, f"{path.relative_to(GATEWAY)} imports {upward} (use core/peers.py's Peers)"


def test_the_peers_protocol_is_found() -> None:
    assert "core/peers.py" in {p.relative_to(GATEWAY).as_posix() for p in CORE}
