"""``tether demo``: a self-contained demonstration on loopback only."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a self-contained demo (local servers, a gateway, loopback only)",
        description=(
            "Start local SMTP/HTTP/HTTPS servers and a gateway on 127.0.0.1, send a mail "
            "and fetch pages through tether, and show two denials. Nothing leaves this "
            "machine. Exit status 0 if every step behaved as expected, else 1."
        ),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also print the gateway's log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the demo's modules are only needed when it runs.
    from tether.demo.run import run_demo

    return run_demo(verbose=bool(getattr(args, "verbose", False)))
