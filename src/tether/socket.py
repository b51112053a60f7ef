"""Drop-in replacement for the standard :mod:`socket` module.

Every public name of the stdlib module is re-exported (programmatically, so
nothing is forgotten on a newer Python); the names that touch the network
are replaced by tether's: the ``socket`` class, ``create_connection``,
``create_server`` (refused: outbound only) and the resolver functions. The
exception classes are the stdlib's own objects, so ``except socket.timeout``
or ``except OSError`` catch what tether raises.
"""

from __future__ import annotations

import errno as _errno
import socket as _std
from typing import Any as _Any

from tether.client.dgram import DatagramSocket as _DatagramSocket  # noqa: F401 - registers UDP
from tether.client.resolve import (  # noqa: F401 - re-exported in __all__
    getaddrinfo,
    getfqdn,
    gethostbyaddr,
    gethostbyname,
    gethostbyname_ex,
    getnameinfo,
)
from tether.client.sock import socket

# Every public attribute, not only __all__: the stdlib module also offers
# SocketIO, MsgFlag, AddressInfo and a few errno names outside its __all__,
# and code that imports tether.socket in its place may use them.
for _name in dir(_std):
    if not _name.startswith("_") and _name not in globals():
        _value = getattr(_std, _name)
        if not isinstance(_value, type(_std)):  # the modules socket.py itself imports
            globals()[_name] = _value

SocketType = _std.SocketType
_GLOBAL_DEFAULT_TIMEOUT = _std._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]

# Names this module replaces; everything else in __all__ is the stdlib's object.
OVERRIDDEN = (
    "socket",
    "create_connection",
    "create_server",
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname_ex",
    "gethostbyaddr",
    "getnameinfo",
    "getfqdn",
)


def create_connection(
    address: tuple[str, int],
    timeout: _Any = _GLOBAL_DEFAULT_TIMEOUT,
    source_address: tuple[str, int] | None = None,
    *,
    all_errors: bool = False,
) -> socket:
    """The stdlib's algorithm: try each address getaddrinfo() gives, in order."""
    host, port = address
    exceptions: list[OSError] = []
    for family, type_, proto, _canonname, sockaddr in getaddrinfo(host, port, 0, SOCK_STREAM):  # type: ignore[name-defined]  # noqa: F821
        sock = None
        try:
            sock = socket(family, type_, proto)
            if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            exceptions.clear()  # break reference cycles, as the stdlib does
            return sock
        except OSError as exc:
            if not all_errors:
                exceptions.clear()
            exceptions.append(exc)
            if sock is not None:
                sock.close()
    if exceptions:
        try:
            if not all_errors:
                raise exceptions[0]
            raise ExceptionGroup("create_connection failed", exceptions)
        finally:
            exceptions.clear()
    raise OSError("getaddrinfo returns an empty list")


def create_server(address: _Any, *args: _Any, **kwargs: _Any) -> _Any:
    """Refused: tether sockets are outbound only (no listen, no bind)."""
    raise OSError(
        _errno.EOPNOTSUPP,
        f"tether: sockets are outbound only; create_server({address!r}) is not supported",
    )


__all__ = list(_std.__all__)
