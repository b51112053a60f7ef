"""`tether serve --workers 2` with [cluster]: each worker a node, linked over Unix sockets.

The kernel spreads the app's streams over the two workers, so a resume often
reaches the worker that does not hold the socket; that worker forwards it
over the owner's Unix link socket (in the supervisor's private directory).
The cluster's Redis is the machine's, under a prefix of this test's own.
"""

from __future__ import annotations

import pickle
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from clustersupport import REDIS_PORT, REDIS_URL, delete_prefix
from served import Served
from support import APP, Peer, echo, gateway_config, recv_exact, require_service, use_gateway

import tether.socket as tsocket
from tether.client import control
from tether.client import settings as client_settings

TRIES = 64  # resumes until one has landed on the other worker (each does so half the time)


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


def test_workers_of_one_host_are_nodes_and_forward_resumes(tmp_path: Path) -> None:
    require_service(REDIS_PORT, "Redis")
    key = secrets.token_urlsafe(16)
    prefix = f"tether-test-{secrets.token_hex(6)}:"
    config = tmp_path / "tether.toml"
    config.write_text(gateway_config(key, extra=(
        f'\n[cluster]\nredis = "{REDIS_URL}"\nnode_id = "host"\n'
        f'link_listen = "unix:{tmp_path}/link.sock"\nkey = "{"s" * 32}"\nprefix = "{prefix}"\n'
    )))
    served = Served(config, "--listen", "127.0.0.1:0", "--workers", "2")
    try:
        use_gateway(served.address(workers=True), APP, key)
        served.wait_for(r"node 'host-[01]' is in the cluster", count=2)
        with Peer(echo) as peer:
            sock = tsocket.socket()
            sock.settimeout(10)
            sock.connect(peer.address)
            for i in range(TRIES):
                sock.sendall(b"%04d" % i)
                sock = pickle.loads(pickle.dumps(sock))
                assert recv_exact(sock, 4) == b"%04d" % i
                if "through this node" in served.text():
                    break
            sock.close()
        assert "through this node (unix:" in served.text()
    finally:
        served.stop()
        delete_prefix(prefix)
