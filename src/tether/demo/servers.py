"""Small local servers for the demo and the integration tests.

Each server listens on 127.0.0.1 with an ephemeral port and runs in a
background thread: ``port = server.start()``, ``server.stop()``, or use it
as a context manager. They are deliberately small: enough protocol for the
stdlib clients (smtplib, http.client/requests, poplib, imaplib) to do a
real exchange, nothing more.

Start them *before* :func:`tether.install`: a listening socket made while
the stdlib ``socket`` module is patched would be a tether socket, and tether
sockets are outbound only. Once running they keep working after install().
"""

from __future__ import annotations

import _socket
import asyncio
import shlex
import socketserver
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session

HOST = "127.0.0.1"
# The names the throwaway CA's server certificate is valid for.
SERVER_NAMES = ("localhost", "mail.test", "www.test", "127.0.0.1")

# The credentials POP3Server and IMAPServer accept.
USER = "demo"
PASSWORD = "tether demo"

# The one message in the POP3/IMAP mailbox. The dot-line checks that POP3
# byte-stuffing is done (and undone by poplib).
MAILBOX_MESSAGE = (
    b"From: postmaster@mail.test\r\n"
    b"To: demo@mail.test\r\n"
    b"Subject: Hello from the local mailbox\r\n"
    b"Message-ID: <1@mail.test>\r\n"
    b"\r\n"
    b"This message was fetched through tether.\r\n"
    b".A line that starts with a dot.\r\n"
)

PAGE = (
    b"<!doctype html>\n<title>tether demo</title>\n"
    b"<p>Hello from a local web server, reached through tether.</p>\n"
)
# /bytes/N never answers more than this (a guard, not a protocol limit).
MAX_BYTES = 64 * 1024 * 1024
# Longest command line the POP3/IMAP servers read (RFC 3501 suggests 8000).
MAX_LINE = 8192
# Per-connection idle limit: a client that stalls cannot pin a thread forever.
CONNECTION_TIMEOUT = 10.0
START_TIMEOUT = 5.0


def pattern(n: int) -> bytes:
    """The body ``GET /bytes/N`` answers: N bytes of a recognisable pattern."""
    chunk = b"0123456789abcdef"
    return (chunk * (n // len(chunk) + 1))[:n]


# -- certificates --------------------------------------------------------------


def make_ca() -> tuple[trustme.CA, ssl.SSLContext]:
    """A throwaway CA and a server context whose certificate names SERVER_NAMES."""
    ca = trustme.CA()
    cert = ca.issue_cert(*SERVER_NAMES)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    return ca, server


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context (hostname checks on) that trusts only `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


def write_ca_file(ca: trustme.CA, path: Path) -> Path:
    """Write `ca`'s certificate as PEM (for ``requests``' ``verify=``); returns `path`."""
    ca.cert_pem.write_to_path(str(path))
    return path


# -- the common shape ----------------------------------------------------------


class LocalServer:
    """start() -> port, stop(), context manager; subclasses do the serving."""

    name: ClassVar[str] = "server"

    def __init__(self) -> None:
        self.port = 0
        self._running = False

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    def start(self) -> int:
        if self._running:
            return self.port
        _check_not_installed(self.name)
        self.port = self._start()
        self._running = True
        return self.port

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._stop()

    def _start(self) -> int:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _check_not_installed(name: str) -> None:
    import tether

    if tether.installed():
        raise RuntimeError(
            f"start the {name} before tether.install(): its listening socket "
            "must be a stdlib socket (tether sockets are outbound only)"
        )


# -- SMTP ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the SMTP server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool  # the session was under STARTTLS when it was sent
    helo: str


class _RecordingHandler:
    """aiosmtpd handler that keeps every message in memory."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self.cond = threading.Condition()

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        if content is None:
            raw = envelope.content
            content = raw.encode() if isinstance(raw, str) else (raw or b"")
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            tls=session.ssl is not None,
            helo=session.host_name or "",
        )
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()
        return "250 Message accepted for delivery"


class _EphemeralController(Controller):
    """aiosmtpd's Controller, but on an ephemeral port.

    Controller connects to its own port after binding (to make aiosmtpd build
    its protocol object early), so the real port must be known by then.
    """

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _trigger_server(self) -> None:
        # The C-level socket: aiosmtpd's create_connection would be tether's
        # if the module was first imported after install().
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect((self.hostname, self.port))
            sock.recv(1024)
        finally:
            sock.close()


class SMTPServer(LocalServer):
    """An SMTP server (aiosmtpd) that records what it receives.

    With `tls_context` (a server-side context) it offers STARTTLS;
    `require_starttls` makes it refuse MAIL before STARTTLS.
    """

    name = "SMTP server"

    def __init__(
        self,
        tls_context: ssl.SSLContext | None = None,
        *,
        require_starttls: bool = False,
        hostname: str = "mail.test",
    ) -> None:
        super().__init__()
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.hostname = hostname
        self._handler = _RecordingHandler()
        self._controller: _EphemeralController | None = None

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._handler.cond:
            return list(self._handler.messages)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least `count` messages have arrived; returns them all."""
        with self._handler.cond:
            self._handler.cond.wait_for(lambda: len(self._handler.messages) >= count, timeout)
            return list(self._handler.messages)

    def _start(self) -> int:
        controller = _EphemeralController(
            self._handler,
            hostname=HOST,
            port=0,
            ready_timeout=START_TIMEOUT,
            # The name in the greeting; given, so aiosmtpd does not call
            # socket.getfqdn() (a resolver lookup) for every connection.
            server_hostname=self.hostname,
            tls_context=self.tls_context,
            require_starttls=self.require_starttls and self.tls_context is not None,
            timeout=CONNECTION_TIMEOUT,
        )
        controller.start()
        self._controller = controller
        return int(controller.port)

    def _stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


# -- socketserver-based servers ------------------------------------------------


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a stalled client must not hold up stop()
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-exchange is not worth a traceback


class _ThreadedSocketServer(LocalServer):
    """Runs a socketserver server's serve_forever() in a daemon thread."""

    def __init__(self) -> None:
        super().__init__()
        self._server: socketserver.TCPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> socketserver.TCPServer:
        raise NotImplementedError

    def _start(self) -> int:
        server = self._make_server()
        # A short poll interval keeps stop() quick.
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tether-demo-{self.name}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)
            self._thread = None


class _LineHandler(socketserver.StreamRequestHandler):
    """A CRLF line protocol handler."""

    timeout = CONNECTION_TIMEOUT

    def read_line(self) -> str | None:
        """The next line without its line ending; None at EOF or on a too-long line."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line or len(line) > MAX_LINE:
            return None
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def send(self, *lines: str | bytes) -> None:
        out = b"".join(
            (line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines
        )
        self.wfile.write(out)
        self.wfile.flush()


# -- HTTP ------------------------------------------------------------------------


class _HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server_version = "tether-demo"
    timeout = CONNECTION_TIMEOUT

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # The listening socket defers the handshake (see HTTPServer):
            # do it here, in this connection's own thread.
            self.connection.do_handshake()

    def do_GET(self) -> None:
        status, body, ctype = self._route()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[int, bytes, str]:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return 200, PAGE, "text/html; charset=utf-8"
        if path.startswith("/bytes/"):
            text = path.removeprefix("/bytes/")
            if text.isdigit() and int(text) <= MAX_BYTES:
                return 200, pattern(int(text)), "application/octet-stream"
            return 400, b"bad size\n", "text/plain"
        return 404, b"not found\n", "text/plain"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the demo prints its own lines


class _HTTPServerImpl(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a resolver lookup;
        # a loopback test server has no use for it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class HTTPServer(_ThreadedSocketServer):
    """``GET /`` gives a small page, ``GET /bytes/N`` N bytes of `pattern`.

    With `ssl_context` (server side) it speaks HTTPS only.
    """

    name = "HTTP server"

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.ssl_context = ssl_context

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def _make_server(self) -> socketserver.TCPServer:
        server = _HTTPServerImpl((HOST, 0), _HTTPHandler)
        if self.ssl_context is not None:
            # accept() must not block the serving thread on a slow handshake.
            server.socket = self.ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        return server


# -- POP3 ------------------------------------------------------------------------


def _pop3_stuffed(message: bytes) -> list[bytes]:
    """RFC 1939 multi-line body: lines starting with '.' get another '.'."""
    lines = message.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [b"." + line if line.startswith(b".") else line for line in lines]


class _POP3Handler(_LineHandler):
    def handle(self) -> None:
        self.send("+OK tether demo POP3 server ready")
        user: str | None = None
        authenticated = False
        size = len(MAILBOX_MESSAGE)
        while (line := self.read_line()) is not None:
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                self.send("+OK bye")
                return
            if verb == "CAPA":
                self.send("+OK capability list follows", "USER", "UIDL", ".")
            elif verb == "USER":
                user = arg
                self.send("+OK send PASS")
            elif verb == "PASS":
                authenticated = user == USER and arg == PASSWORD
                self.send("+OK maildrop ready" if authenticated else "-ERR invalid credentials")
            elif not authenticated:
                self.send("-ERR authenticate first")
            elif verb == "STAT":
                self.send(f"+OK 1 {size}")
            elif verb == "LIST":
                if not arg:
                    self.send("+OK 1 message", f"1 {size}", ".")
                elif arg == "1":
                    self.send(f"+OK 1 {size}")
                else:
                    self.send("-ERR no such message")
            elif verb == "UIDL":
                if not arg:
                    self.send("+OK", "1 msg-1", ".")
                elif arg == "1":
                    self.send("+OK 1 msg-1")
                else:
                    self.send("-ERR no such message")
            elif verb == "RETR":
                if arg == "1":
                    self.send(f"+OK {size} octets", *_pop3_stuffed(MAILBOX_MESSAGE), ".")
                else:
                    self.send("-ERR no such message")
            elif verb in ("NOOP", "RSET"):
                self.send("+OK")
            else:
                self.send(f"-ERR unknown command {verb}")


class POP3Server(_ThreadedSocketServer):
    """A POP3 server (USER/PASS, STAT, LIST, UIDL, RETR, QUIT) with one message."""

    name = "POP3 server"

    def _make_server(self) -> socketserver.TCPServer:
        return _TCPServer((HOST, 0), _POP3Handler)


# -- IMAP ------------------------------------------------------------------------


def _imap_args(text: str) -> list[str] | None:
    """Atoms and quoted strings (backslash escapes); None if unparsable (literals)."""
    if "{" in text:
        return None
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.quotes = '"'
    lexer.escapedquotes = '"'
    lexer.escape = "\\"
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:
        return None


class _IMAPHandler(_LineHandler):
    def handle(self) -> None:
        self.send("* OK [CAPABILITY IMAP4rev1] tether demo IMAP server ready")
        self.authenticated = False
        self.selected = False
        while (line := self.read_line()) is not None:
            tag, _, rest = line.partition(" ")
            command, _, arg_text = rest.partition(" ")
            command = command.upper()
            args = _imap_args(arg_text)
            if not tag or not command or args is None:
                self.send(f"{tag or '*'} BAD malformed command")
                continue
            handler = self._commands.get(command)
            if handler is None:
                self.send(f"{tag} BAD unknown command {command}")
                continue
            if not handler(self, tag, args):
                return

    def _capability(self, tag: str, args: list[str]) -> bool:
        self.send("* CAPABILITY IMAP4rev1", f"{tag} OK CAPABILITY completed")
        return True

    def _noop(self, tag: str, args: list[str]) -> bool:
        self.send(f"{tag} OK NOOP completed")
        return True

    def _logout(self, tag: str, args: list[str]) -> bool:
        self.send("* BYE tether demo IMAP server logging out", f"{tag} OK LOGOUT completed")
        return False

    def _login(self, tag: str, args: list[str]) -> bool:
        if args == [USER, PASSWORD]:
            self.authenticated = True
            self.send(f"{tag} OK LOGIN completed")
        else:
            self.send(f"{tag} NO [AUTHENTICATIONFAILED] invalid credentials")
        return True

    def _select(self, tag: str, args: list[str]) -> bool:
        return self._open_mailbox(tag, args, "SELECT", "READ-WRITE")

    def _examine(self, tag: str, args: list[str]) -> bool:
        return self._open_mailbox(tag, args, "EXAMINE", "READ-ONLY")

    def _open_mailbox(self, tag: str, args: list[str], command: str, access: str) -> bool:
        self.selected = False
        if not self.authenticated:
            self.send(f"{tag} NO authenticate first")
        elif len(args) != 1 or args[0].upper() != "INBOX":
            self.send(f"{tag} NO no such mailbox")
        else:
            self.selected = True
            self.send(
                r"* FLAGS (\Seen \Deleted)",
                "* 1 EXISTS",
                "* 0 RECENT",
                "* OK [UIDVALIDITY 1] UIDs valid",
                "* OK [UIDNEXT 2] predicted next UID",
                f"{tag} OK [{access}] {command} completed",
            )
        return True

    def _fetch(self, tag: str, args: list[str]) -> bool:
        if not self.selected:
            self.send(f"{tag} NO select a mailbox first")
            return True
        if len(args) < 2 or args[0] not in ("1", "1:*", "*"):
            self.send(f"{tag} BAD only message 1 exists")
            return True
        items = " ".join(args[1:]).strip("()").upper().split()
        parts: list[bytes] = []
        for item in items:
            if item in ("RFC822", "BODY[]", "BODY.PEEK[]"):
                name = "BODY[]" if item.startswith("BODY") else "RFC822"
                literal = f"{name} {{{len(MAILBOX_MESSAGE)}}}\r\n".encode()
                parts.append(literal + MAILBOX_MESSAGE)
            elif item == "RFC822.SIZE":
                parts.append(f"RFC822.SIZE {len(MAILBOX_MESSAGE)}".encode())
            elif item == "FLAGS":
                parts.append(rb"FLAGS (\Seen)")
            elif item == "UID":
                parts.append(b"UID 1")
            else:
                self.send(f"{tag} BAD unsupported FETCH item {item}")
                return True
        self.send(b"* 1 FETCH (" + b" ".join(parts) + b")", f"{tag} OK FETCH completed")
        return True

    def _close(self, tag: str, args: list[str]) -> bool:
        self.selected = False
        self.send(f"{tag} OK CLOSE completed")
        return True

    _commands: ClassVar[dict[str, Callable[[_IMAPHandler, str, list[str]], bool]]] = {
        "CAPABILITY": _capability,
        "NOOP": _noop,
        "LOGOUT": _logout,
        "LOGIN": _login,
        "SELECT": _select,
        "EXAMINE": _examine,
        "FETCH": _fetch,
        "CLOSE": _close,
    }


class IMAPServer(_ThreadedSocketServer):
    """An IMAP4rev1 subset (CAPABILITY, LOGIN, SELECT INBOX, FETCH 1, LOGOUT)."""

    name = "IMAP server"

    def _make_server(self) -> socketserver.TCPServer:
        return _TCPServer((HOST, 0), _IMAPHandler)


__all__ = [
    "HOST",
    "MAILBOX_MESSAGE",
    "PAGE",
    "PASSWORD",
    "SERVER_NAMES",
    "USER",
    "HTTPServer",
    "IMAPServer",
    "LocalServer",
    "POP3Server",
    "ReceivedMessage",
    "SMTPServer",
    "client_context",
    "make_ca",
    "pattern",
    "write_ca_file",
]
