"""``tether check``: printing, exit codes, resolver choice. Nothing connects and
no name goes to DNS (static tables, --resolve, or a patched getaddrinfo)."""

from __future__ import annotations

import argparse
import io
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tether.cli import check
from tether.policy import Decider, PolicySet, parse_policy
from tether.resolver import StaticResolver

PUBLIC = "93.184.216.34"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tether")
    sub = parser.add_subparsers(dest="command", required=True)
    check.register(sub)
    return parser.parse_args(["check", *argv])


def run_helper(
    decider: Decider, *argv: str, resolver: StaticResolver | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = check.decide_and_print(decider, parse(*argv), out, resolver=resolver, err=err)
    return status, out.getvalue(), err.getvalue()


def test_register_adds_check_with_run() -> None:
    args = parse("example.test", "443")
    assert args.func is check.run
    assert (args.host, args.port, args.udp, args.app, args.config, args.resolve) == (
        "example.test",
        443,
        False,
        "",
        None,
        [],
    )
    args = parse(
        "h",
        "53",
        "--udp",
        "--app",
        "billing",
        "--config",
        "t.toml",
        "--resolve",
        "h=10.0.0.1",
        "--resolve",
        "h=10.0.0.2,::1",
    )
    assert args.udp and args.app == "billing" and args.config == Path("t.toml")
    assert args.resolve == ["h=10.0.0.1", "h=10.0.0.2,::1"]


@pytest.mark.parametrize("port", ["http", "70000", "-1"])
def test_bad_port_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("h", port)
    assert info.value.code == 2
    assert "port" in capsys.readouterr().err


def test_denied_literal_prints_and_exits_1() -> None:
    status, out, err = run_helper(Decider(PolicySet()), "10.1.2.3", "80")
    assert status == 1
    assert err == ""
    assert out.splitlines() == [
        "deny: tcp 10.1.2.3:80",
        "  reason: 10.0.0.0/8 is private-use (RFC 1918)",
        "  rule:   deny 10.0.0.0/8",
        "  mode:   enforce",
        "  candidates:",
        "    deny  10.1.2.3  10.0.0.0/8 is private-use (RFC 1918) (rule: deny 10.0.0.0/8)",
    ]


def test_allowed_name_lists_candidates_and_exits_0() -> None:
    d = Decider(parse_policy({"allow": ["*.example.com:443"]}))
    status, out, _ = run_helper(
        d,
        "api.example.com",
        "443",
        "--app",
        "demo",
        "--resolve",
        f"api.example.com=10.0.0.1,{PUBLIC}",
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "allow: tcp api.example.com:443 for app 'demo'"
    assert lines[2] == "  rule:   allow *.example.com:443"
    assert lines[5].startswith("    deny  10.0.0.1       10.0.0.0/8 is private-use")
    assert lines[6].startswith(f"    allow {PUBLIC}  ")
    assert lines[-1] == f"  connect to: {PUBLIC}"


def test_report_mode_exits_0_and_says_so() -> None:
    d = Decider(parse_policy({"mode": "report"}))
    status, out, _ = run_helper(d, "0x7f.1", "80", "--udp")
    assert status == 0
    assert out.splitlines()[0] == (
        "allow (report mode; enforce mode would deny): udp 0x7f.1:80 (read as 127.0.0.1)"
    )


def test_name_without_resolve_is_refused() -> None:
    status, out, err = run_helper(Decider(PolicySet()), "unknown.test", "443")
    assert status == 2
    assert out == ""
    assert "pass --resolve unknown.test=ADDR" in err


def test_pre_lookup_denial_needs_no_resolve() -> None:
    status, out, _ = run_helper(Decider(PolicySet()), "metadata.google.internal", "80")
    assert status == 1
    assert "rule:   deny metadata.google.internal" in out
    status, out, _ = run_helper(Decider(PolicySet()), "mail.test", "25")
    assert status == 1
    assert "deny port 25" in out


@pytest.mark.parametrize("value", ["noequals", "=1.2.3.4", "a=", "a=not-an-ip", "a=1.2.3.4,"])
def test_bad_resolve_option(value: str) -> None:
    status, _, err = run_helper(Decider(PolicySet()), "a", "80", "--resolve", value)
    assert status == 2
    assert "--resolve" in err


def test_parse_resolve_merges_repeats() -> None:
    assert check.parse_resolve(["a=1.1.1.1", "a=::1, 8.8.8.8", "b=10.0.0.1"]) == {
        "a": ["1.1.1.1", "::1", "8.8.8.8"],
        "b": ["10.0.0.1"],
    }


# --- run() with a config file (tether.config) --------------------------------------------


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tether.toml"
    path.write_text(textwrap.dedent(body))
    return path


CONFIG = """\
    [gateway]
    listen = ["127.0.0.1:9000"]

    [resolver]
    mode = "static"

    [resolver.hosts]
    "db.test" = ["10.1.2.3"]
    "www.test" = ["93.184.216.34"]

    [policy]
    allow = ["127.0.0.0/8:*"]

    [apps.billing]
    key = "k"

    [apps.billing.policy]
    allow = ["db.test:5432", "10.1.0.0/16:5432"]
    """


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, CONFIG)


def run_cli(*argv: str) -> int:
    args = parse(*argv)
    status: int = args.func(args)
    return status


def test_run_uses_the_config_policy_and_hosts(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("db.test", "5432", "--app", "billing", "--config", str(config_path)) == 0
    assert run_cli("db.test", "5432", "--app", "other", "--config", str(config_path)) == 1
    assert run_cli("www.test", "443", "--config", str(config_path)) == 0
    out = capsys.readouterr().out
    assert "allow: tcp db.test:5432 for app 'billing'" in out
    assert "connect to: 10.1.2.3" in out


def test_run_denies_the_gateways_own_address(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("127.0.0.1", "9000", "--config", str(config_path)) == 1
    assert "deny self 127.0.0.1:9000" in capsys.readouterr().out
    assert run_cli("127.0.0.1", "9001", "--config", str(config_path)) == 0


def test_run_resolve_overrides_the_hosts_table(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("www.test", "443", "--config", str(config_path), "--resolve", "www.test=10.9.9.9")
    assert run_cli(*argv) == 1
    assert "deny 10.0.0.0/8" in capsys.readouterr().out


def test_run_static_mode_refuses_unknown_names(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("nowhere.test", "443", "--config", str(config_path)) == 2
    assert "--resolve nowhere.test=" in capsys.readouterr().err


def test_run_config_error_is_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, '[policy]\nallow = ["ok.test", "10.0.0.1/8"]\n')
    assert run_cli("x", "80", "--config", str(path)) == 2
    err = capsys.readouterr().err
    assert "policy.allow[1]" in err
    assert "did you mean 10.0.0.0/8?" in err
    assert "Traceback" not in err
    assert run_cli("x", "80", "--config", str(tmp_path / "missing.toml")) == 2


def test_run_system_mode_uses_the_hosts_table_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        # Stands in for the C library so no query leaves the machine.
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.5.5.5", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    path = write_config(
        tmp_path, '[resolver]\nmode = "system"\n[resolver.hosts]\n"www.test" = ["1.1.1.1"]\n'
    )
    assert run_cli("www.test", "443", "--config", str(path)) == 0
    assert asked == []
    assert run_cli("elsewhere.test", "443", "--config", str(path)) == 1
    assert asked == ["elsewhere.test"]
    assert "deny 10.0.0.0/8" in capsys.readouterr().out


def test_run_upstream_mode_asks_the_configured_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether check` resolves as the gateway would: here, a loopback DNS server."""
    from dnsserver import DNSServer

    with DNSServer() as srv:
        srv.add_host("db.up.test", "10.20.30.40")
        srv.add_host("www.up.test", "93.184.216.34")
        path = write_config(
            tmp_path,
            f'[resolver]\nmode = "upstream"\nservers = ["{srv.address}"]\n'
            "timeout = 1\nattempts = 1\n",
        )
        assert run_cli("db.up.test", "5432", "--config", str(path)) == 1
        assert run_cli("www.up.test", "443", "--config", str(path)) == 0
        assert run_cli("missing.up.test", "443", "--config", str(path)) == 2
        assert srv.count("db.up.test", "A") >= 1
    out = capsys.readouterr().out
    assert "10.20.30.40" in out and "deny 10.0.0.0/8" in out
    assert "connect to: 93.184.216.34" in out
