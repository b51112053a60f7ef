"""`tether run`: every Python process of the command goes through tether."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

from support import Gateway, client_settings_for, tether_cli

from tether.client import control

CHILD = textwrap.dedent(
    """
    import socket, subprocess, sys
    port = int(sys.argv[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"ping")
    print(type(s).__module__, s.recv(4).decode(), s.getpeername()[1] == port)
    s.close()
    try:
        socket.create_connection(("127.0.0.1", 25), timeout=5)
    except PermissionError as exc:
        print("denied", "port 25" in str(exc))
    if len(sys.argv) > 2:  # a grandchild Python process is covered too
        out = subprocess.run([sys.executable, "-c",
            "import socket; print(socket.socket.__module__)"],
            capture_output=True, text=True, check=True).stdout.strip()
        print("grandchild", out)
    """
)


def test_run_with_a_gateway(gateway: Gateway, echo_port: int, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = tether_cli(
        "run", "--gateway", gateway.address, "--app", gateway.app, f"--key={gateway.key}",
        "--", sys.executable, str(script), str(echo_port), "grandchild",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tether.client.sock ping True"
    assert lines[1] == "denied True"
    assert lines[2] == "grandchild tether.client.sock"


def test_run_dev_mode_uses_local_config(echo_port: int, tmp_path: Path) -> None:
    (tmp_path / "tether.toml").write_text(
        f'[resolver]\nmode = "static"\n[policy]\nallow = ["127.0.0.1:{echo_port}"]\n'
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = tether_cli("run", "--", sys.executable, str(script), str(echo_port), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "development gateway on 127.0.0.1:" in result.stderr
    assert result.stdout.splitlines()[:2] == ["tether.client.sock ping True", "denied True"]


def test_run_dev_mode_applies_policy(echo_port: int, tmp_path: Path) -> None:
    # No allow rule for the port: loopback stays denied in development mode too.
    (tmp_path / "tether.toml").write_text('[resolver]\nmode = "static"\n')
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {echo_port}), timeout=5)\n"
        "except PermissionError as exc:\n"
        "    print('denied:', exc)\n"
    )
    result = tether_cli("run", "--", sys.executable, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("denied: ")
    assert "loopback" in result.stdout


def test_run_passes_the_exit_status(tmp_path: Path) -> None:
    (tmp_path / "tether.toml").write_text("")
    result = tether_cli("run", "--", sys.executable, "-c", "raise SystemExit(7)", cwd=tmp_path)
    assert result.returncode == 7


def test_run_needs_a_command() -> None:
    result = tether_cli("run")
    assert result.returncode == 2
    assert "give a command" in result.stderr


def test_run_bad_dev_config(tmp_path: Path) -> None:
    (tmp_path / "tether.toml").write_text("[gateway]\nidle_timeout = 0\n")
    result = tether_cli("run", "--", sys.executable, "-c", "pass", cwd=tmp_path)
    assert result.returncode == 2
    assert "gateway.idle_timeout" in result.stderr


# -- nothing left open at exit -------------------------------------------------------

# A lookup, a connection and a setsockopt (both go over the control stream),
# on the main thread, another thread and a forked child that exits through
# the interpreter's normal teardown: under -X dev -W error, a stream left
# open would print "ResourceWarning: unclosed <socket.socket ...>".
EXIT_CHILD = textwrap.dedent(
    """
    import os, socket, sys, threading
    port = int(sys.argv[1])

    def use_the_gateway():
        assert socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
        with socket.create_connection(("localhost", port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"

    use_the_gateway()
    worker = threading.Thread(target=use_the_gateway)
    worker.start()
    worker.join()
    pid = os.fork()
    use_the_gateway()  # the child on its own control stream
    if pid:
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    print(socket.socket.__module__)
    """
)


def test_run_leaves_no_stream_open_at_exit(
    gateway: Gateway, echo_port: int, tmp_path: Path
) -> None:
    script = tmp_path / "exit_child.py"
    script.write_text(EXIT_CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_KEY"] = gateway.key  # --key would warn on stderr
    result = tether_cli(
        "run", "--gateway", gateway.address, "--app", gateway.app,
        "--", sys.executable, "-X", "dev", "-W", "error", str(script), str(echo_port), env=env,
    )
    assert "ResourceWarning" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == ["tether.client.sock", "child", "0", "tether.client.sock"]


def test_exit_does_not_wait_for_a_stream_in_use(gateway: Gateway) -> None:
    # A daemon thread may be mid-request when the interpreter exits; the exit
    # hook must not wait out its timeout (30 s) on the stream's lock.
    settings = client_settings_for(gateway.address, gateway.app, gateway.key)
    busy = control.channel(settings)
    assert busy._lock.acquire(timeout=5)  # as a thread mid-request holds it
    closer = threading.Thread(target=control.close_all, kwargs={"wait": False}, daemon=True)
    try:
        closer.start()
        closer.join(timeout=5)
        assert not closer.is_alive(), "close_all(wait=False) waited for a busy stream"
    finally:
        busy._lock.release()
        closer.join(timeout=5)
        busy.close()
