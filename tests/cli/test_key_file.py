"""Keys by file: `--key-file` / TETHER_KEY_FILE for `tether run` and `tether sockets`.

`--key` on a command line still works but warns (other local users read
command lines with ps); a bad key file is an error naming its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Gateway, tether_cli

from tether.cli.main import main

CHILD = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
    "s.sendall(b'ping'); print(type(s).__module__, s.recv(4).decode()); s.close()\n"
)
WARNING = "puts the key on the command line, where other local users can read it"


def key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "app.key"
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_child(
    gateway: Gateway, echo_port: int, *key_args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return tether_cli(
        "run", "--gateway", gateway.address, "--app", gateway.app, *key_args,
        "--", sys.executable, "-c", CHILD, str(echo_port), env=env,
    )


def test_run_with_key_file(gateway: Gateway, echo_port: int, tmp_path: Path) -> None:
    # Surrounding whitespace (an editor's trailing newline) is not part of the key.
    path = key_file(tmp_path, f"  {gateway.key}\n\n")
    result = run_child(gateway, echo_port, "--key-file", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tether.client.sock ping"
    assert WARNING not in result.stderr


def test_run_with_key_file_from_environment(
    gateway: Gateway, echo_port: int, tmp_path: Path
) -> None:
    path = key_file(tmp_path, gateway.key + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_KEY_FILE"] = str(path)
    result = run_child(gateway, echo_port, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tether.client.sock ping"
    assert WARNING not in result.stderr


def test_run_with_key_on_command_line_works_but_warns(gateway: Gateway, echo_port: int) -> None:
    result = run_child(gateway, echo_port, f"--key={gateway.key}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tether.client.sock ping"
    assert f"tether run: warning: --key {WARNING} (ps, /proc/PID/cmdline)" in result.stderr
    assert "--key-file PATH, TETHER_KEY_FILE or TETHER_KEY" in result.stderr
    assert gateway.key not in result.stderr


def test_run_with_wrong_key_file_content_is_refused(
    gateway: Gateway, echo_port: int, tmp_path: Path
) -> None:
    # The file's content is the key: a wrong one is an authentication failure.
    path = key_file(tmp_path, "not-the-key\n")
    result = run_child(gateway, echo_port, "--key-file", str(path))
    assert result.returncode != 0
    assert "tether.client.sock ping" not in result.stdout


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "missing.key", "No such file or directory"),
        (lambda tmp: key_file(tmp, " \n\t\n"), "is empty"),
        (lambda tmp: tmp, "Is a directory"),
    ],
    ids=["missing", "empty", "directory"],
)
def test_run_bad_key_file_names_the_path(
    gateway: Gateway, tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    path = make(tmp_path)
    result = tether_cli(
        "run", "--gateway", gateway.address, "--app", gateway.app, "--key-file", str(path),
        "--", sys.executable, "-c", "print('ran')",
    )
    assert result.returncode == 2
    assert result.stdout == ""  # the command did not run
    assert result.stderr.startswith("tether run: ")
    assert repr(str(path)) in result.stderr
    assert reason in result.stderr


def test_run_key_and_key_file_together_is_an_error(gateway: Gateway, tmp_path: Path) -> None:
    path = key_file(tmp_path, gateway.key)
    result = tether_cli(
        "run", "--gateway", gateway.address, "--key", gateway.key, "--key-file", str(path),
        "--", sys.executable, "-c", "print('ran')",
    )
    assert result.returncode == 2
    assert "give a key or a key file, not both" in result.stderr
    assert result.stdout == ""


def test_sockets_with_key_file(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = key_file(tmp_path, gateway.key + "\n")
    status = main(["sockets", "--gateway", gateway.address, "--app", gateway.app,
                   "--key-file", str(path), "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert WARNING not in captured.err


def test_sockets_key_and_admin_key_on_command_line_warn(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["sockets", "--gateway", gateway.address, "--app", gateway.app,
                   f"--key={gateway.key}", "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert f"tether sockets: warning: --key {WARNING}" in captured.err
    # The session gateway has no admin key: refused, but the warning came first.
    status = main(["sockets", "--gateway", gateway.address, "--admin-key=whatever"])
    captured = capsys.readouterr()
    assert status == 1
    assert f"tether sockets: warning: --admin-key {WARNING}" in captured.err


def test_sockets_missing_admin_key_file(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "admin.key"
    status = main(["sockets", "--gateway", gateway.address, "--admin-key-file", str(path)])
    captured = capsys.readouterr()
    assert status == 2
    assert repr(str(path)) in captured.err and "No such file or directory" in captured.err
