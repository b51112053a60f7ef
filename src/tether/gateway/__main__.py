"""``python -m tether.gateway [--config FILE] [--listen ADDR ...]`` = ``tether serve``."""

from __future__ import annotations

import argparse
import sys

from tether.cli import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.gateway")
    sub = parser.add_subparsers(dest="command")
    serve.register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
