"""`tether sockets`: a running gateway's live sockets, as an app or as the admin.

A gateway process of its own (its config has ``[gateway] admin_key``), the
sockets opened with ``tether.socket`` directly (no install()), and the CLI
run both in-process (``tether.cli.main.main``) and as a real process.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    APP,
    TIMEOUT,
    Gateway,
    StdSocket,
    client_settings_for,
    descriptor,
    gateway_config,
    start_gateway,
    tether_cli,
    use_gateway,
    wait_for,
)
from tcpservers import echo, serving

import tether
import tether.socket as tsock
from tether.cli.main import main
from tether.client import control
from tether.client import settings as client_settings

HEADER = ["APP", "DESCRIPTOR", "PEER", "STATE", "OUT", "IN", "IDLE", "AGE"]


class Admin:
    def __init__(self, gw: Gateway, admin_key: str) -> None:
        self.gw = gw
        self.admin_key = admin_key


@pytest.fixture(scope="module")
def admin_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    key = secrets.token_urlsafe(16)
    admin_key = secrets.token_urlsafe(16)
    text = gateway_config(key, gateway=f'admin_key = "{admin_key}"')
    gw = start_gateway(tmp_path_factory.mktemp("sockets-gateway"), text, key)
    yield Admin(gw, admin_key)
    gw.process.stop()


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with serving(echo) as server:
        yield server.port


class Sockets:
    """Sockets opened as given apps; all closed (or resumed and closed) at the end."""

    def __init__(self, admin: Admin, port: int) -> None:
        self.admin = admin
        self.port = port
        self.open: list[socket.socket] = []
        self.payloads: list[tuple[str, bytes]] = []

    def settings(self, app: str) -> client_settings.Settings:
        key = self.admin.gw.key if app == APP else f"{app}-{self.admin.gw.key}"
        return client_settings_for(self.admin.gw.address, app, key)

    def connect(self, app: str, send: bytes = b"") -> socket.socket:
        client_settings.configure(self.settings(app))
        sock = tsock.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        self.open.append(sock)
        if send:
            sock.sendall(send)
            got = b""
            while len(got) < len(send):
                got += sock.recv(len(send) - len(got))
        return sock

    def hand_off(self, app: str) -> str:
        """A socket of `app` pickled and not resumed yet: 'handed-off'. Its descriptor."""
        sock = self.connect(app)
        name = descriptor(sock)
        self.payloads.append((app, pickle.dumps(sock)))
        return name

    def close(self) -> None:
        for app, payload in self.payloads:
            client_settings.configure(self.settings(app))
            pickle.loads(payload).close()
        for sock in self.open:
            sock.close()
        client_settings.configure(None)
        control.close_all()


@pytest.fixture
def sockets(admin_gateway: Admin, echo_port: int) -> Iterator[Sockets]:
    assert not tether.installed()
    s = Sockets(admin_gateway, echo_port)
    try:
        yield s
    finally:
        s.close()
        # Let the gateway finish closing them: the next test starts from none.
        wait_for(lambda: not _json_rows(admin_gateway, as_admin=True))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[
    int, str, str
]:
    if capsys is not None:
        capsys.readouterr()
    code = main(["sockets", *args])
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


def _json_rows(gw: Admin, *, as_admin: bool = False) -> list[Any]:
    """Rows from `tether sockets --json`, run as a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    args = ["sockets", "--json", "--gateway", gw.gw.address]
    if as_admin:
        args += [f"--admin-key={gw.admin_key}"]
    else:
        args += ["--app", APP, f"--key={gw.gw.key}"]
    result = tether_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def table(out: str) -> list[list[str]]:
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0] == HEADER, out
    return lines[1:]


# -- listing ------------------------------------------------------------------------


def test_app_sees_only_its_own_sockets_with_states_and_bytes(
    sockets: Sockets, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    attached = sockets.connect(APP, send=b"hello")
    waiting = sockets.hand_off(APP)
    theirs = sockets.connect("other", send=b"not yours")
    gw = sockets.admin.gw

    monkeypatch.setenv("TETHER_KEY", gw.key)  # --key would warn on stderr

    def listed() -> list[list[str]]:
        code, out, err = run_cli(["--gateway", gw.address, "--app", APP], capsys)
        assert (code, err) == (0, "")
        return table(out)

    assert wait_for(lambda: sorted(r[3] for r in listed()) == ["attached", "handed-off"])
    rows = {r[1]: r for r in listed()}
    assert set(rows) == {f"{descriptor(attached)[:8]}...", f"{waiting[:8]}..."}
    assert f"{descriptor(theirs)[:8]}..." not in rows
    row = rows[f"{descriptor(attached)[:8]}..."]
    assert row[0] == APP
    assert row[2] == f"127.0.0.1:{sockets.port}"
    assert row[3] == "attached"
    assert (row[4], row[5]) == ("5", "5")  # bytes out (app -> peer) and in
    assert row[6].endswith("s") and row[7].endswith("s")
    assert rows[f"{waiting[:8]}..."][3] == "handed-off"


def test_admin_sees_every_app(sockets: Sockets, capsys: pytest.CaptureFixture[str]) -> None:
    mine = sockets.connect(APP)
    theirs = sockets.connect("other")
    code, out, _ = run_cli(
        ["--gateway", sockets.admin.gw.address, f"--admin-key={sockets.admin.admin_key}"], capsys
    )
    assert code == 0
    rows = {r[1]: r[0] for r in table(out)}
    assert rows == {f"{descriptor(mine)[:8]}...": APP, f"{descriptor(theirs)[:8]}...": "other"}


def test_json_output_one_object_per_socket(sockets: Sockets) -> None:
    attached = sockets.connect(APP, send=b"12345678")
    waiting = sockets.hand_off(APP)
    sockets.connect("other")
    assert wait_for(lambda: len(_json_rows(sockets.admin)) == 2 and all(
        r["state"] in ("attached", "handed-off") for r in _json_rows(sockets.admin)))
    rows = {r["descriptor"]: r for r in _json_rows(sockets.admin)}
    assert set(rows) == {descriptor(attached)[:8], waiting[:8]}
    row = rows[descriptor(attached)[:8]]
    assert set(row) == {"app", "descriptor", "peer", "state", "bytes_out", "bytes_in",
                        "idle_s", "age_s"}
    assert (row["app"], row["peer"], row["state"]) == (
        APP, f"127.0.0.1:{sockets.port}", "attached")
    assert (row["bytes_out"], row["bytes_in"]) == (8, 8)
    assert 0 <= row["idle_s"] <= row["age_s"] < 60
    assert rows[waiting[:8]]["state"] == "handed-off"
    everyone = _json_rows(sockets.admin, as_admin=True)
    assert sorted(r["app"] for r in everyone) == sorted([APP, APP, "other"])


def test_settings_from_the_environment(
    sockets: Sockets, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = sockets.connect(APP)
    gw = sockets.admin.gw
    monkeypatch.setenv("TETHER_GATEWAY", gw.address)
    monkeypatch.setenv("TETHER_APP", APP)
    monkeypatch.setenv("TETHER_KEY", gw.key)
    code, out, _ = run_cli([], capsys)
    assert code == 0
    assert [r[1] for r in table(out)] == [f"{descriptor(sock)[:8]}..."]


def test_no_sockets(admin_gateway: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    gw = admin_gateway.gw
    assert wait_for(lambda: not _json_rows(admin_gateway, as_admin=True))
    code, out, _ = run_cli(["--gateway", gw.address, "--app", APP, f"--key={gw.key}"], capsys)
    assert code == 0
    assert out.splitlines()[-1] == "(no live sockets)"
    code, out, _ = run_cli(["--gateway", gw.address, "--app", APP, f"--key={gw.key}", "--json"],
                           capsys)
    assert (code, out) == (0, "")


# -- refusals and exit codes ---------------------------------------------------------


def test_exit_2_without_a_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["--app", APP, "--key", "k"], capsys)
    assert code == 2
    assert "give --gateway or set TETHER_GATEWAY" in err
    assert out == ""


def test_exit_2_for_a_bad_gateway_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--gateway", "not an address:xx", "--app", APP, "--key", "k"], capsys)
    assert code == 2
    assert err.startswith("tether sockets: ")


def test_exit_1_for_a_wrong_key(admin_gateway: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    gw = admin_gateway.gw
    code, out, err = run_cli(["--gateway", gw.address, "--app", APP, "--key", "wrong"], capsys)
    assert code == 1
    assert "authentication failed" in err
    assert "wrong" not in err  # keys are never echoed
    assert out == ""


def test_exit_1_for_a_wrong_admin_key(
    admin_gateway: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["--gateway", admin_gateway.gw.address, "--admin-key", "not-the-admin-key"], capsys
    )
    assert code == 1
    assert "authentication failed" in err


def test_exit_1_for_admin_on_a_gateway_without_admin_key(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["--gateway", gateway.address, "--admin-key", "anything"], capsys)
    assert code == 1
    assert "authentication failed" in err


def test_exit_1_when_the_gateway_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    probe = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    code, _, err = run_cli(["--gateway", f"127.0.0.1:{port}", "--app", APP, "--key", "k"], capsys)
    assert code == 1
    assert "unreachable" in err


def test_real_process_exit_codes(admin_gateway: Admin, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    assert tether_cli("sockets", env=env).returncode == 2
    env.update(TETHER_GATEWAY=admin_gateway.gw.address, TETHER_APP=APP, TETHER_KEY="wrong")
    assert tether_cli("sockets", env=env).returncode == 1
    env["TETHER_KEY"] = admin_gateway.gw.key
    done = tether_cli("sockets", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0].split() == HEADER


def test_admin_identity_cannot_open_sockets(admin_gateway: Admin, echo_port: int) -> None:
    assert not tether.installed()
    use_gateway(admin_gateway.gw.address, "*", admin_gateway.admin_key)
    try:
        with pytest.raises(PermissionError, match="can list sockets but not open them"):
            tsock.create_connection(("127.0.0.1", echo_port), timeout=TIMEOUT)
    finally:
        client_settings.configure(None)
        control.close_all()
