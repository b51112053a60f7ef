"""`tether serve --workers 2` with one SQLite ledger: the workers' rows add up.

Each worker is a node (HOST-0, HOST-1) and a process with a run id of its
own; both write the same file. Their rows must sum to the audit log's
close lines, whichever worker the kernel gave each connection to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from served import Served
from support import recv_exact, use_gateway
from support import wait_for as wait_until

import tether.socket as ts
from tether.usage.store import open_store

CONNECTIONS = 40


def test_two_workers_write_one_ledger_that_matches_the_audit_log(
    tmp_path: Path, echo_port: int
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "tether.toml"
    config.write_text(
        f'[gateway]\naudit_log = "{audit}"\ndrain_timeout = 0\n\n'
        f'[policy]\nallow = ["127.0.0.1:{echo_port}"]\n\n'
        '[apps.w]\nkey = "worker-test-key"\n\n'
        f'[usage]\npath = "{tmp_path / "usage.sqlite3"}"\nflush_interval = 1\n'
    )
    served = Served(config, "--workers", "2", "--listen", "127.0.0.1:0")
    try:
        address = served.address(workers=True)
        use_gateway(address, "w", "worker-test-key")
        sent = 0
        for i in range(CONNECTIONS):
            sock = ts.create_connection(("127.0.0.1", echo_port), timeout=10)
            try:
                data = os.urandom(1000 + i)
                sock.sendall(data)
                assert recv_exact(sock, len(data)) == data
                sent += len(data)
            finally:
                sock.close()

        def closes() -> list[dict[str, object]]:
            lines = audit.read_text().splitlines() if audit.exists() else []
            return [j for j in map(json.loads, lines) if j["event"] == "close"]

        assert wait_until(lambda: len(closes()) == CONNECTIONS, timeout=30)
        served.signal(signal.SIGTERM)
        served.wait_for("final flush written", count=2)
        assert served.proc.wait(30) == 0
    finally:
        served.stop()
    assert sum(int(str(line["bytes_out"])) for line in closes()) == sent
    store = open_store(str(tmp_path / "usage.sqlite3"), create=False)
    try:
        (total,) = store.totals()
        assert (total.counters.bytes_out, total.counters.connects) == (sent, CONNECTIONS)
        host = socket.gethostname()
        per_node = {node: store.totals(node=node) for node in (f"{host}-0", f"{host}-1")}
    finally:
        store.close()
    # Whichever worker served what, the nodes' rows add up to the whole.
    assert sum(t[0].counters.bytes_out for t in per_node.values() if t) == sent
