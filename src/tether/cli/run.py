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

from tether.client.settings import (
    ENV_APP,
    ENV_GATEWAY,
    ENV_KEY,
    ENV_KEY_FILE,
    KeyFileError,
    choose_key,
)
from tether.errors import ConfigError

if TYPE_CHECKING:
    from tether.devmode import GatewayProcess

ENV_AUTOINSTALL = "TETHER_AUTOINSTALL"
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
        proc = subprocess.Popen(cmd, env=child_env(gateway, app, key))
    except OSError as exc:
        print(f"tether run: cannot start {cmd[0]!r}: {exc}", file=sys.stderr)
        if dev is not None:
            dev.stop()
        return 127

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if dev is not None:
            dev.stop()
    return status if status >= 0 else 128 - status


def _run_isolated(
    cmd: list[str], gateway: str, app: str, key: str, dev: GatewayProcess | None
) -> int:
    """``--isolate``: the command in its own network namespace (tether.isolate)."""
    from tether.client.settings import Settings
    from tether.endpoint import parse_endpoint
    from tether.isolate.launch import run_isolated

    try:
        settings = Settings(gateway=parse_endpoint(gateway), app=app, key=key)
        return run_isolated(cmd, child_env(gateway, app, key), settings)
    except ValueError as exc:
        print(f"tether run: {exc}", file=sys.stderr)
        return 2
    finally:
        if dev is not None:
            dev.stop()
