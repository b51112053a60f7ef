"""A TCP listener off loopback is refused unless the config accepts keys in clear there.

No test connects anywhere but loopback: the check is a pure function of the
config, the refusal happens before anything binds, and the one gateway that
binds the wildcard address is only looked at, never connected to.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tether.config import Config, check_listen, is_loopback_host, parse_config
from tether.endpoint import parse_endpoint
from tether.errors import ConfigError
from tether.gateway.server import Gateway


def config(*listen: str, allow: bool | None = None) -> Config:
    gateway: dict[str, object] = {"listen": list(listen)}
    if allow is not None:
        gateway["allow_cleartext_keys"] = allow
    return parse_config({"gateway": gateway})


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost", "LOCALHOST."],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.1", "192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1",
             "gateway.example", "localhost.example"],
)
def test_other_hosts(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize("listen", ["127.0.0.1:7340", "[::1]:0", "localhost:0", "unix:/run/t.sock"])
def test_loopback_and_unix_listeners_pass(listen: str) -> None:
    check_listen(config(listen))


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.7:7340"])
def test_other_listeners_are_refused_saying_why(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_listen(config("127.0.0.1:0", listen))
    message = str(info.value)
    assert message.startswith(f"gateway.listen[1]: {parse_endpoint(listen)} is not a loopback")
    assert "keys would cross that network in clear" in message
    assert "cannot be TLS" in message
    assert "run a gateway on each host" in message
    assert "allow_cleartext_keys = true" in message


def test_the_option_accepts_them() -> None:
    check_listen(config("0.0.0.0:0", "[::]:0", allow=True))
    with pytest.raises(ConfigError, match="not a loopback"):
        check_listen(config("0.0.0.0:0", allow=False))


def test_the_option_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.allow_cleartext_keys: must be true or false"):
        config("127.0.0.1:0", allow="yes")  # type: ignore[arg-type]


def test_serve_refuses_to_start(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "tether.toml"
    path.write_text('[gateway]\nlisten = ["127.0.0.1:0", "0.0.0.0:0"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "refusing to listen" in result.stderr
    assert f"{path}: gateway.listen[1]: 0.0.0.0:0 is not a loopback address" in result.stderr
    assert "listening on" not in result.stderr  # nothing was bound, not even the loopback one


def test_with_the_option_it_starts_on_the_wildcard() -> None:
    async def main() -> tuple[str, int]:
        gateway = Gateway(config("0.0.0.0:0", allow=True))
        try:
            (bound,) = await gateway.start()
            return bound.host, bound.port
        finally:
            await gateway.close(grace=0)

    host, port = asyncio.run(main())
    assert host == "0.0.0.0" and port > 0
