"""admit(): the one admission step, as values (tether.gateway.core.admission).

A core with the static resolver table and a fake clock: nothing here opens
a socket or sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import tomllib
from collections.abc import Sequence

import pytest
from support import FakeClock

from tether.config import parse_config
from tether.gateway.core.errors import Refusal
from tether.gateway.core.gateway import GatewayCore
from tether.policy import Transport
from tether.wire import pb

CONFIG = """
[resolver]
mode = "static"

[resolver.hosts]
"dual.test" = ["127.0.0.1", "::1"]
"v4only.test" = ["127.0.0.1"]

[policy]
allow = ["127.0.0.0/8:*", "[::1]:*"]

[apps.a]
key = "key-a"
"""

UNSPEC, INET, INET6 = socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6


@pytest.fixture
def core() -> GatewayCore:
    return GatewayCore(parse_config(tomllib.loads(CONFIG)), clock=FakeClock())


def admit(core: GatewayCore, host: str, port: int, family: int = UNSPEC,
          transport: Transport = Transport.TCP) -> object:
    return asyncio.run(core.admit("a", host, port, transport, family))


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.audit"]


REFUSALS = [
    # (host, port, family, transport, code, errno, message, rule, reason, audit outcome)
    ("10.0.0.1", 80, UNSPEC, Transport.TCP, pb.Error.PERMISSION_DENIED, errno.EACCES,
     "tether: connection to 10.0.0.1:80 denied for app 'a': 10.0.0.0/8 is private-use "
     "(RFC 1918) (rule: deny 10.0.0.0/8)",
     "deny 10.0.0.0/8", "10.0.0.0/8 is private-use (RFC 1918)", "denied"),
    ("127.0.0.1", 25, UNSPEC, Transport.TCP, pb.Error.PERMISSION_DENIED, errno.EACCES,
     "tether: connection to 127.0.0.1:25 denied for app 'a': port 25 (SMTP) is denied; "
     "use authenticated submission on port 587 (rule: deny port 25)",
     "deny port 25", "port 25 (SMTP) is denied; use authenticated submission on port 587",
     "denied"),
    ("10.0.0.1", 53, INET, Transport.UDP, pb.Error.PERMISSION_DENIED, errno.EACCES,
     "tether: UDP traffic to 10.0.0.1:53 denied for app 'a': 10.0.0.0/8 is private-use "
     "(RFC 1918) (rule: deny 10.0.0.0/8)",
     "deny 10.0.0.0/8", "10.0.0.0/8 is private-use (RFC 1918)", "denied"),
    ("v4only.test", 80, INET6, Transport.TCP, pb.Error.SYSTEM, errno.EAFNOSUPPORT,
     "tether: v4only.test has no IPv6 address the policy allows", "", "", "no IPv6 address"),
    ("::1", 80, INET, Transport.UDP, pb.Error.SYSTEM, errno.EAFNOSUPPORT,
     "tether: ::1 has no IPv4 address the policy allows", "", "", "no IPv4 address"),
    ("nowhere.test", 80, UNSPEC, Transport.TCP, pb.Error.GAI, socket.EAI_NONAME,
     "Name or service not known", "", "", None),
]


@pytest.mark.parametrize(
    ("host", "port", "family", "transport", "code", "err", "message", "rule", "reason", "outcome"),
    REFUSALS,
    ids=[f"{r[0]}:{r[1]}/{r[3].value}/{r[9]}" for r in REFUSALS],
)
def test_refusals(
    core: GatewayCore, caplog: pytest.LogCaptureFixture, host: str, port: int, family: int,
    transport: Transport, code: int, err: int, message: str, rule: str, reason: str,
    outcome: str | None,
) -> None:
    caplog.set_level("INFO", logger="tether.audit")
    refusal = admit(core, host, port, family, transport)
    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.errno, refusal.message) == (code, err, message)
    assert (refusal.rule, refusal.reason) == (rule, reason)
    lines = audit_lines(caplog)
    if outcome is None:
        assert lines == []  # no decision was made: a name that does not resolve
    else:
        assert [(line["outcome"], line["host"], line["port"]) for line in lines] == [
            (outcome, host, port)
        ]
    # Only a policy denial counts against the app.
    denied = 1 if code == pb.Error.PERMISSION_DENIED else 0
    assert core.registry.app_usage("a").connects_denied == denied


ADMITTED = [
    ("127.0.0.1", UNSPEC, ["127.0.0.1"]),
    ("127.0.0.1", INET, ["127.0.0.1"]),
    ("dual.test", UNSPEC, ["127.0.0.1", "::1"]),
    ("dual.test", INET, ["127.0.0.1"]),
    ("dual.test", INET6, ["::1"]),
]


@pytest.mark.parametrize(("host", "family", "addresses"), ADMITTED)
def test_admitted(
    core: GatewayCore, caplog: pytest.LogCaptureFixture, host: str, family: int,
    addresses: Sequence[str],
) -> None:
    caplog.set_level("INFO", logger="tether.audit")
    admitted = admit(core, host, 80, family)
    assert isinstance(admitted, tuple)
    decision, got = admitted
    assert decision.allowed and (decision.app, decision.host, decision.port) == ("a", host, 80)
    assert list(got) == addresses
    # An admitted decision is logged by whoever dials it, with the outcome.
    assert audit_lines(caplog) == []
    assert core.registry.app_usage("a").connects_denied == 0
