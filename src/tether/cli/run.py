"""``tether run``: run a command with tether installed in every Python it starts.

The command's environment gets ``TETHER_AUTOINSTALL=1`` and a PYTHONPATH
entry holding tether's ``sitecustomize`` hook, which calls
:func:`tether.install` at interpreter start-up (App Engine's
``GAE_USE_SOCKETS_HTTPLIB`` switch, generalised). With no gateway given or
in ``TETHER_GATEWAY``, a development gateway runs inside this process for
the command's lifetime.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from tether.client.exchange import Exchange
from tether.client.settings import (
    ENV_APP,
    ENV_GATEWAY,
    ENV_KEY,
    ENV_KEY_FILE,
    KeyFileError,
    Settings,
    choose_key,
)
from tether.client.stream import Deadline, open_stream, roundtrip
from tether.endpoint import parse_endpoint
from tether.errors import ConfigError
from tether.wire import pb

if TYPE_CHECKING:
    from tether.devmode import GatewayProcess

ENV_AUTOINSTALL = "TETHER_AUTOINSTALL"
# The proxy URLs `tether run` gave the command (no credentials), for the boot hook.
ENV_PROXIES = "TETHER_PROXIES"
# Asking the gateway which proxies it offers is one round trip on loopback or
# a Unix socket; the development gateway answers within milliseconds of its
# "listening on" line. 5 s: the hello deadline the gateway itself allows
# (config.DEFAULT_HANDSHAKE_TIMEOUT).
PROBE_TIMEOUT = 5.0
BOOT_DIR = Path(__file__).resolve().parent.parent / "_boot"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command through tether",
        description="Run CMD with tether installed in every Python process it starts.",
    )
    p.add_argument("--gateway", metavar="ADDR", help="gateway HOST:PORT or unix:/path")
    p.add_argument("--app", help="app name (default: TETHER_APP)")
    add_key_options(p)
    p.add_argument("--config", type=Path, help="config for development mode (./tether.toml)")
    p.add_argument("--isolate", action="store_true",
                   help="run CMD in a network namespace with no way out but the gateway: every "
                   "program's TCP and DNS go through it transparently (docs/any-program.md)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)


def add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", metavar="PATH",
                   help=f"file holding the app key ({ENV_KEY_FILE}); the key is then on no "
                   "command line")
    p.add_argument("--key", help=f"app key ({ENV_KEY}); visible to other local users in ps, "
                   "prefer --key-file; one that starts with '-' as --key=KEY")


def command_line_key_warning(prog: str, option: str) -> str:
    return (
        f"{prog}: warning: {option} puts the key on the command line, where other local users "
        f"can read it (ps, /proc/PID/cmdline); give it with --key-file PATH, {ENV_KEY_FILE} or "
        f"{ENV_KEY} instead"
    )


def key_from_args(args: argparse.Namespace, prog: str) -> str:
    """The key from --key (with a warning on stderr), --key-file or the environment.

    Raises KeyFileError (naming the path) or ValueError (both options given).
    """
    if args.key is not None:
        print(command_line_key_warning(prog, "--key"), file=sys.stderr)
    return choose_key(args.key, args.key_file, os.environ)


def child_env(gateway: str, app: str, key: str) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_GATEWAY] = gateway
    env[ENV_APP] = app
    env[ENV_KEY] = key
    env[ENV_AUTOINSTALL] = "1"
    paths = [str(BOOT_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def with_proxies(env: dict[str, str], app: str, key: str) -> dict[str, str]:
    """`env` with the proxy variables for the gateway's proxy front-ends, if it offers any.

    Programs that are not Python (curl, git, wget, node with a proxy agent)
    then go through the gateway unmodified: HTTP_PROXY and HTTPS_PROXY name
    the HTTP proxy, ALL_PROXY the SOCKS5 one (socks5h: names resolved at the
    gateway) or else the HTTP one; lower-case too (curl reads only
    http_proxy). NO_PROXY is removed: a loopback service is reached through
    the gateway too, so the policy and the meter see it. The gateway says
    what it offers in its ServerHello (one hello, asked here); if it cannot
    be asked, the command runs without them and this says why. Python
    processes keep the native path (the boot hook makes urllib's
    getproxies() leave these out: TETHER_PROXIES lists them).
    """
    try:
        settings = Settings(gateway=parse_endpoint(env[ENV_GATEWAY]), app=app, key=key)
        http, socks5 = offered_proxies(settings)
    except (OSError, ValueError) as exc:
        print(f"tether run: warning: no proxy variables for the command: asking the gateway "
              f"{env[ENV_GATEWAY]} which proxies it offers failed: {exc}", file=sys.stderr)
        return env
    if not http and not socks5:
        return env
    values = {}
    if http:
        values["http_proxy"] = values["https_proxy"] = _with_credentials(http, app, key)
    values["all_proxy"] = _with_credentials(socks5 or http, app, key)
    for name, value in values.items():
        env[name] = env[name.upper()] = value
    for name in ("NO_PROXY", "no_proxy"):
        env.pop(name, None)
    env[ENV_PROXIES] = " ".join(filter(None, (http, socks5)))
    return env


def offered_proxies(settings: Settings, timeout: float = PROBE_TIMEOUT) -> tuple[str, str]:
    """The (HTTP, SOCKS5) proxy URLs the gateway offers `settings`' app ("" if not offered).

    Raises the client's OSError for a gateway that cannot be reached or
    refuses the app's hello.
    """
    deadline = Deadline(timeout)
    sock = open_stream(settings, deadline)
    try:
        exchange = Exchange(settings.gateway)
        answer = roundtrip(sock, exchange, exchange.open(settings), deadline)
    finally:
        sock.close()
    assert isinstance(answer, pb.ServerHello)
    return answer.http_proxy, answer.socks5_proxy


def _with_credentials(url: str, app: str, key: str) -> str:
    """``scheme://APP:KEY@host:port``, both percent-encoded (a key may hold ':' or '@')."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{quote(app, safe='')}:{quote(key, safe='')}@{rest}"


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("tether run: give a command after --", file=sys.stderr)
        return 2
    gateway = args.gateway or os.environ.get(ENV_GATEWAY)
    dev = None
    if gateway:
        app = args.app or os.environ.get(ENV_APP, "")
        try:
            key = key_from_args(args, "tether run")
        except (KeyFileError, ValueError) as exc:
            print(f"tether run: {exc}", file=sys.stderr)
            return 2
    else:
        from tether.devmode import start_dev_gateway

        try:
            dev, settings = start_dev_gateway(args.config)
        except ConfigError as exc:
            print(f"tether run: bad configuration: {exc}", file=sys.stderr)
            return 2
        gateway, app, key = str(settings.gateway), settings.app, settings.key
        print(f"tether: development gateway on {gateway} (app '{app}')", file=sys.stderr)
    if args.isolate:
        return _run_isolated(cmd, gateway, app, key, dev)
    try:
        proc = subprocess.Popen(cmd, env=with_proxies(child_env(gateway, app, key), app, key))
    except OSError as exc:
        print(f"tether run: cannot start {cmd[0]!r}: {exc}", file=sys.stderr)
        if dev is not None:
            dev.stop()
        return 127
    try:
        return wait_forwarding(proc)
    finally:
        if dev is not None:
            dev.stop()


def wait_forwarding(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the command, passing SIGINT/SIGTERM on to it; its exit status as a shell's."""

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return status if status >= 0 else 128 - status


def _run_isolated(
    cmd: list[str], gateway: str, app: str, key: str, dev: GatewayProcess | None
) -> int:
    """``--isolate``: the command in its own network namespace (tether.isolate)."""
    from tether.client.settings import Settings
    from tether.endpoint import parse_endpoint
    from tether.isolate.launch import Isolated, IsolateError

    isolated = None
    try:
        settings = Settings(gateway=parse_endpoint(gateway), app=app, key=key)
        isolated = Isolated(cmd, child_env(gateway, app, key), settings)
        return wait_forwarding(isolated.start())
    except ValueError as exc:
        print(f"tether run: {exc}", file=sys.stderr)
        return 2
    except IsolateError as exc:
        print(exc, file=sys.stderr)
        return exc.status
    finally:
        if isolated is not None:
            isolated.stop()
        if dev is not None:
            dev.stop()
