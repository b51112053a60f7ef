"""The one mapping of gateway failures onto the wire (tether.gateway.core.errors)."""

from __future__ import annotations

import errno
import socket

import pytest

from tether.gateway.core.errors import DialTimeout, Failure, Refusal, wire_error
from tether.gateway.resolve import HostError
from tether.policy import ResolutionError
from tether.wire import pb

CASES: list[tuple[str, Failure, pb.Error]] = [
    (
        "policy refusal: rule and reason travel apart from the message",
        Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES, "tether: connection to x:1 denied",
                rule="deny 10.0.0.0/8", reason="10.0.0.0/8 is private-use (RFC 1918)"),
        pb.Error(code=pb.Error.PERMISSION_DENIED, errno=errno.EACCES,
                 message="tether: connection to x:1 denied", rule="deny 10.0.0.0/8",
                 reason="10.0.0.0/8 is private-use (RFC 1918)"),
    ),
    (
        "refusal without a rule",
        Refusal(pb.Error.NOT_FOUND, errno.EBADF, "tether: no socket abc... for app 'a'"),
        pb.Error(code=pb.Error.NOT_FOUND, errno=errno.EBADF,
                 message="tether: no socket abc... for app 'a'"),
    ),
    (
        "resolution: the EAI code",
        ResolutionError(socket.EAI_NONAME, "Name or service not known"),
        pb.Error(code=pb.Error.GAI, errno=socket.EAI_NONAME, message="Name or service not known"),
    ),
    (
        "reverse lookup: the h_errno",
        HostError(1, "Unknown host"),
        pb.Error(code=pb.Error.HOST_NOT_FOUND, errno=1, message="Unknown host"),
    ),
    (
        "the connect timeout",
        DialTimeout("example.test", 443, 2.5),
        pb.Error(code=pb.Error.TIMEOUT, errno=errno.ETIMEDOUT,
                 message="timed out connecting to example.test:443 after 2.5 s"),
    ),
    (
        "a kernel ETIMEDOUT is an OS error, not the connect timeout",
        TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
        pb.Error(code=pb.Error.SYSTEM, errno=errno.ETIMEDOUT, message="Connection timed out"),
    ),
    (
        "an OS error: errno and strerror",
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        pb.Error(code=pb.Error.SYSTEM, errno=errno.ECONNREFUSED, message="Connection refused"),
    ),
    (
        "an OS error without an errno: EIO and its text",
        OSError("no errno here"),
        pb.Error(code=pb.Error.SYSTEM, errno=errno.EIO, message="no errno here"),
    ),
]


@pytest.mark.parametrize(("failure", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wire_error(failure: Failure, expected: pb.Error) -> None:
    assert wire_error(failure) == expected


def test_a_refusal_can_be_raised_and_reads_as_its_message() -> None:
    with pytest.raises(Refusal, match=r"^tether: nope$") as info:
        raise Refusal(pb.Error.INVALID_REQUEST, errno.EINVAL, "tether: nope")
    assert (info.value.code, info.value.errno) == (pb.Error.INVALID_REQUEST, errno.EINVAL)
