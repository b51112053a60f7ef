"""Unmodified stdlib mail and HTTP clients, and requests, through a real gateway.

The servers are tether.demo.servers on 127.0.0.1 (started before install(),
so their listening sockets are the stdlib's); the clients name them as
``mail.test`` / ``www.test``, which only the gateway's static table
resolves. Nothing here talks to anything but loopback.
"""

from __future__ import annotations

import _socket
import argparse
import email.message
import http.client
import imaplib
import poplib
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import trustme

from tether.demo.servers import (
    MAILBOX_MESSAGE,
    PAGE,
    PASSWORD,
    USER,
    HTTPServer,
    IMAPServer,
    POP3Server,
    SMTPServer,
    client_context,
    pattern,
    write_ca_file,
)

if TYPE_CHECKING:
    from support import Gateway  # annotations only (tests/ is on sys.path under pytest)

TIMEOUT = 5.0


# -- servers (module scope: started once, before any test installs tether) ----
# tls_ca, https_server, pop3_server and imap_server are tests/conftest.py's.


@pytest.fixture(scope="module")
def ca_file(
    tls_ca: tuple[trustme.CA, ssl.SSLContext], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return write_ca_file(tls_ca[0], tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture
def tls_client(tls_ca: tuple[trustme.CA, ssl.SSLContext]) -> ssl.SSLContext:
    return client_context(tls_ca[0])


@pytest.fixture(scope="module")
def smtp_server(tls_ca: tuple[trustme.CA, ssl.SSLContext]) -> Iterator[SMTPServer]:
    """This module's SMTP server offers STARTTLS (conftest's smtp_server does not)."""
    with SMTPServer(tls_ca[1]) as server:
        yield server


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


def _message(subject: str) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["From"] = "alice@mail.test"
    msg["To"] = "bob@mail.test"
    msg["Subject"] = subject
    msg.set_content("through tether\n")
    return msg


# -- SMTP ------------------------------------------------------------------------


def test_smtp_starttls_verified_and_delivered(
    tethered: Gateway, smtp_server: SMTPServer, tls_client: ssl.SSLContext
) -> None:
    before = len(smtp_server.messages)
    with smtplib.SMTP(
        "mail.test", smtp_server.port, local_hostname="client.test", timeout=TIMEOUT
    ) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        code, _ = smtp.starttls(context=tls_client)
        assert code == 220
        assert isinstance(smtp.sock, ssl.SSLSocket)
        # Verified for the name smtplib was given (mail.test), not the address.
        assert smtp.sock.server_hostname == "mail.test"
        assert smtp.sock.getpeercert() is not None
        refused = smtp.sendmail(
            "alice@mail.test", ["bob@mail.test", "carol@mail.test"], _message("starttls").as_bytes()
        )
        assert refused == {}
    got = smtp_server.wait_for_messages(before + 1, TIMEOUT)[before:]
    assert len(got) == 1
    assert got[0].tls
    assert got[0].mail_from == "alice@mail.test"
    assert got[0].rcpt_tos == ("bob@mail.test", "carol@mail.test")
    assert b"Subject: starttls" in got[0].content
    assert got[0].helo == "client.test"


def test_smtp_starttls_rejects_an_untrusted_certificate(
    tethered: Gateway, smtp_server: SMTPServer
) -> None:
    # A CA the server's certificate does not chain to: verification must fail,
    # so the success above is real verification through the tether socket.
    other = client_context(trustme.CA())
    with (
        smtplib.SMTP(
            "mail.test", smtp_server.port, local_hostname="client.test", timeout=TIMEOUT
        ) as smtp,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        smtp.starttls(context=other)


def test_smtp_without_local_hostname(
    tethered: Gateway, smtp_server: SMTPServer, tls_client: ssl.SSLContext
) -> None:
    # smtplib then calls socket.getfqdn(): it must be tether's (answered by
    # the gateway's static table), never the machine's resolver.
    from tether import socket as tether_socket

    assert socket.getfqdn is tether_socket.getfqdn
    before = len(smtp_server.messages)
    with smtplib.SMTP("mail.test", smtp_server.port, timeout=TIMEOUT) as smtp:
        assert isinstance(smtp.local_hostname, str)
        assert smtp.local_hostname
        smtp.starttls(context=tls_client)
        smtp.send_message(_message("no local_hostname"))
        local_hostname = smtp.local_hostname
    got = smtp_server.wait_for_messages(before + 1, TIMEOUT)[before:]
    assert len(got) == 1
    assert got[0].helo == local_hostname
    assert b"Subject: no local_hostname" in got[0].content


def test_smtp_socket_is_a_tether_socket(
    tethered: Gateway, smtp_server: SMTPServer, tls_client: ssl.SSLContext
) -> None:
    gw_host, _, gw_port = tethered.address.rpartition(":")
    with smtplib.SMTP(
        "mail.test", smtp_server.port, local_hostname="client.test", timeout=TIMEOUT
    ) as smtp:
        sock = smtp.sock
        assert sock is not None
        assert type(sock).__module__.startswith("tether.")
        # The app sees the real destination...
        assert sock.getpeername() == ("127.0.0.1", smtp_server.port)
        # ...while the kernel socket under it is connected to the gateway.
        assert _socket.socket.getpeername(sock) == (gw_host, int(gw_port))
        smtp.starttls(context=tls_client)
        assert type(smtp.sock).__module__.startswith("tether.")
        assert smtp.sock.getpeername() == ("127.0.0.1", smtp_server.port)
        assert smtp.noop()[0] == 250


def test_smtp_port_25_is_denied(tethered: Gateway) -> None:
    # Loopback, so nothing could leave the machine even if it were allowed.
    with pytest.raises(PermissionError, match="port 25"):
        smtplib.SMTP("127.0.0.1", 25, local_hostname="client.test", timeout=TIMEOUT)


# -- POP3 and IMAP -------------------------------------------------------------


def test_pop3_retrieves_the_message(tethered: Gateway, pop3_server: POP3Server) -> None:
    pop = poplib.POP3("mail.test", pop3_server.port, timeout=TIMEOUT)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        assert type(pop.sock).__module__.startswith("tether.")
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat() == (1, len(MAILBOX_MESSAGE))
        response, lines, octets = pop.retr(1)
        assert response.startswith(b"+OK")
        # poplib undid the byte-stuffing of the line that starts with a dot.
        assert b"\r\n".join(lines) + b"\r\n" == MAILBOX_MESSAGE
        assert octets > 0
    finally:
        pop.quit()


def test_imap_login_select_fetch(tethered: Gateway, imap_server: IMAPServer) -> None:
    imap = imaplib.IMAP4("mail.test", imap_server.port, timeout=TIMEOUT)
    try:
        assert type(imap.sock).__module__.startswith("tether.")
        assert imap.login(USER, PASSWORD)[0] == "OK"
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"1"])
        typ, fetched = imap.fetch("1", "(RFC822)")
        assert typ == "OK"
        first = fetched[0]
        assert isinstance(first, tuple)
        assert first[1] == MAILBOX_MESSAGE
    finally:
        assert imap.logout()[0] == "BYE"


# -- HTTP ------------------------------------------------------------------------


def test_http_client_get(tethered: Gateway, http_server: HTTPServer) -> None:
    conn = http.client.HTTPConnection("www.test", http_server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == PAGE
        assert conn.sock is not None
        assert type(conn.sock).__module__.startswith("tether.")
        assert conn.sock.getpeername() == ("127.0.0.1", http_server.port)
        # Same kept-alive connection, a larger body.
        size = 1024 * 1024
        conn.request("GET", f"/bytes/{size}")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == pattern(size)
    finally:
        conn.close()


def test_requests_https_verified(
    tethered: Gateway, https_server: HTTPServer, ca_file: Path
) -> None:
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: loopback only
        response = session.get(
            f"https://www.test:{https_server.port}/", verify=str(ca_file), timeout=TIMEOUT
        )
        assert response.status_code == 200
        assert response.content == PAGE
        size = 256 * 1024
        response = session.get(
            f"https://www.test:{https_server.port}/bytes/{size}",
            verify=str(ca_file),
            timeout=TIMEOUT,
        )
        assert response.content == pattern(size)


def test_requests_https_rejects_an_untrusted_certificate(
    tethered: Gateway, https_server: HTTPServer
) -> None:
    with requests.Session() as session:
        session.trust_env = False
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"https://www.test:{https_server.port}/", timeout=TIMEOUT)


# -- tether demo -------------------------------------------------------------------


def test_demo_runs_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from tether.cli import demo

    status = demo.run(argparse.Namespace(verbose=False))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "passed" in out
    assert "10.1.2.3:80" in out
    assert "127.0.0.1:25" in out
    assert "dns.query.udp www.test A" in out and "-> 127.0.0.1" in out
    assert "answer read by another process: HTTP/1.1 200 OK" in out
    assert "all 7 steps" in out
