"""The caps as values: derive_caps(), admission.capacity() and the config keys.

A core with the static resolver table and a fake clock; nothing opens a socket.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import tomllib

import pytest
from support import FakeClock

from tether.config import Config, parse_config
from tether.errors import ConfigError
from tether.gateway.core.admission import capacity
from tether.gateway.core.errors import Refusal
from tether.gateway.core.gateway import GatewayCore, derive_caps
from tether.policy import Transport
from tether.wire import pb

CONFIG = """
[resolver]
mode = "static"

[policy]
allow = ["127.0.0.0/8:*"]

[apps.a]
key = "key-a"
max_sockets = 2

[apps.b]
key = "key-b"
"""


def make_core(extra: str = "") -> GatewayCore:
    text = CONFIG.replace("[resolver]", f"[gateway]\n{extra}\n\n[resolver]") if extra else CONFIG
    return GatewayCore(parse_config(tomllib.loads(text)), clock=FakeClock())


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1024, (102, 461, 230)),  # prlimit --nofile=1024: a tenth reserved
        (256, (64, 96, 48)),  # the reserve's floor
        (20000, (2000, 9000, 4500)),
        (1_048_576, (104_857, 471_859, 235_929)),
    ],
)
def test_caps_derived_from_the_open_files_limit(limit: int, expected: tuple[int, ...]) -> None:
    assert derive_caps(Config(), limit) == expected


def test_configured_caps_win() -> None:
    config = Config(fd_reserve=10, max_sockets=50, max_sockets_per_app=7)
    assert derive_caps(config, 1024) == (10, 50, 7)
    # Only the reserve given: the others follow from it.
    assert derive_caps(Config(fd_reserve=24), 1024) == (24, 500, 250)


@pytest.mark.parametrize("key", ["max_sockets", "max_sockets_per_app", "fd_reserve"])
@pytest.mark.parametrize("value", ["0", "-3", "1.5", "true", '"10"'])
def test_bad_cap_values_name_their_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"gateway\.{key}: must be a whole number"):
        parse_config(tomllib.loads(f"[gateway]\n{key} = {value}\n"))
    with pytest.raises(ConfigError, match=r"apps\.x\.max_sockets: must be a whole number"):
        parse_config(tomllib.loads(f'[apps.x]\nkey = "k"\nmax_sockets = {value}\n'))


def test_an_app_at_its_cap_is_refused_and_the_others_are_not() -> None:
    core = make_core()
    usage = core.registry.app_usage("a")
    usage.open_sockets, usage.connecting = 1, 1  # one open, one being dialled
    refused = capacity(core, "a")
    assert isinstance(refused, Refusal)
    # The per-app cap is the app's sockets quota (apps.NAME.max_sockets its older name).
    assert (refused.code, refused.errno, refused.rule, refused.reason, refused.window,
            refused.app) == (pb.Error.QUOTA, errno.EDQUOT, "sockets", "2", "concurrent", "a")
    assert refused.message == (
        "tether: app 'a' has 2 open sockets, its sockets quota (2, apps.a.max_sockets); "
        "close one before opening another")
    assert core.registry.app_usage("a").quota_refusals == 1
    assert capacity(core, "b") is None
    usage.connecting = 0
    assert capacity(core, "a") is None


def test_the_gateway_cap_counts_every_app() -> None:
    core = make_core("max_sockets = 3")
    for _ in range(3):
        core.registry.add("b", ("127.0.0.1", 1), ("127.0.0.1", 2), "tcp", 600.0)
    refused = capacity(core, "a")
    assert isinstance(refused, Refusal) and refused.rule == "gateway.max_sockets"
    assert "the gateway has 3 open sockets, its max_sockets (3)" in refused.message


def test_a_stream_that_outlived_its_app_opens_nothing() -> None:
    """An app removed by a reload, on a stream authenticated before it: the real cause."""
    core = make_core()
    core.reload(parse_config(tomllib.loads(CONFIG.replace('[apps.a]\nkey = "key-a"\n'
                                                          "max_sockets = 2\n", ""))))
    refused = asyncio.run(core.admit("a", "127.0.0.1", 80, Transport.TCP, socket.AF_UNSPEC))
    assert isinstance(refused, Refusal) and refused.code == pb.Error.AUTH_FAILED
    assert refused.message == "tether: app 'a' is not in the gateway's config (it was removed)"
    # Its old key is refused with the cause; a key never issued is not told anything.
    assert core.revoked("a", "key-a") == "app 'a' was removed from the gateway's config"
    assert core.revoked("a", "guess") is None


def test_a_changed_key_is_revoked_and_the_new_one_is_not() -> None:
    core = make_core()
    core.reload(parse_config(tomllib.loads(CONFIG.replace('"key-a"', '"key-a2"'))))
    assert core.revoked("a", "key-a") == "app 'a''s key changed"
    assert core.revoked("a", "key-a2") is None
    assert core.revoked("b", "key-b") is None  # unchanged: nothing revoked


def test_udp_relays_count_against_the_descriptors() -> None:
    """A UDP association's relays are descriptors too: past the reserve, refused."""
    core = make_core()
    core.fd_limit, core.fd_reserve = 100, 64  # 36 descriptors for sockets
    core.registry.extra_fds = 35  # relays of open associations
    refused = capacity(core, "b")  # a new socket needs two
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.rule, refused.reason) == (
        pb.Error.LIMIT, "gateway.fd_reserve", "64")
    assert "would hold 37 of its 100, and 64 are kept for its own work" in refused.message
    assert capacity(core, "b", new_socket=False) is None  # one more relay fits
    core.registry.extra_fds = 36
    assert isinstance(capacity(core, "b", new_socket=False), Refusal)


@pytest.mark.parametrize(
    ("app_table", "expected"),
    [
        ("max_sockets = 3", (3, "apps.a.max_sockets")),
        ("quota = { sockets = 4 }", (4, "apps.a.quota.sockets")),
        ("", (None, "gateway.max_sockets_per_app")),  # derived from the open-files limit
    ],
)
def test_a_reload_changes_the_cap_an_app_is_held_to(
    app_table: str, expected: tuple[int | None, str]
) -> None:
    """The cap is worked out once per app and config (core.app_caps): a reload starts afresh."""
    core = make_core()
    usage = core.registry.app_usage("a")
    usage.open_sockets = 2
    refused = capacity(core, "a")  # at its cap of 2: the cap is now known to the core
    assert isinstance(refused, Refusal) and refused.reason == "2"
    core.reload(parse_config(tomllib.loads(CONFIG.replace("max_sockets = 2", app_table))))
    cap, name = expected
    assert core.app_cap(core.config.apps["a"]) == (cap or core.max_sockets_per_app, name)
    assert capacity(core, "a") is None  # 2 open, under the new cap
    usage.open_sockets = cap or core.max_sockets_per_app
    refused = capacity(core, "a")
    assert isinstance(refused, Refusal) and refused.reason == str(usage.open_sockets)
