"""``tether serve``: run a gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tether.config import Config, load_config
from tether.endpoint import parse_endpoint
from tether.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run a gateway", description="Run a tether gateway.")
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="listen on HOST:PORT or unix:/path (repeatable; overrides gateway.listen)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from tether.gateway.server import serve

    setup_logging(args.verbose)
    try:
        config = load_config(args.config)
        if args.listen:
            endpoints = []
            for i, text in enumerate(args.listen):
                try:
                    endpoints.append(parse_endpoint(text))
                except ValueError as exc:
                    raise ConfigError(f"--listen[{i}]", str(exc)) from exc
            config = config.with_listen(tuple(endpoints))
    except ConfigError as exc:
        print(f"tether serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    if config.audit_log:
        from tether.gateway import audit

        audit.open_file(config.audit_log)
    if not config.apps:
        logging.getLogger("tether.gateway").warning(
            "no [apps.NAME] in the config: no app can authenticate"
        )
    listen = config.listen

    def reload() -> Config:
        return load_config(args.config).with_listen(listen)

    return serve(config, reload if args.config else None)
