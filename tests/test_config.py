"""Config validation: every bad key or value is reported with its path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tether.config import DEFAULT_IDLE_TIMEOUT, load_config, parse_config
from tether.endpoint import Endpoint, parse_endpoint
from tether.errors import ConfigError

GOOD = """
[gateway]
listen = ["127.0.0.1:0", "unix:/tmp/tether-test.sock", "[::1]:7341"]
idle_timeout = 120
connect_timeout = 5.5
max_frame = 4096

[resolver]
mode = "static"
[resolver.hosts]
"Mail.Test." = "127.0.0.1"
"dual.test" = ["127.0.0.1", "::1"]

[policy]
allow = ["127.0.0.1:8025"]

[apps.billing]
key = "k"
idle_timeout = 30
"""


def test_good_config() -> None:
    config = parse_config(tomllib.loads(GOOD))
    assert config.listen == (
        Endpoint("127.0.0.1", 0),
        Endpoint(path="/tmp/tether-test.sock"),
        Endpoint("::1", 7341),
    )
    assert config.idle_timeout == 120.0
    assert config.connect_timeout == 5.5
    assert config.max_frame == 4096
    assert config.resolver_mode == "static"
    assert config.resolver_hosts == {"mail.test": ["127.0.0.1"], "dual.test": ["127.0.0.1", "::1"]}
    assert config.apps["billing"].key == "k"
    assert config.apps["billing"].idle_timeout == 30.0
    assert "key=" not in repr(config.apps["billing"])  # keys never reach a log


def test_defaults() -> None:
    config = parse_config({})
    assert config.listen == (Endpoint("127.0.0.1", 7340),)
    assert config.idle_timeout == DEFAULT_IDLE_TIMEOUT == 600.0
    assert config.resolver_mode == "system"
    assert config.apps == {}


@pytest.mark.parametrize(
    ("toml", "path"),
    [
        ("bogus = 1", "bogus"),
        ("[gateway]\nlisten = []", "gateway.listen"),
        ("[gateway]\nlisten = [7340]", "gateway.listen[0]"),
        ('[gateway]\nlisten = ["127.0.0.1:99999"]', "gateway.listen[0]"),
        ('[gateway]\nlisten = ["::1:80"]', "gateway.listen[0]"),
        ('[gateway]\nlisten = ["unix:"]', "gateway.listen[0]"),
        ("[gateway]\nidle_timeout = 0", "gateway.idle_timeout"),
        ("[gateway]\nidle_timeout = -1", "gateway.idle_timeout"),
        ('[gateway]\nidle_timeout = "10"', "gateway.idle_timeout"),
        ("[gateway]\nidle_timeout = true", "gateway.idle_timeout"),
        ("[gateway]\nconnect_timeout = inf", "gateway.connect_timeout"),
        ("[gateway]\nmax_frame = 10", "gateway.max_frame"),
        ("[gateway]\nmax_frame = 1e6", "gateway.max_frame"),
        ("[gateway]\nlisten_on = []", "gateway.listen_on"),
        ('[resolver]\nmode = "dns"', "resolver.mode"),
        ('[resolver]\nhosts = "x"', "resolver.hosts"),
        ('[resolver.hosts]\n"a.test" = "not-an-ip"', "resolver.hosts.a.test"),
        ('[resolver.hosts]\n"a.test" = []', "resolver.hosts.a.test"),
        ("[apps.x]\n", "apps.x.key"),
        ('[apps.x]\nkey = ""', "apps.x.key"),
        ("[apps.x]\nkey = 5", "apps.x.key"),
        ('[apps.x]\nkey = "k"\nsecret = "s"', "apps.x.secret"),
        ('[apps.x]\nkey = "k"\nidle_timeout = 0', "apps.x.idle_timeout"),
        ("apps = 1", "apps"),
        ('[policy]\nallow = ["nonsense rule here"]', "policy.allow[0]"),
        ('[policy]\nmode = "audit"', "policy.mode"),
        ('[apps.x]\nkey = "k"\n[apps.x.policy]\nmode = "nope"', "apps.x.policy.mode"),
    ],
)
def test_bad_values_name_their_path(toml: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(toml), source="t.toml")
    assert info.value.path == path
    assert str(info.value).startswith(f"t.toml: {path}: ")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7340", Endpoint("127.0.0.1", 7340)),
        ("localhost", Endpoint("localhost", 7340)),
        ("[::1]:80", Endpoint("::1", 80)),
        ("[::1]", Endpoint("::1", 7340)),
        ("unix:/run/t.sock", Endpoint(path="/run/t.sock")),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected
    assert parse_endpoint(str(expected)) == expected


@pytest.mark.parametrize("text", ["", ":80", "h:x", "h:-1", "[::1", "[::1]x", "::1:80", "[zz]:1"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)
