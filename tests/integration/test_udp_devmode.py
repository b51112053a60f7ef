"""UDP in development mode: `tether run` with no gateway starts one; datagrams go through it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from udpsupport import UdpPeer

CHILD = """\
import socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"dev-mode datagram", ("127.0.0.1", port))
data, source = s.recvfrom(64)
print(type(s).__module__, data.decode(), source == ("127.0.0.1", port))
try:
    s.sendto(b"x", ("127.0.0.1", port + 1 if port < 65535 else port - 1))
except PermissionError as exc:
    print("denied", "udp" in str(exc).lower())
s.close()
"""


@pytest.fixture
def peer() -> Iterator[UdpPeer]:
    p = UdpPeer()
    yield p
    p.close()


def test_udp_through_the_development_gateway(peer: UdpPeer, tmp_path: Path) -> None:
    (tmp_path / "tether.toml").write_text(
        f'[resolver]\nmode = "static"\n[policy]\nallow = ["127.0.0.1:{peer.port}/udp"]\n'
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "run", "--",
         sys.executable, str(script), str(peer.port)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "tether.client.dgram dev-mode datagram True",
        "denied True",
    ]
    assert [d for d, _ in peer.received] == [b"dev-mode datagram"]
