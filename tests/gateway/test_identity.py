"""Apps identified without a secret on Unix listeners: by the peer's uid/gid or by their own socket.

A real gateway process listens on a Unix socket in tmp_path (the shared
listener) and on app `bound`'s own socket; app `mine` is mapped to our uid.
The hello is still sent (the protocol is unchanged), with an empty key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import TIMEOUT, use_gateway

import tether.socket as tsock
from tether.client import control
from tether.client import settings as client_settings
from tether.config import parse_config
from tether.devmode import GatewayProcess
from tether.errors import ConfigError
from tether.gateway.core.auth import authenticate, authenticate_bound, peer_app


class Identity:
    def __init__(self, process: GatewayProcess, shared: str, own: str) -> None:
        self.process, self.shared, self.own = process, shared, own


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Identity]:
    tmp = tmp_path_factory.mktemp("identity")
    own = f"unix:{tmp}/bound.sock"
    config = tmp / "tether.toml"
    config.write_text(
        '[resolver]\nmode = "static"\n'
        '[policy]\nallow = ["127.0.0.0/8:*"]\n'
        f"[apps.mine]\nuids = [{os.getuid()}]\n"
        f'[apps.bound]\nlisten = ["{own}"]\n'
        '[apps.keyed]\nkey = "keyed-key"\n'
    )
    process = GatewayProcess(config, listen=f"unix:{tmp}/gateway.sock")
    shared = process.start()
    try:
        yield Identity(process, shared, own)
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _reset_client() -> Iterator[None]:
    yield
    client_settings.configure(None)
    control.close_all()


def roundtrip(port: int) -> bytes:
    with tsock.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"ping")
        return s.recv(4)


def test_app_identified_by_peer_uid_needs_no_key(identity: Identity, echo_port: int) -> None:
    use_gateway(identity.shared, "mine", "")
    assert roundtrip(echo_port) == b"ping"


def test_app_identified_by_its_own_listener_needs_no_key(
    identity: Identity, echo_port: int
) -> None:
    use_gateway(identity.own, "bound", "")
    assert roundtrip(echo_port) == b"ping"


def refusal(address: str, app: str, key: str, port: int) -> str:
    use_gateway(address, app, key)
    with pytest.raises(PermissionError) as info:
        roundtrip(port)
    return str(info.value)


def test_hello_naming_another_app_than_the_credentials_is_refused(
    identity: Identity, echo_port: int
) -> None:
    # `keyed` with its right key: still refused, the uid says this stream is `mine`.
    assert (
        f"this stream is app 'mine' (its peer's uid {os.getuid()}, gid {os.getgid()}), "
        "not 'keyed'"
    ) in refusal(identity.shared, "keyed", "keyed-key", echo_port)


def test_hello_naming_another_app_than_the_listener_is_refused(
    identity: Identity, echo_port: int
) -> None:
    path = identity.own.removeprefix("unix:")
    assert f"this stream is app 'bound' (its listener unix:{path}), not 'mine'" in refusal(
        identity.own, "mine", "", echo_port
    )


def test_a_key_given_on_an_identified_stream_must_be_right(
    identity: Identity, echo_port: int
) -> None:
    assert "app 'mine' authentication failed" in refusal(
        identity.shared, "mine", "a-guess", echo_port
    )


# -- the decision itself, without a gateway ---------------------------------------


def core_for(apps: dict[str, Any]) -> Any:
    return SimpleNamespace(config=parse_config({"apps": apps}))


def test_an_app_without_a_key_never_authenticates_by_key() -> None:
    core = core_for({"free": {"uids": [4242]}, "keyed": {"key": "k"}})
    assert not authenticate(core, "free", "")
    assert not authenticate(core, "free", "anything")
    assert authenticate(core, "keyed", "k")
    assert authenticate_bound(core, "free", "", "free")
    assert authenticate_bound(core, "keyed", "", "keyed")
    assert authenticate_bound(core, "keyed", "k", "keyed")
    assert not authenticate_bound(core, "keyed", "wrong", "keyed")
    assert not authenticate_bound(core, "keyed", "k", "free")
    # An app a reload removed is no longer anyone's.
    assert not authenticate_bound(core, "gone", "", "gone")


def test_uid_wins_over_gid() -> None:
    config = parse_config({"apps": {"a": {"uids": [1000]}, "b": {"gids": [1000, 2000]}}})
    assert peer_app(config, 1000, 2000) == "a"
    assert peer_app(config, 1001, 2000) == "b"
    assert peer_app(config, 1001, 1000) == "b"
    assert peer_app(config, 1001, 1001) is None
    assert config.identifies_peers
    assert not parse_config({"apps": {"k": {"key": "k"}}}).identifies_peers


@pytest.mark.parametrize(
    ("apps", "gateway", "message"),
    [
        ({"a": {"uids": [7]}, "b": {"uids": [7]}}, {}, "apps.b.uids: 7 is already apps.a's"),
        ({"a": {"gids": [7]}, "b": {"gids": [8, 7]}}, {}, "apps.b.gids: 7 is already apps.a's"),
        ({"a": {"uids": [-1]}}, {}, "apps.a.uids: must be a list of whole numbers"),
        ({"a": {"uids": [True]}}, {}, "apps.a.uids: must be a list of whole numbers"),
        ({"a": {}}, {}, "apps.a.key: missing: an app needs a key, or uids, gids or its own"),
        ({"a": {"key": "", "uids": [1]}}, {}, "apps.a.key: must be a non-empty string"),
        ({"a": {"listen": ["127.0.0.1:1"]}}, {}, "apps.a.listen[0]: must be a unix:/path"),
        ({"a": {"listen": [3]}}, {}, "apps.a.listen[0]: must be a unix:/path"),
        ({"a": {"listen": []}}, {}, "apps.a.listen: must be a non-empty list"),
        ({"a": {"listen": "unix:/x.sock"}, "b": {"listen": ["unix:/x.sock"]}}, {},
         "apps.b.listen[0]: unix:/x.sock is already apps.a's"),
        ({"a": {"listen": "unix:/x.sock"}}, {"listen": ["unix:/x.sock"]},
         "apps.a.listen[0]: unix:/x.sock is already gateway.listen's"),
    ],
)
def test_config_errors(apps: dict[str, Any], gateway: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": gateway, "apps": apps})
    assert str(info.value).startswith(message)


def test_unix_stream_with_no_mapping_still_needs_its_key(tmp_path: Path, echo_port: int) -> None:
    # An in-process gateway: a Unix listener, and no app mapped to our uid.
    from tether.gateway.embedded import EmbeddedGateway

    config = parse_config({
        "gateway": {"listen": [f"unix:{tmp_path}/gw.sock"]},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {"other": {"uids": [os.getuid() + 1]}, "keyed": {"key": "keyed-key"}},
    })
    gw = EmbeddedGateway(config)
    address = str(gw.start()[0])
    try:
        use_gateway(address, "keyed", "keyed-key")
        assert roundtrip(echo_port) == b"ping"
        control.close_all()
        use_gateway(address, "keyed", "")
        with pytest.raises(PermissionError, match="app 'keyed' authentication failed"):
            roundtrip(echo_port)
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()
