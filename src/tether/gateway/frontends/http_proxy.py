"""The HTTP proxy front-end: CONNECT tunnels and plain http:// requests, on the gateway core.

One app connection (curl -x, git, wget, anything given ``HTTP_PROXY``) is
one request: :class:`tether.proxy.http.HttpProxy` reads its head; the app is
known by ``Proxy-Authorization: Basic APP:KEY`` (or, on a Unix listener, by
its peer's uid/gid as on the native one, with no key); then exactly what a
native connect does: ``core.admit`` (policy, caps, quotas: the audit
decision line), ``core.dial`` (the outcome line) and the relay's ``Link``
(metering, throttling, idle reclamation, the close line). A refusal is
answered in HTTP: 407 without usable credentials, 403 with the policy's
reason in ``X-Tether-Refusal`` and the body, 429 for a cap or quota, 502/504
when the destination cannot be reached, 503 while the gateway drains or
shuts down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from collections.abc import Iterable

from tether.endpoint import Endpoint, host_port
from tether.gateway.core.auth import AuthRefusal, Guard
from tether.gateway.core.errors import Failure, Refusal, wire_error
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.frontends.base import PreauthStream
from tether.policy import Transport
from tether.proxy.http import (
    NEED_DATA,
    REALM,
    Closed,
    Forward,
    HttpProxy,
    ProxyRequestError,
    State,
    Tunnel,
)
from tether.wire import pb

log = logging.getLogger("tether.gateway")

# After a refusal the app may still be sending (a request body): closing with
# unread bytes would reset the connection and could lose the answer, so the
# gateway reads and drops them until the app closes, for at most this long
# (nginx's lingering_timeout default).
LINGER = 5.0
# Headers that carry a refusal's words, for scripts (the body says the same).
REFUSAL_HEADER = "X-Tether-Refusal"
RULE_HEADER = "X-Tether-Rule"
# A proxy relays what the app's own socket already coalesced; Nagle on the
# outbound socket would only hold it again (round trips, bench/README.md).
_NODELAY = (pb.OptionValue(name=pb.TCP_NODELAY, int_value=1),)

# The HTTP status of each kind of gateway failure.
_STATUS = {
    pb.Error.PERMISSION_DENIED: 403,
    pb.Error.AUTH_FAILED: 407,
    pb.Error.LIMIT: 429,
    pb.Error.QUOTA: 429,
    pb.Error.UNAVAILABLE: 503,
    pb.Error.CLOSED: 503,
    pb.Error.TIMEOUT: 504,
}


def proxy_url(endpoints: Iterable[Endpoint]) -> str:
    """The URL the gateway offers for its HTTP proxy: the first TCP listener's ("" if none).

    A Unix socket is not offered: HTTP proxy URLs cannot name one.
    """
    for endpoint in endpoints:
        if not endpoint.is_unix:
            return f"http://{endpoint}"
    return ""


def refusal_response(proxy: HttpProxy, failure: Failure, target: str = "") -> bytes:
    """The HTTP answer to a gateway failure (a Refusal, a dial's OSError, a lookup's error).

    `target` ("app 'x' to host:port") is named in a message that does not
    say it already (the kernel's and the resolver's words).
    """
    error = wire_error(failure)
    status = _STATUS.get(error.code, 502)
    message = error.message
    if target and not message.startswith("tether:"):
        message = f"tether: {target}: {message}"
    headers = [(REFUSAL_HEADER, message)]
    if error.rule:
        headers.append((RULE_HEADER, error.rule))
    retry_after = getattr(failure, "retry_after", 0.0) or error.retry_after
    if retry_after > 0:
        headers.append(("Retry-After", str(math.ceil(retry_after))))
    if status == 407:
        headers.append(("Proxy-Authenticate", f'Basic realm="{REALM}"'))
    return proxy.refuse(status, message, headers)


class HttpProxySession(PreauthStream):
    """One app connection to the HTTP proxy front-end."""

    def __init__(self, core: GatewayCore, *, unix: bool = False) -> None:
        self.core = core
        self.unix = unix  # accepted on a Unix listener: the peer's uid may say who it is
        self.proxy = HttpProxy()
        self.transport: asyncio.Transport | None = None
        self.app: str | None = None
        self._guard: Guard = core.guard
        self._peer: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._switched = False  # the stream is the Link's
        self._lingering: asyncio.TimerHandle | None = None

    # -- asyncio protocol --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # after a refusal: read and dropped (LINGER)
        self.proxy.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._lingering is None:
            self.proxy.receive_data(b"")
            self._process()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._lingering is not None:
            self._lingering.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- the guard's and the core's calls ----------------------------------

    def end_preauth(self, refusal: Refusal) -> None:
        """Closed by the guard before a request was authenticated (deadline, a cap)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.proxy.state is not State.CLOSED:  # else answered already (407), lingering
            status = 408 if refusal.code == pb.Error.TIMEOUT else 503
            transport.write(
                self.proxy.refuse(status, refusal.message, [(REFUSAL_HEADER, refusal.message)])
            )
        # No lingering: the guard is freeing what these connections hold.
        transport.close()

    def end(self, refusal: Refusal) -> None:
        """The core ends this connection (app revoked, gateway shutting down)."""
        if self._switched or self.transport is None or self.transport.is_closing():
            return
        if self.proxy.state is State.CLOSED:  # answered already, lingering
            self.transport.close()
            return
        if self._task is not None:
            self._task.cancel()
        self._refuse(refusal_response(self.proxy, refusal))

    # -- the request -------------------------------------------------------

    def _process(self) -> None:
        if self._task is not None or self._switched:
            return
        try:
            event = self.proxy.next_event()
        except ProxyRequestError as exc:
            log.info("http proxy: connection %s: %s", self.peer_key(), exc.message)
            self._refuse(self.proxy.refuse(exc.status, f"tether: {exc.message}"))
            return
        if event is NEED_DATA:
            return
        if isinstance(event, Closed):
            if self.transport is not None:
                self.transport.close()
            return
        assert isinstance(event, Tunnel | Forward)
        # What follows the head stays in the kernel for the destination.
        self._start(self._serve(event))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("http proxy: internal error on %s: %r", self.peer_key(), exc)
            if self._switched:  # raw bytes: no answer can be written into them
                if self.transport is not None:
                    self.transport.abort()
                return
            self._refuse(self.proxy.refuse(502, "tether: gateway internal error"))

    async def _serve(self, request: Tunnel | Forward) -> None:
        core = self.core
        app = await self._identify(request)
        if app is None:
            return
        admitted = await core.admit(
            app, request.host, request.port, Transport.TCP, socket.AF_UNSPEC
        )
        target = f"app {app!r} to {host_port(request.host, request.port)}"
        if isinstance(admitted, Refusal):
            self._refuse(refusal_response(self.proxy, admitted, target))
            return
        decision, addresses = admitted
        task = self._task
        assert task is not None
        try:
            link = await core.dial(decision, addresses, _NODELAY, core.config.connect_timeout, task)
        except OSError as exc:  # DialTimeout included; dial wrote the audit line
            self._refuse(refusal_response(self.proxy, exc, target))
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            link.close("closed by the app before the connect finished")
            return
        if isinstance(request, Tunnel):
            transport.write(self.proxy.established())
            first = self.proxy.trailing_data
        else:
            first = self.proxy.forwarded() + self.proxy.trailing_data
        # Raw bytes from here on: the connection is the socket's (the Link's).
        self._switched = True
        core.streams.discard(transport)
        link.join(transport, first)

    async def _identify(self, request: Tunnel | Forward) -> str | None:
        """The app this request is from, or None once it has been refused (407)."""
        if request.auth_error:  # a header that is not Basic APP:KEY: nothing to check
            self._refuse(self._auth_refusal("tether: " + request.auth_error))
            return None
        credentials = request.credentials
        app, key = (None, "") if credentials is None else credentials
        checked = self._guard.check(self, app, key, transport=self.transport, unix=self.unix)
        if not isinstance(checked, AuthRefusal):
            self.app = checked
            return checked
        message = checked.message
        if credentials is None:  # what to do first, then the check's words
            message = (f"tether: send Proxy-Authorization: Basic APP:KEY (realm {REALM!r}); "
                       + message.removeprefix("tether: "))
        if checked.delay > 0:
            await asyncio.sleep(checked.delay)
        self._refuse(self._auth_refusal(message))
        return None

    def _auth_refusal(self, message: str) -> bytes:
        return refusal_response(self.proxy, Refusal(pb.Error.AUTH_FAILED, errno.EACCES, message))

    # -- ending ------------------------------------------------------------

    def _refuse(self, data: bytes) -> None:
        """Send a refusal, then drop what the app still sends until it closes (LINGER)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering = self.core.loop.call_later(LINGER, transport.close)
        transport.resume_reading()


__all__ = ["HttpProxySession", "proxy_url", "refusal_response"]
