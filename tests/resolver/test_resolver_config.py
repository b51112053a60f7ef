"""[resolver] validation: upstream settings, with the path of a bad key."""

from __future__ import annotations

from typing import Any

import pytest

from tether.config import UpstreamConfig, parse_config
from tether.errors import ConfigError


def test_upstream_settings_and_defaults() -> None:
    config = parse_config(
        {
            "resolver": {
                "mode": "upstream",
                "servers": ["127.0.0.1:5353", "::1", "[::1]:53"],
                "timeout": 0.5,
                "hide_denied": True,
            }
        }
    )
    assert config.resolver_upstream == UpstreamConfig(
        servers=(("127.0.0.1", 5353), ("::1", 53), ("::1", 53)), timeout=0.5
    )
    assert config.resolver_hide_denied is True
    assert parse_config({}).resolver_upstream is None


@pytest.mark.parametrize(
    ("resolver", "path"),
    [
        ({"mode": "upstream"}, "resolver.servers"),
        ({"mode": "upstream", "servers": []}, "resolver.servers"),
        ({"mode": "upstream", "servers": ["dns.example"]}, "resolver.servers[0]"),
        ({"mode": "upstream", "servers": ["127.0.0.1", "127.0.0.1:99999"]}, "resolver.servers[1]"),
        ({"mode": "upstream", "servers": ["::1"], "timeout": 0}, "resolver.timeout"),
        ({"mode": "upstream", "servers": ["::1"], "attempts": 0}, "resolver.attempts"),
        ({"mode": "upstream", "servers": ["::1"], "cache_size": -1}, "resolver.cache_size"),
        ({"mode": "upstream", "servers": ["::1"], "max_ttl": -1}, "resolver.max_ttl"),
        ({"mode": "upstream", "servers": ["::1"], "min_ttl": 10, "max_ttl": 5}, "resolver.min_ttl"),
        ({"mode": "system", "servers": ["::1"]}, "resolver.servers"),
        ({"mode": "static", "timeout": 1}, "resolver.timeout"),
        ({"hide_denied": "yes"}, "resolver.hide_denied"),
        ({"mode": "dns"}, "resolver.mode"),
        ({"server": ["::1"]}, "resolver.server"),
    ],
)
def test_bad_settings_name_their_path(resolver: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"resolver": resolver})
    assert caught.value.path == path
