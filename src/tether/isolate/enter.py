"""The helper that becomes the command: ``python -m tether.isolate.enter FD``.

``tether run --isolate`` starts it with one end of a socket pair as FD and
sends it, as one length-prefixed JSON message, the command, its
environment and the resolv.conf to bind. The helper (single-threaded, so
the kernel lets it make a user namespace):

1. makes the namespaces (namespace.py), brings ``lo`` up, routes every
   address to it and loads the nftables ruleset (rules.py);
2. binds /etc/resolv.conf (``nameserver 127.0.0.1``) in its mount namespace;
3. creates, inside the namespace, the agent's TCP listeners (127.0.0.1 and
   ::1, port rules.AGENT_PORT) and the DNS responder's UDP socket
   (127.0.0.1:53), and sends them back over the pair (SCM_RIGHTS). The
   agent, in ``tether run``'s own process and network namespace, serves
   them there: sockets keep the namespace they were made in;
4. when it made a user namespace (without root), enters a nested one as
   the user's own uid, so the command keeps no capability over the rules;
5. becomes the command (execvpe), so ``tether run`` waits for it directly.

Any failure is sent back as ``{"error": text, "exit": status}``; ``tether
run`` prints it and exits with that status.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

from tether.isolate import namespace, rules

READY = b"ready"
EXIT_SETUP = 125  # as env(1)/chroot(1): the wrapper failed, not the command
EXIT_NOT_FOUND = 127  # as the shell: the command could not be found
EXIT_NOT_RUNNABLE = 126
_LENGTH = struct.Struct("!I")
MAX_SPEC = 16 * 1024 * 1024  # an environment bigger than this is not an environment


def read_spec(chan: socket.socket) -> dict[str, Any]:
    """The length-prefixed JSON spec from the other end."""
    header = _recv_exact(chan, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    if length > MAX_SPEC:
        raise ValueError(f"spec of {length} bytes is over the {MAX_SPEC}-byte limit")
    spec = json.loads(_recv_exact(chan, length))
    if not isinstance(spec, dict):
        raise TypeError("spec is not a JSON object")
    return spec


def write_spec(chan: socket.socket, spec: dict[str, Any]) -> None:
    body = json.dumps(spec).encode()
    chan.sendall(_LENGTH.pack(len(body)) + body)


def _recv_exact(chan: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = chan.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"the other end closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def make_sockets(agent_port: int, dns_port: int) -> list[socket.socket]:
    """The agent's listeners (IPv4, and IPv6 where the namespace has it) and the DNS socket."""
    made: list[socket.socket] = []
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.bind(("127.0.0.1", agent_port))
    v4.listen(socket.SOMAXCONN)
    made.append(v4)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", dns_port))
    made.append(dns)
    try:
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", agent_port))
    except OSError:
        pass  # no IPv6 in this namespace (disabled): IPv4 only
    else:
        v6.listen(socket.SOMAXCONN)
        made.append(v6)
    return made


def setup(spec: dict[str, Any], uid: int, gid: int) -> tuple[int, list[socket.socket]]:
    """Steps 1-3: the unshare flags used and the sockets; OSError subclasses say what failed."""
    agent_port = int(spec.get("agent_port", rules.AGENT_PORT))
    wanted = spec.get("user_namespace")
    flags = namespace.enter_namespaces(
        uid=uid, gid=gid, user_namespace=None if wanted is None else bool(wanted)
    )
    namespace.private_mounts()
    namespace.network_setup(rules.ruleset(agent_port, rules.DNS_PORT))
    namespace.bind_resolv_conf(str(spec["resolv_conf"]))
    try:
        return flags, make_sockets(agent_port, rules.DNS_PORT)
    except OSError as exc:
        raise namespace.IsolateSetupError(
            exc.errno or 0,
            f"tether run --isolate: cannot open the agent's sockets in the namespace "
            f"(127.0.0.1:{agent_port}, udp 127.0.0.1:{rules.DNS_PORT}): {exc.strerror or exc}",
        ) from exc


def fail(chan: socket.socket, text: str, status: int) -> int:
    try:
        write_spec(chan, {"error": text, "exit": status})
    except OSError:
        print(text, file=sys.stderr)  # the other end is gone: say it here
    return status


def main(argv: list[str]) -> int:
    chan = socket.socket(fileno=int(argv[0]))
    uid, gid = os.getuid(), os.getgid()
    try:
        spec = read_spec(chan)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        print(f"tether run --isolate: no spec from tether run: {exc}", file=sys.stderr)
        return EXIT_SETUP
    try:
        flags, made = setup(spec, uid, gid)
    except OSError as exc:
        return fail(chan, str(exc.strerror or exc), EXIT_SETUP)
    cmd: list[str] = [str(a) for a in spec["argv"]]
    env: dict[str, str] = {str(k): str(v) for k, v in spec["env"].items()}
    try:
        if flags & namespace.CLONE_NEWUSER:
            namespace.drop_to_user(uid, gid)
    except OSError as exc:
        return fail(chan, str(exc.strerror or exc), EXIT_SETUP)
    socket.send_fds(chan, [READY], [s.fileno() for s in made])
    for s in made:
        s.close()  # the agent holds them now; the command must not inherit them
    chan.close()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        # The pair is closed: this goes to the command's own stderr, as the shell's would.
        print(f"tether run: cannot start {cmd[0]!r}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_RUNNABLE
    return EXIT_SETUP  # not reached: execvpe returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
