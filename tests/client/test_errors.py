"""Gateway errors -> exceptions (client/errors.py): every code, its class, errno and words.

The table is checked against the protocol's own list of codes, so a code
added to tether.proto fails here until it is given its exception.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
from typing import Any

import pytest

import tether
from tether.client.errors import broke_protocol, closed, gateway_error, unreachable
from tether.errors import LimitExceeded, NodeGone, PolicyDenied, QuotaExceeded
from tether.wire import RemoteProtocolError, pb

GW = "127.0.0.1:7000"
E = pb.Error
DENIAL = (
    "tether: connection to 127.0.0.1:25 denied for app 'tests': port 25 is denied "
    "(rule: deny port 25)"
)

LIMIT = "tether: app 'tests' has 100 open sockets, its max_sockets; close one first"
QUOTA = (
    "tether: app 'tests' is over its connects_per_minute quota (60 a minute, "
    "quota.connects_per_minute); it has room again in 0.5 s"
)
NODE_GONE = (
    "tether: the socket's node 'n2' has left the cluster (no heartbeat for 3 s): the socket "
    "was lost with it (a TCP connection lives in one kernel)"
)

# code, errno sent, message sent, rule sent, target -> class (exactly), errno, text (strerror
# or, for the classes that have none, str())
DRAINING = ("tether: gateway h-1 is draining (shutting down) and accepts no new connections; "
            "retry on another gateway")
TABLE: list[tuple[int, int, str, str, str, type[BaseException], int | None, str]] = [
    (E.CODE_UNSPECIFIED, 0, "", "", "", OSError, errno.EIO,
     f"tether: gateway {GW} failed the request"),
    (E.CODE_UNSPECIFIED, errno.ECONNREFUSED, "", "", "", ConnectionRefusedError,
     errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)),
    (E.CODE_UNSPECIFIED, errno.EPIPE, "the pipe", "", "", BrokenPipeError, errno.EPIPE,
     "the pipe"),
    (E.PERMISSION_DENIED, errno.EACCES, DENIAL, "deny port 25", "127.0.0.1:25", PolicyDenied,
     errno.EACCES, DENIAL),
    (E.PERMISSION_DENIED, errno.EACCES, "tether: socket 0123abcd... belongs to another app",
     "", "", PermissionError, errno.EACCES, "tether: socket 0123abcd... belongs to another app"),
    (E.AUTH_FAILED, 0, "tether: app 'x' authentication failed", "", "", PermissionError,
     errno.EACCES, "tether: app 'x' authentication failed"),
    (E.SYSTEM, errno.ECONNREFUSED, "refused", "", "example.test:80", ConnectionRefusedError,
     errno.ECONNREFUSED,
     f"{os.strerror(errno.ECONNREFUSED)}: example.test:80 (via tether gateway {GW})"),
    (E.SYSTEM, errno.EHOSTUNREACH, "", "", "[::1]:80", OSError, errno.EHOSTUNREACH,
     f"{os.strerror(errno.EHOSTUNREACH)}: [::1]:80 (via tether gateway {GW})"),
    (E.SYSTEM, errno.EAFNOSUPPORT, "tether: h has no IPv4 address the policy allows", "", "",
     OSError, errno.EAFNOSUPPORT, "tether: h has no IPv4 address the policy allows"),
    (E.SYSTEM, 0, "odd", "", "example.test:80", OSError, errno.EIO, "odd"),
    (E.GAI, socket.EAI_NONAME, "nowhere.test: Name or service not known", "", "",
     socket.gaierror, socket.EAI_NONAME, "nowhere.test: Name or service not known"),
    (E.HOST_NOT_FOUND, 1, "host not found", "", "", socket.herror, 1, "host not found"),
    (E.HOST_NOT_FOUND, 0, "host not found", "", "", socket.herror, 1, "host not found"),
    (E.TIMEOUT, errno.ETIMEDOUT, "dial timed out", "", "example.test:80", TimeoutError, None,
     "timed out"),
    (E.PROTOCOL, 0, "out of order: Connect twice", "", "", ConnectionError, errno.EPROTO,
     f"out of order: Connect twice (gateway {GW})"),
    (E.VERSION_MISMATCH, 0, "client speaks version 2, gateway version 1", "", "",
     ConnectionError, errno.EPROTO, f"client speaks version 2, gateway version 1 (gateway {GW})"),
    (E.INVALID_REQUEST, 0, "bad value", "", "", OSError, errno.EINVAL, "bad value"),
    (E.INVALID_REQUEST, errno.ENOPROTOOPT, "no such option", "", "", OSError,
     errno.ENOPROTOOPT, "no such option"),
    (E.NOT_FOUND, errno.EBADF, "tether: no socket 0123abcd...", "", "", OSError, errno.EBADF,
     "tether: no socket 0123abcd..."),
    (E.UNSUPPORTED, 0, "not offered", "", "", OSError, errno.EOPNOTSUPP, "not offered"),
    (E.CLOSED, errno.ECONNRESET, "tether: socket to h:1 was reclaimed", "", "",
     ConnectionResetError, errno.ECONNRESET, "tether: socket to h:1 was reclaimed"),
    (E.ALREADY_RESUMED, 0, "token used", "", "", OSError, errno.EINVAL, "token used"),
    (E.LIMIT, errno.EMFILE, LIMIT, "max_sockets", "127.0.0.1:80", LimitExceeded, errno.EMFILE,
     LIMIT),
    (E.NODE_GONE, errno.EHOSTDOWN, NODE_GONE, "", "", NodeGone, errno.ECONNRESET, NODE_GONE),
    (E.QUOTA, errno.EDQUOT, QUOTA, "connects_per_minute", "127.0.0.1:80", QuotaExceeded,
     errno.EDQUOT, QUOTA),
    # A draining gateway: refused, retry elsewhere (docs/workers.md).
    (E.UNAVAILABLE, errno.ECONNREFUSED, DRAINING, "", "127.0.0.1:80", ConnectionRefusedError,
     errno.ECONNREFUSED, DRAINING),
]


def test_quota_exceeded_names_the_app_limit_value_window_and_refill() -> None:
    err = pb.Error(code=E.QUOTA, errno=errno.EDQUOT, message=QUOTA, rule="connects_per_minute",
                   reason="60", window="minute", retry_after=0.5, app="tests")
    exc = gateway_error(err, GW, "127.0.0.1:80")
    assert isinstance(exc, QuotaExceeded) and isinstance(exc, LimitExceeded)
    assert isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    assert (exc.app, exc.limit, exc.value, exc.window, exc.retry_after) == (
        "tests", "connects_per_minute", 60, "minute", 0.5)
    assert exc.strerror == QUOTA
    assert tether.QuotaExceeded is QuotaExceeded
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is QuotaExceeded
    assert (back.errno, back.strerror, back.app, back.limit, back.value, back.window,
            back.retry_after) == (errno.EDQUOT, QUOTA, "tests", "connects_per_minute", 60,
                                  "minute", 0.5)


def test_node_gone_names_the_node() -> None:
    exc = gateway_error(pb.Error(code=E.NODE_GONE, message=NODE_GONE), GW)
    assert isinstance(exc, NodeGone) and isinstance(exc, ConnectionResetError)
    assert exc.node == "n2"
    assert pickle.loads(pickle.dumps(exc)).node == "n2"


def test_the_table_covers_every_code() -> None:
    assert {row[0] for row in TABLE} == set(pb.Error.Code.values())


@pytest.mark.parametrize(
    ("code", "errno_sent", "message", "rule", "target", "cls", "errno_raised", "text"),
    TABLE,
    ids=[f"{E.Code.Name(r[0])}-{i}" for i, r in enumerate(TABLE)],  # type: ignore[arg-type]
)
def test_gateway_error(
    code: Any,
    errno_sent: int,
    message: str,
    rule: str,
    target: str,
    cls: type[BaseException],
    errno_raised: int | None,
    text: str,
) -> None:
    err = pb.Error(code=code, errno=errno_sent, message=message, rule=rule)
    exc = gateway_error(err, GW, target)
    assert type(exc) is cls
    assert exc.errno == errno_raised
    assert (exc.strerror if exc.strerror is not None else str(exc)) == text


def test_policy_denied_is_a_permission_error_with_the_same_words() -> None:
    err = pb.Error(code=E.PERMISSION_DENIED, errno=errno.EACCES, message=DENIAL,
                   rule="deny port 25", reason="port 25 is denied")
    exc = gateway_error(err, GW, "127.0.0.1:25")
    assert isinstance(exc, PolicyDenied) and isinstance(exc, PermissionError)
    assert (exc.rule, exc.reason) == ("deny port 25", "port 25 is denied")
    assert str(exc) == str(PermissionError(errno.EACCES, DENIAL))  # as before it had a class
    assert exc.args == (errno.EACCES, DENIAL)
    assert tether.PolicyDenied is PolicyDenied
    with pytest.raises(PermissionError):
        raise exc


def test_policy_denied_reason_is_empty_from_a_gateway_that_sends_none() -> None:
    err = pb.Error(code=E.PERMISSION_DENIED, errno=errno.EACCES, message=DENIAL, rule="r")
    exc = gateway_error(err, GW)
    assert isinstance(exc, PolicyDenied) and (exc.rule, exc.reason) == ("r", "")


def test_policy_denied_pickles_with_its_details() -> None:
    exc = PolicyDenied(DENIAL, "deny port 25", "port 25 is denied")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is PolicyDenied
    assert (back.errno, back.strerror, back.rule, back.reason) == (
        errno.EACCES, DENIAL, "deny port 25", "port 25 is denied")


def test_limit_exceeded_is_an_emfile_oserror_naming_the_limit() -> None:
    err = pb.Error(code=E.LIMIT, errno=errno.EMFILE, message=LIMIT, rule="max_sockets",
                   reason="100")
    exc = gateway_error(err, GW, "127.0.0.1:80")
    assert isinstance(exc, LimitExceeded) and type(exc).__mro__[1] is OSError
    assert (exc.errno, exc.strerror, exc.limit, exc.value) == (
        errno.EMFILE, LIMIT, "max_sockets", 100)
    with pytest.raises(OSError, match="max_sockets"):
        raise exc
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.errno, back.limit, back.value) == (
        LimitExceeded, errno.EMFILE, "max_sockets", 100)
    # From a gateway that names no value: 0.
    assert gateway_error(pb.Error(code=E.LIMIT, message=LIMIT), GW).value == 0  # type: ignore[attr-defined]


def test_stream_failures_have_one_wording() -> None:
    gone = closed(GW)
    assert type(gone) is ConnectionResetError and gone.errno == errno.ECONNRESET
    assert gone.strerror == f"tether: gateway {GW} closed the stream"
    broken = broke_protocol(GW, RemoteProtocolError("frame of 99999 bytes is over the limit"))
    assert type(broken) is ConnectionError and broken.errno == errno.EPROTO
    assert broken.strerror == (
        f"tether: gateway {GW} broke the protocol: frame of 99999 bytes is over the limit")
    away = unreachable(GW, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert type(away) is ConnectionError and away.errno == errno.ECONNREFUSED
    assert away.strerror == f"tether: gateway {GW} unreachable: Connection refused"
