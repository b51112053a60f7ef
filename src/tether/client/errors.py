"""Gateway errors -> the stdlib exceptions an app already catches.

Each exception says in plain words what happened to what: the app, the
address, the rule. The stdlib classes are kept (``OSError(errno, ...)``
picks the errno's subclass, e.g. ConnectionRefusedError), so existing
``except`` clauses work unchanged.
"""

from __future__ import annotations

import errno
import os
import socket

from tether.wire import pb


def connect_error(err: pb.Error, target: str, gateway: str) -> OSError:
    """The exception for a failed connect to `target` through `gateway`."""
    code = err.code
    if code == pb.Error.PERMISSION_DENIED:
        return PermissionError(errno.EACCES, err.message)
    if code == pb.Error.TIMEOUT:
        return TimeoutError("timed out")
    if code == pb.Error.GAI:
        return socket.gaierror(err.errno, err.message)
    if code == pb.Error.SYSTEM and err.errno:
        text = os.strerror(err.errno)
        # OSError(errno, ...) returns ConnectionRefusedError, etc.
        return OSError(err.errno, f"{text}: {target} (via tether gateway {gateway})")
    return gateway_error(err, gateway)


def gateway_error(err: pb.Error, gateway: str) -> OSError:
    """Errors about the stream itself (hello, protocol, unknown descriptor)."""
    code = err.code
    if code == pb.Error.AUTH_FAILED:
        return PermissionError(errno.EACCES, err.message)
    if code in (pb.Error.VERSION_MISMATCH, pb.Error.PROTOCOL):
        return ConnectionError(errno.EPROTO, f"{err.message} (gateway {gateway})")
    if code == pb.Error.NOT_FOUND:
        return OSError(errno.EBADF, err.message)
    if code == pb.Error.CLOSED:
        return ConnectionResetError(errno.ECONNRESET, err.message)
    if code == pb.Error.ALREADY_RESUMED:
        return OSError(errno.EINVAL, err.message)  # not EALREADY: that reads as "retry"
    if code == pb.Error.INVALID_REQUEST:
        return OSError(err.errno or errno.EINVAL, err.message)
    if code == pb.Error.PERMISSION_DENIED:
        return PermissionError(errno.EACCES, err.message)
    if code == pb.Error.UNSUPPORTED:
        return OSError(errno.EOPNOTSUPP, err.message)
    if code == pb.Error.GAI:
        return socket.gaierror(err.errno, err.message)
    if code == pb.Error.HOST_NOT_FOUND:
        return socket.herror(err.errno or 1, err.message)
    if code == pb.Error.TIMEOUT:
        return TimeoutError("timed out")
    if err.errno:
        return OSError(err.errno, err.message or os.strerror(err.errno))
    return OSError(errno.EIO, err.message or f"tether: gateway {gateway} failed the request")


def unreachable(gateway: str, exc: OSError) -> ConnectionError:
    reason = exc.strerror or str(exc)
    return ConnectionError(
        exc.errno or errno.ECONNREFUSED, f"tether: gateway {gateway} unreachable: {reason}"
    )
