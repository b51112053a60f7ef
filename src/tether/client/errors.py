"""Gateway errors -> the stdlib exceptions an app already catches.

The one place the client turns what the gateway says (an ``Error``, the
error of a ``ServerHello``, ``ConnectResult`` or ``Response``) or how the
stream failed (closed, out of protocol, unreachable) into an exception,
with one wording. Each exception says in plain words what happened to
what: the app, the address, the rule. The stdlib classes are kept
(``OSError(errno, ...)`` picks the errno's subclass, e.g.
ConnectionRefusedError), so existing ``except`` clauses work unchanged;
tether's own classes (``tether.errors``) derive from them.
"""

from __future__ import annotations

import errno
import os
import socket

from tether.errors import LimitExceeded, NodeGone, PolicyDenied, QuotaExceeded
from tether.wire import ProtocolError, pb

_E = pb.Error


def gateway_error(err: pb.Error, gateway: object, target: str = "") -> OSError:
    """The exception for `err` from `gateway`.

    `target` ("host:port") is the destination of the Connect (or Resume) the
    error answers; it is named in an OS error from the gateway's dial.
    """
    code = err.code
    if code == _E.PERMISSION_DENIED:
        # The gateway names the rule for every policy decision and only for
        # those; another refusal (a socket of another app) is a plain one.
        if err.rule:
            return PolicyDenied(err.message, err.rule, err.reason)
        return PermissionError(errno.EACCES, err.message)
    if code == _E.LIMIT:
        # The limit's name travels in `rule`, its value in `reason` (as text).
        value = int(err.reason) if err.reason.isdigit() else 0
        return LimitExceeded(err.message, err.rule, value)
    if code == _E.QUOTA:
        # The limit's name in `rule`, its value in `reason`, and the app,
        # window and refill time in their own fields.
        return QuotaExceeded(
            err.message,
            err.rule,
            int(err.reason) if err.reason.isdigit() else 0,
            app=err.app,
            window=err.window,
            retry_after=err.retry_after,
        )
    if code == _E.NODE_GONE:
        # The gateway names the node in its message: "... node 'NODE' ...".
        return NodeGone(err.message, _named_node(err.message))
    if code == _E.AUTH_FAILED:
        return PermissionError(errno.EACCES, err.message)
    if code == _E.TIMEOUT:
        return TimeoutError("timed out")
    if code == _E.GAI:
        return socket.gaierror(err.errno, err.message)
    if code == _E.SYSTEM and err.errno and target:
        text = os.strerror(err.errno)
        # OSError(errno, ...) returns ConnectionRefusedError, etc.
        return OSError(err.errno, f"{text}: {target} (via tether gateway {gateway})")
    if code in (_E.VERSION_MISMATCH, _E.PROTOCOL):
        return ConnectionError(errno.EPROTO, f"{err.message} (gateway {gateway})")
    if code == _E.NOT_FOUND:
        return OSError(errno.EBADF, err.message)
    if code == _E.CLOSED:
        return ConnectionResetError(errno.ECONNRESET, err.message)
    if code == _E.UNAVAILABLE:
        # A draining gateway: refused, the message says to retry on another one.
        return ConnectionRefusedError(errno.ECONNREFUSED, err.message)
    if code == _E.ALREADY_RESUMED:
        return OSError(errno.EINVAL, err.message)  # not EALREADY: that reads as "retry"
    if code == _E.INVALID_REQUEST:
        return OSError(err.errno or errno.EINVAL, err.message)
    if code == _E.UNSUPPORTED:
        return OSError(errno.EOPNOTSUPP, err.message)
    if code == _E.HOST_NOT_FOUND:
        return socket.herror(err.errno or 1, err.message)
    if err.errno:
        return OSError(err.errno, err.message or os.strerror(err.errno))
    return OSError(errno.EIO, err.message or f"tether: gateway {gateway} failed the request")


def _named_node(message: str) -> str:
    """NODE in a gateway message's "node 'NODE'" ("" if it names none)."""
    _, found, rest = message.partition("node '")
    return rest.partition("'")[0] if found else ""


def closed(gateway: object) -> ConnectionResetError:
    """The gateway ended the stream before the answer (without an Error frame)."""
    return ConnectionResetError(errno.ECONNRESET, f"tether: gateway {gateway} closed the stream")


def broke_protocol(gateway: object, exc: ProtocolError | str) -> ConnectionError:
    """The gateway sent what the protocol does not allow: the stream is out of step."""
    return ConnectionError(errno.EPROTO, f"tether: gateway {gateway} broke the protocol: {exc}")


def unreachable(gateway: object, exc: OSError) -> ConnectionError:
    """Connecting (or sending) to the gateway itself failed."""
    reason = exc.strerror or str(exc)
    return ConnectionError(
        exc.errno or errno.ECONNREFUSED, f"tether: gateway {gateway} unreachable: {reason}"
    )
