"""``tether`` command line: serve, run, check, sockets, usage, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tether import __version__


def build_parser() -> argparse.ArgumentParser:
    from tether.cli import check, demo, run, serve, sockets, usage

    parser = argparse.ArgumentParser(
        prog="tether",
        description="Real outbound sockets for programs with no network of their own.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.register(sub)
    run.register(sub)
    check.register(sub)
    sockets.register(sub)
    usage.register(sub)
    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
