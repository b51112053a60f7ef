"""``tether sockets``: the live sockets of a running gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tether.cli.run import add_key_options, command_line_key_warning, key_from_args
from tether.client.control import ControlChannel
from tether.client.settings import ENV_APP, ENV_GATEWAY, KeyFileError, Settings, choose_key
from tether.endpoint import host_port, parse_endpoint
from tether.gateway.core.auth import ADMIN_APP
from tether.wire import pb
from tether.wire.convert import address_from_wire


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sockets",
        help="list a gateway's live sockets",
        description="List live sockets: an app sees its own; the admin key sees all.",
    )
    p.add_argument("--gateway", metavar="ADDR", help=f"HOST:PORT or unix:/path ({ENV_GATEWAY})")
    p.add_argument("--app", help=f"app name ({ENV_APP})")
    add_key_options(p)
    p.add_argument("--admin-key-file", metavar="PATH",
                   help="file holding the gateway's [gateway] admin_key: list every app")
    p.add_argument("--admin-key", help="the admin key itself (visible to other local users in "
                   "ps, prefer --admin-key-file; one that starts with '-' as --admin-key=KEY)")
    p.add_argument("--json", action="store_true", help="one JSON object per socket")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gateway = args.gateway or os.environ.get(ENV_GATEWAY)
    if not gateway:
        print("tether sockets: give --gateway or set TETHER_GATEWAY", file=sys.stderr)
        return 2
    try:
        if args.admin_key is not None or args.admin_key_file is not None:
            if args.admin_key is not None:
                print(command_line_key_warning("tether sockets", "--admin-key"), file=sys.stderr)
            app = ADMIN_APP
            key = choose_key(args.admin_key, args.admin_key_file, {})
        else:
            app = args.app or os.environ.get(ENV_APP, "")
            key = key_from_args(args, "tether sockets")
    except (KeyFileError, ValueError) as exc:
        print(f"tether sockets: {exc}", file=sys.stderr)
        return 2
    try:
        settings = Settings(gateway=parse_endpoint(gateway), app=app, key=key)
    except ValueError as exc:
        print(f"tether sockets: {exc}", file=sys.stderr)
        return 2
    channel = ControlChannel(settings)
    try:
        response = channel.request(pb.Request(list_sockets=pb.ListSockets()))
    except OSError as exc:
        print(f"tether sockets: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    rows = []
    for info in response.sockets.sockets:
        host, port = address_from_wire(info.peer)[:2]
        rows.append(
            {
                "app": info.app,
                "descriptor": info.descriptor_prefix,
                "peer": host_port(host, port),
                "state": info.state,
                "bytes_out": info.bytes_out,
                "bytes_in": info.bytes_in,
                "idle_s": round(info.idle_seconds, 1),
                "age_s": round(info.age_seconds, 1),
                **({"node": info.node} if info.node else {}),  # a cluster's: which node holds it
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header: tuple[str, ...] = ("APP", "DESCRIPTOR", "PEER", "STATE", "OUT", "IN", "IDLE", "AGE")
    table: list[tuple[str, ...]] = [header] + [
        (
            str(r["app"]),
            f"{r['descriptor']}...",
            str(r["peer"]),
            str(r["state"]),
            str(r["bytes_out"]),
            str(r["bytes_in"]),
            f"{r['idle_s']}s",
            f"{r['age_s']}s",
        )
        for r in rows
    ]
    if any("node" in r for r in rows):
        table = [(*line, "NODE" if i == 0 else str(rows[i - 1].get("node", "")))
                 for i, line in enumerate(table)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no live sockets)")
    return 0
