"""Why the gateway says no, and the one mapping of its failures onto the wire.

Core services return a :class:`Refusal` (a value: admission, handoff, socket
lookups) or raise (the resolver, the kernel, a dial that timed out);
:func:`wire_error` turns any of them into the ``pb.Error`` a front-end sends,
so every front-end and every request words a failure the same way.
"""

from __future__ import annotations

import errno as _errno

from tether.gateway.resolve import HostError
from tether.policy import ResolutionError
from tether.wire import pb


class Refusal(Exception):
    """A request the gateway will not serve, and why (an ``Error`` to be).

    Returned as a value where a caller branches on it (``admit()``, the
    handoff and socket lookups), raised where a caller unwinds (opening a
    UDP association). `rule` and `reason` are the policy's, for a
    ``PERMISSION_DENIED`` it decided; for a ``LIMIT`` or ``QUOTA`` the
    limit's name and value; empty otherwise. A ``QUOTA`` refusal also names
    the `app`, the `window` and when it refills (`retry_after`, seconds).
    """

    def __init__(
        self,
        code: pb.Error.Code.ValueType,
        err: int,
        message: str,
        *,
        rule: str = "",
        reason: str = "",
        window: str = "",
        retry_after: float = 0.0,
        app: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.errno = err
        self.message = message
        self.rule = rule
        self.reason = reason
        self.window = window
        self.retry_after = retry_after
        self.app = app


class DialTimeout(TimeoutError):
    """The outbound connect did not finish within the connect timeout.

    Its own class: a kernel ETIMEDOUT (a TimeoutError too) is an OS error
    and travels as one.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        super().__init__(
            _errno.ETIMEDOUT, f"timed out connecting to {host}:{port} after {timeout:g} s"
        )


Failure = Refusal | ResolutionError | HostError | OSError


def wire_error(failure: Failure) -> pb.Error:
    """The ``Error`` that tells an app about `failure`."""
    if isinstance(failure, Refusal):
        return pb.Error(
            code=failure.code,
            errno=failure.errno,
            message=failure.message,
            rule=failure.rule,
            reason=failure.reason,
            window=failure.window,
            retry_after=failure.retry_after,
            app=failure.app,
        )
    if isinstance(failure, ResolutionError):
        return pb.Error(code=pb.Error.GAI, errno=failure.eai, message=failure.message)
    if isinstance(failure, HostError):
        return pb.Error(code=pb.Error.HOST_NOT_FOUND, errno=failure.herrno, message=str(failure))
    code = pb.Error.TIMEOUT if isinstance(failure, DialTimeout) else pb.Error.SYSTEM
    return pb.Error(
        code=code, errno=failure.errno or _errno.EIO, message=failure.strerror or str(failure)
    )


__all__ = ["DialTimeout", "Failure", "Refusal", "wire_error"]
