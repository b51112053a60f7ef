"""The admin HTTP listener: ``/metrics``, ``/healthz``, ``/readyz`` (docs/metrics.md).

Off unless ``[gateway] admin_listen`` names an address (loopback, a Unix
socket, or elsewhere with ``admin_allow_remote``). It runs on the gateway's
own event loop, so a scrape reads the registry between two relay events,
never while one changes it; HTTP/1.1 is parsed by h11 (sans-I/O). A
scraper cannot hurt the gateway: what is buffered of an unfinished request
head is bounded (MAX_REQUEST_HEAD), bodies are refused, a connection that has not sent a
complete request within READ_TIMEOUT is closed, one that does not read its
answers stops being read, and at most MAX_CONNECTIONS are open at once.

* ``GET /metrics``: the Prometheus text format (OpenMetrics when the
  scraper's Accept asks for it) from a registry of the gateway's own
  (:func:`tether.gateway.metrics.collector_registry`).
* ``GET /healthz``: 200 while the process serves its loop (liveness).
* ``GET /readyz``: 200 while the gateway takes new work; 503, with the
  reason, while it drains or shuts down (readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from typing import TYPE_CHECKING

import h11

from tether.endpoint import Endpoint
from tether.gateway.metrics import collector_registry, not_ready

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tether.gateway.core.gateway import GatewayCore

log = logging.getLogger("tether.gateway")

# A scraper's request head is a few hundred bytes (Prometheus sends a
# request line and five headers); 8 KiB is the common servers' limit for one
# header line (nginx's large_client_header_buffers, Apache's LimitRequestLine).
MAX_REQUEST_HEAD = 8 * 1024
# Prometheus's default scrape_timeout is 10 s: a request that is not complete
# in that time is from nobody who is waiting for the answer. Also how long an
# idle keep-alive connection is kept between scrapes.
READ_TIMEOUT = 10.0
# Two Prometheus servers (an HA pair), an agent, and an operator's curl
# need a handful; 16 leaves room and bounds what connections can hold.
MAX_CONNECTIONS = 16
ROUTES = ("/metrics", "/healthz", "/readyz")
_SERVER_HEADER = "tether"


class AdminServer:
    """The admin listener of one gateway; :meth:`start` binds it, :meth:`close` ends it."""

    def __init__(self, core: GatewayCore, endpoint: Endpoint) -> None:
        self.core = core
        # As configured (with --workers, the supervisor gave each worker its own:
        # supervisor.worker_config); the bound one after start().
        self.endpoint = endpoint
        self.sessions: set[AdminSession] = set()
        self.registry: CollectorRegistry = collector_registry(core)
        self._server: asyncio.Server | None = None

    async def start(self) -> Endpoint:
        """Listen; returns the bound endpoint (the real port for port 0)."""
        loop = self.core.loop
        endpoint = self.endpoint
        if endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(endpoint.path).st_mode):
                    os.unlink(endpoint.path)  # a stale socket from a previous run
            self._server = await loop.create_unix_server(
                lambda: AdminSession(self), path=endpoint.path
            )
        else:
            self._server = await loop.create_server(
                lambda: AdminSession(self),
                host=endpoint.host,
                port=endpoint.port,
                family=endpoint.family,
                reuse_address=True,
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            self.endpoint = Endpoint(host=host, port=port)
        log.info("admin listener on %s (/metrics, /healthz, /readyz)", self.endpoint)
        return self.endpoint

    async def close(self) -> None:
        """Stop listening and drop every admin connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self.sessions):
            session.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
        if self.endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.path)

    def answer(self, method: bytes, target: bytes, accept: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request that parsed."""
        path = target.split(b"?", 1)[0].decode("ascii", "replace")
        if path not in ROUTES:
            return 404, _TEXT, f"no such page: {path} (try {', '.join(ROUTES)})\n".encode()
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, f"{path} answers GET and HEAD only\n".encode()
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, content_type = choose_encoder(accept)
            try:
                return 200, content_type, encoder(self.registry)
            except Exception as exc:  # a collector's bug: the scraper is told, the loop lives
                log.exception("admin: /metrics failed")
                return 500, _TEXT, f"collecting the metrics failed: {exc!r}\n".encode()
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        reason = not_ready(self.core)
        if reason is not None:
            return 503, _TEXT, f"not ready: {reason}\n".encode()
        return 200, _TEXT, b"ready\n"


_TEXT = "text/plain; charset=utf-8"


class AdminSession(asyncio.Protocol):
    """One admin HTTP connection, driven by an h11 state machine."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False

    # -- asyncio protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        sessions = self.server.sessions
        if len(sessions) >= MAX_CONNECTIONS:
            # Answered before its request is read (HTTP allows it): the
            # scraper sees why instead of a reset.
            self._send_error(
                503, f"the admin listener already has {MAX_CONNECTIONS} connections "
                "(tether.gateway.admin.MAX_CONNECTIONS); try again"
            )
            return
        sessions.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.http.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.http.receive_data(b"")
        self._process()
        return False  # close our side once what we answered is written

    def pause_writing(self) -> None:
        # The client does not read our answers: read no more requests (each
        # would add one) until it does; READ_TIMEOUT still ends it.
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.sessions.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- HTTP --------------------------------------------------------------

    def _process(self) -> None:
        http = self.http
        while not self._write_paused and self._open():
            if http.our_state is h11.DONE and http.their_state is h11.DONE:
                http.start_next_cycle()  # keep-alive: the next request's clock starts
                self._arm()
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error(exc.error_status_hint, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if _has_body(event):
                    self._send_error(413, "the admin listener takes no request bodies")
                    return
                self.request = event
            elif isinstance(event, h11.EndOfMessage):
                self._serve()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _serve(self) -> None:
        request = self.request
        assert request is not None
        accept = ""
        for name, value in request.headers:
            if name == b"accept":
                accept = value.decode("latin-1")
        status, content_type, body = self.server.answer(request.method, request.target, accept)
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Server", _SERVER_HEADER),
        ]
        if status == 405:
            headers.append(("Allow", "GET, HEAD"))
        http = self.http
        data = http.send(h11.Response(status_code=status, headers=headers))
        if request.method != b"HEAD":
            data = (data or b"") + (http.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (http.send(h11.EndOfMessage()) or b"")
        self._write(data)
        if http.our_state is h11.MUST_CLOSE:
            self._close()

    def _send_error(self, status: int, message: str) -> None:
        """Answer `status` if an answer can still be sent, then close."""
        http = self.http
        if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = (message + "\n").encode("utf-8", "replace")
            try:
                data = http.send(h11.Response(status_code=status, headers=[
                    ("Content-Type", _TEXT),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                    ("Server", _SERVER_HEADER),
                ]))
                data = (data or b"") + (http.send(h11.Data(data=body)) or b"")
                data += http.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError:
                data = b""
            self._write(data)
        self._close()

    def _expired(self) -> None:
        """READ_TIMEOUT passed since the connection or its last answer."""
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # it is not reading our answers: close() would wait for it
            return
        started = self.http.their_state is not h11.IDLE or bool(self.http.trailing_data[0])
        if started:
            self._send_error(408, f"request not complete within {READ_TIMEOUT:g} s")
        else:
            self._close()  # an idle keep-alive connection

    # -- helpers -----------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.server.core.loop.call_later(READ_TIMEOUT, self._expired)

    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        if data and self._open():
            assert self.transport is not None
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "READ_TIMEOUT",
    "AdminServer",
    "AdminSession",
]
