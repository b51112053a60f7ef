"""A resolver backed by the C library's getaddrinfo (production only).

It sends real DNS queries for names not in /etc/hosts, so tests must not
use it except for ``localhost``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from tether.policy._resolution import ResolutionError

__all__ = ["SystemResolver"]


class SystemResolver:
    """Resolves with ``socket.getaddrinfo`` (blocking; both families).

    AI_ADDRCONFIG leaves out a family the machine has no address for, as
    an ordinary client's lookup would, so the gateway does not pick IPv6
    answers it cannot reach.
    """

    def resolve(self, name: str) -> Sequence[str]:
        try:
            infos = socket.getaddrinfo(
                name, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
            )
        except socket.gaierror as exc:
            code = exc.errno if exc.errno is not None else socket.EAI_FAIL
            raise ResolutionError(code, exc.strerror or str(exc)) from exc
        addresses: list[str] = []
        for family, _type, _proto, _canonname, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise ResolutionError(socket.EAI_NONAME, "Name or service not known")
        return addresses
