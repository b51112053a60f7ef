"""``tether serve``: run a gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from tether.config import Config, check_listen, load_config
from tether.endpoint import Endpoint, parse_endpoint
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
    # Development mode turns the proxy front-ends on (ephemeral ports) this way.
    p.add_argument("--http-proxy-listen", action="append", metavar="ADDR",
                   help="HTTP proxy front-end on HOST:PORT or unix:/path (repeatable; "
                   "overrides gateway.http_proxy_listen)")
    p.add_argument("--socks5-listen", action="append", metavar="ADDR",
                   help="SOCKS5 front-end on HOST:PORT or unix:/path (repeatable; "
                   "overrides gateway.socks5_listen)")
    p.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help="run N gateway processes sharing the listeners, under a supervisor that "
        "restarts them (overrides gateway.workers; default 1: one process)",
    )
    # Internal: what the supervisor tells a worker (gateway/supervisor.py).
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def _endpoints(option: str, texts: list[str]) -> tuple[Endpoint, ...]:
    endpoints = []
    for i, text in enumerate(texts):
        try:
            endpoints.append(parse_endpoint(text))
        except ValueError as exc:
            raise ConfigError(f"{option}[{i}]", str(exc)) from exc
    return tuple(endpoints)


def _worker_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 1 or more")
    return int(text)


def setup_logging(verbose: bool = False, node: str = "") -> None:
    # A worker's lines name its node: its siblings write to the same stderr.
    tag = f"[{node}]" if node else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from tether.gateway import supervisor
    from tether.gateway.server import serve

    worker = (
        supervisor.WorkerSpec.from_json(args.worker_spec) if args.worker_spec else None
    )
    setup_logging(args.verbose, worker.node_id if worker is not None else "")
    try:
        config = load_config(args.config)
        if args.listen:
            config = config.with_listen(_endpoints("--listen", args.listen))
        if args.http_proxy_listen:
            config = dataclasses.replace(config, http_proxy_listen=_endpoints(
                "--http-proxy-listen", args.http_proxy_listen
            ))
        if args.socks5_listen:
            config = dataclasses.replace(
                config, socks5_listen=_endpoints("--socks5-listen", args.socks5_listen)
            )
    except ConfigError as exc:
        print(f"tether serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or config.workers
    if worker is None and workers > 1:
        try:
            check_listen(config)
        except ConfigError as exc:
            print(f"tether serve: refusing to listen: {exc}", file=sys.stderr)
            return 2
        return supervisor.supervise(config, workers, args)
    if config.audit_log:
        from tether.gateway import audit

        audit.open_file(config.audit_log)
    if not config.apps:
        logging.getLogger("tether.gateway").warning(
            "no [apps.NAME] in the config: no app can authenticate"
        )
    listen = config.listen
    # A worker enforces its share of the limits (supervisor.worker_config).
    def for_worker(config: Config) -> Config:
        return config if worker is None else supervisor.worker_config(config, worker)

    def reload() -> Config:
        return for_worker(load_config(args.config).with_listen(listen))

    return serve(for_worker(config), reload if args.config else None, worker)
