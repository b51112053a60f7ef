"""The client's key from a file: install(key_file=...), TETHER_KEY_FILE, resolve_settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support import Gateway

import tether
from tether.client import settings as client_settings
from tether.client.settings import KeyFileError, read_key_file, resolve_settings


def write_key(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "app.key"
    path.write_text(text)
    return path


def test_install_with_key_file_end_to_end(
    gateway: Gateway, echo_port: int, tmp_path: Path
) -> None:
    path = write_key(tmp_path, f"\n{gateway.key}  \n")
    tether.install(gateway=gateway.address, app=gateway.app, key_file=str(path))
    try:
        assert client_settings.current().key == gateway.key
        with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as s:
            assert type(s).__module__ == "tether.client.sock"
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
    finally:
        tether.uninstall()
        client_settings.configure(None)


def test_key_file_from_environment(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_key(tmp_path, gateway.key + "\n")
    monkeypatch.setenv("TETHER_GATEWAY", gateway.address)
    monkeypatch.setenv("TETHER_APP", gateway.app)
    monkeypatch.setenv("TETHER_KEY_FILE", str(path))
    env = client_settings.from_env()
    assert env is not None and env.key == gateway.key
    resolved = resolve_settings()
    assert resolved is not None and resolved.key == gateway.key


def test_key_in_environment_wins_over_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_GATEWAY", "127.0.0.1:1")
    monkeypatch.setenv("TETHER_KEY", "from-env")
    monkeypatch.setenv("TETHER_KEY_FILE", str(tmp_path / "never-read"))
    resolved = resolve_settings()
    assert resolved is not None and resolved.key == "from-env"


def test_explicit_arguments_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broken TETHER_KEY_FILE is not read when the key is given explicitly.
    monkeypatch.setenv("TETHER_KEY_FILE", str(tmp_path / "missing"))
    path = write_key(tmp_path, "from-file")
    by_file = resolve_settings("127.0.0.1:1", "app", key_file=path)
    assert by_file is not None and by_file.key == "from-file"
    by_key = resolve_settings("127.0.0.1:1", "app", key="given")
    assert by_key is not None and by_key.key == "given"
    with pytest.raises(ValueError, match="not both"):
        resolve_settings("127.0.0.1:1", "app", key="given", key_file=path)


def test_bad_key_file_in_environment_names_variable_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.key"
    monkeypatch.setenv("TETHER_GATEWAY", "127.0.0.1:1")
    monkeypatch.setenv("TETHER_KEY_FILE", str(missing))
    with pytest.raises(KeyFileError) as info:
        resolve_settings()
    assert str(info.value) == (
        f"tether: TETHER_KEY_FILE: cannot read the key file {str(missing)!r}: "
        "No such file or directory"
    )
    # KeyFileError is the client's "not configured" error (a ConnectionError).
    assert isinstance(info.value, ConnectionError)


def test_read_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"the key file '.*empty\.key' is empty"):
        read_key_file(write_key(tmp_path, "  \n\t").rename(tmp_path / "empty.key"))
    with pytest.raises(KeyFileError, match="Is a directory"):
        read_key_file(tmp_path)
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyFileError, match=r"binary\.key"):
        read_key_file(binary)
    assert read_key_file(write_key(tmp_path, " k e y \r\n")) == "k e y"
