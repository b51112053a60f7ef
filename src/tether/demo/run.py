"""``tether demo``: a self-contained tour of tether, on loopback only.

It starts local SMTP (STARTTLS), HTTP and HTTPS servers, writes a gateway
config that allows exactly their ports on 127.0.0.1 (and resolves
``mail.test`` / ``www.test`` from a static table, so no DNS server is ever
asked), runs a real ``tether serve`` subprocess, calls :func:`tether.install`
and then uses unmodified smtplib, http.client and requests through it, asks
a loopback DNS server with dnspython over a tether UDP socket, and hands a
live connection to another process with pickle. It also shows two denials:
a private address judged by the policy decider alone (nothing is connected
to) and port 25 refused by the gateway.
"""

from __future__ import annotations

import email.message
import http.client
import os
import pickle
import secrets
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import tether
from tether.devmode import GatewayProcess

if TYPE_CHECKING:
    # Only for annotations: servers needs the demo extra, which run_demo checks first.
    from tether.demo.servers import SMTPServer

APP = "demo"
# Every client operation gets this long; all of it is loopback.
TIMEOUT = 5.0
GATEWAY_START_TIMEOUT = 15.0
GATEWAY_STOP_TIMEOUT = 5.0
# The destination for the decider-only denial: private-use (RFC 1918).
PRIVATE_HOST, PRIVATE_PORT = "10.1.2.3", 80
MAIL_FROM = "demo@mail.test"
MAIL_TO = "friend@mail.test"
SUBJECT = "Hello through tether"

@dataclass(frozen=True)
class Step:
    """One demo step's outcome."""

    name: str
    ok: bool
    detail: str


def gateway_config(key: str, ports: list[int]) -> str:
    """The demo gateway's TOML: loopback listener, static names, exactly `ports`."""
    allow = ", ".join(f'"127.0.0.1:{port}"' for port in ports)
    return textwrap.dedent(
        f"""\
        # Written by `tether demo`; removed when it ends.
        [gateway]
        listen = ["127.0.0.1:0"]

        [resolver]
        mode = "static"  # names come from the table below; DNS is never asked

        [resolver.hosts]
        "mail.test" = ["127.0.0.1"]
        "www.test" = ["127.0.0.1"]

        [policy]
        allow = [{allow}]

        [apps.{APP}]
        key = "{key}"
        """
    )


class _Symbols:
    def __init__(self, out: TextIO) -> None:
        encoding = getattr(out, "encoding", None) or "ascii"
        try:
            "✓✗".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            self.ok, self.fail = "OK  ", "FAIL"
        else:
            self.ok, self.fail = "✓", "✗"


def run_demo(out: TextIO | None = None, *, verbose: bool = False) -> int:
    """Run the demo, printing one line per step; 0 if every step behaved as expected."""
    out = out or sys.stdout
    if tether.installed():
        print(
            "tether demo: tether is already installed in this process; run the demo on its own",
            file=out,
        )
        return 1
    try:
        import requests  # noqa: F401 - checked here to give a clear message

        from tether.demo import servers
    except ImportError as exc:
        print(
            f"tether demo: needs the demo extra ({exc.name} is missing): "
            "pip install 'tether[demo]'",
            file=out,
        )
        return 1
    symbols = _Symbols(out)
    started = time.monotonic()
    steps: list[Step] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tether-demo-")))
        ca, server_context = servers.make_ca()
        ca_file = servers.write_ca_file(ca, tmp / "demo-ca.pem")
        smtp = stack.enter_context(servers.SMTPServer(server_context))
        web = stack.enter_context(servers.HTTPServer())
        secure = stack.enter_context(servers.HTTPServer(server_context))
        from tether.demo.dns import DNSServer

        names = stack.enter_context(DNSServer({"www.test": "127.0.0.1"}))

        key = secrets.token_urlsafe(24)
        config_path = tmp / "tether.toml"
        config_path.write_text(
            gateway_config(key, [smtp.port, web.port, secure.port, names.port])
        )
        gateway = GatewayProcess(config_path, listen="127.0.0.1:0")
        stopped: list[int | None] = []
        stack.callback(lambda: stopped.append(gateway.stop(GATEWAY_STOP_TIMEOUT)))
        try:
            address = gateway.start(GATEWAY_START_TIMEOUT)
        except RuntimeError as exc:
            print(f"{symbols.fail} tether demo: {exc}", file=out)
            return 1
        print(
            f"tether demo: gateway {address} (app {APP!r}) allows only 127.0.0.1 ports "
            f"{smtp.port} (SMTP), {web.port} (HTTP), {secure.port} (HTTPS), "
            f"{names.port} (DNS); loopback only",
            file=out,
        )

        tether.install(gateway=address, app=APP, key=key)
        stack.callback(tether.uninstall)
        actions: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
            ("smtp", lambda: _smtp_step(smtp, servers.client_context(ca))),
            ("http", lambda: _http_step(web.port, servers.PAGE)),
            ("https", lambda: _https_step(secure.port, ca_file, servers.PAGE)),
            ("udp", lambda: _udp_step(names.port)),
            ("handoff", lambda: _handoff_step(address, key, web.port, servers.PAGE)),
            ("private", lambda: _decider_step(config_path)),
            ("port 25", _port25_step),
        ]
        for name, action in actions:
            try:
                ok, detail = action()
            except Exception as exc:  # one failed step must not hide the others
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            steps.append(Step(name, ok, detail))
            print(f"{symbols.ok if ok else symbols.fail} {name:<8} {detail}", file=out)
        # The exit stack now uninstalls, stops the gateway (SIGINT, wait),
        # stops the servers and removes the temporary files.
    if stopped and stopped[0] != 0:
        steps.append(Step("gateway", False, f"the gateway exited with status {stopped[0]}"))
        print(f"{symbols.fail} {'gateway':<8} {steps[-1].detail}", file=out)
    failed = [step.name for step in steps if not step.ok]
    if verbose or failed:
        print("gateway log:\n" + textwrap.indent(gateway.log_text(), "  "), file=out)
    took = time.monotonic() - started
    if failed:
        print(
            f"tether demo FAILED ({took:.1f}s): {', '.join(failed)} did not behave as expected",
            file=out,
        )
        return 1
    print(f"tether demo passed ({took:.1f}s): all {len(steps)} steps behaved as expected", file=out)
    return 0


def _smtp_step(server: SMTPServer, context: ssl.SSLContext) -> tuple[bool, str]:
    """smtplib to mail.test with STARTTLS, verified against the throwaway CA."""
    before = len(server.messages)
    message = email.message.EmailMessage()
    message["From"] = MAIL_FROM
    message["To"] = MAIL_TO
    message["Subject"] = SUBJECT
    message.set_content("Sent by an unmodified smtplib, through a tether socket.\n")
    with smtplib.SMTP("mail.test", server.port, timeout=TIMEOUT) as client:
        client.starttls(context=context)  # checks the certificate is for mail.test
        sock = client.sock
        version = (sock.version() if isinstance(sock, ssl.SSLSocket) else None) or "no TLS"
        module = type(sock).__module__
        via = "a tether socket" if module.startswith("tether.") else f"a {module} socket"
        client.send_message(message)
    received = server.wait_for_messages(before + 1, TIMEOUT)[before:]
    if not received:
        return False, "smtplib finished but the server received nothing"
    got = received[0]
    ok = (
        got.tls
        and got.mail_from == MAIL_FROM
        and got.rcpt_tos == (MAIL_TO,)
        and f"Subject: {SUBJECT}".encode() in got.content
    )
    return ok, (
        f"mail.test:{server.port} STARTTLS {version}, certificate verified for mail.test "
        f"({via}); server received {SUBJECT!r} from {got.mail_from} "
        f"to {', '.join(got.rcpt_tos)} over {'TLS' if got.tls else 'PLAIN TEXT'}"
    )


def _http_step(port: int, page: bytes) -> tuple[bool, str]:
    """http.client GET from www.test (a name the gateway resolves)."""
    conn = http.client.HTTPConnection("www.test", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        peer = conn.sock.getpeername() if conn.sock is not None else None
    finally:
        conn.close()
    ok = response.status == 200 and body == page
    return ok, (
        f"GET http://www.test:{port}/ -> {response.status} {response.reason}, "
        f"{len(body)} bytes (http.client; peer {peer})"
    )


def _https_step(port: int, ca_file: Path, page: bytes) -> tuple[bool, str]:
    """requests over HTTPS, verifying the server against the throwaway CA."""
    import requests

    with requests.Session() as session:
        # No proxies, .netrc or CA bundle from the environment: this request
        # must go to www.test through tether and nowhere else.
        session.trust_env = False
        response = session.get(f"https://www.test:{port}/", verify=str(ca_file), timeout=TIMEOUT)
        body = response.content
    ok = response.status_code == 200 and body == page
    return ok, (
        f"GET https://www.test:{port}/ -> {response.status_code} {response.reason}, "
        f"{len(body)} bytes (requests, certificate verified against the demo CA)"
    )


def _udp_step(port: int) -> tuple[bool, str]:
    """dnspython's own UDP query, unmodified, through a tether UDP socket."""
    import dns.message
    import dns.query

    query = dns.message.make_query("www.test", "A")
    answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=TIMEOUT)
    addresses = [item.to_text() for rrset in answer.answer for item in rrset]
    return addresses == ["127.0.0.1"], (
        f"dns.query.udp www.test A @127.0.0.1:{port} -> {', '.join(addresses) or 'no answer'} "
        "(one datagram each way through the gateway)"
    )


# The worker: its own credentials from the environment, the socket from stdin.
_WORKER = """import pickle, sys, tether
tether.install()
sock = pickle.loads(sys.stdin.buffer.read())
data = b""
while chunk := sock.recv(65536):
    data += chunk
sock.close()
sys.stdout.buffer.write(data)
"""


def _handoff_step(gateway: str, key: str, port: int, page: bytes) -> tuple[bool, str]:
    """Send a request here, pickle the socket, read the answer in another process."""
    sock = socket.create_connection(("www.test", port), timeout=TIMEOUT)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: www.test\r\n\r\n")
        payload = pickle.dumps(sock)  # moves the connection out of this process
    finally:
        sock.close()
    env = {**os.environ, "TETHER_GATEWAY": gateway, "TETHER_APP": APP, "TETHER_KEY": key}
    worker = subprocess.run(
        [sys.executable, "-c", _WORKER],
        input=payload,
        capture_output=True,
        env=env,
        timeout=TIMEOUT * 4,
        check=False,
    )
    head, _, body = worker.stdout.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    ok = worker.returncode == 0 and body == page
    if worker.returncode != 0:
        return False, f"the worker process failed: {worker.stderr.decode(errors='replace')[-300:]}"
    return ok, (
        f"request sent here, socket pickled ({len(payload)} bytes, no key inside), "
        f"answer read by another process: {status}, {len(body)} bytes"
    )


def _decider_step(config_path: Path) -> tuple[bool, str]:
    """A private address, judged by the same policy without connecting anywhere."""
    from tether.config import load_config
    from tether.policy import Decider, Transport

    config = load_config(config_path)
    decision = Decider(config.policy).decide(APP, PRIVATE_HOST, PRIVATE_PORT, Transport.TCP)
    verdict = "allowed" if decision.allowed else "DENIED"
    return not decision.allowed, (
        f"{PRIVATE_HOST}:{PRIVATE_PORT} {verdict} by the policy decider (no connection made): "
        f"{decision.reason} [rule: {decision.rule}]"
    )


def _port25_step() -> tuple[bool, str]:
    """smtplib to 127.0.0.1:25 through tether: the gateway must refuse it."""
    try:
        client = smtplib.SMTP("127.0.0.1", 25, timeout=TIMEOUT)
    except tether.PolicyDenied as exc:
        # A PermissionError too, so smtplib's callers' `except OSError` still catch it.
        return True, (
            f"127.0.0.1:25 DENIED by the gateway: PolicyDenied (a PermissionError): "
            f"{exc.reason} [rule: {exc.rule}]"
        )
    client.close()
    return False, "127.0.0.1:25 was connected to; the gateway should have refused it"


__all__ = ["GatewayProcess", "Step", "gateway_config", "run_demo"]
