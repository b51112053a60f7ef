"""A resolver that answers from a fixed table and never touches the network."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence

from tether.policy._resolution import ResolutionError

__all__ = ["StaticResolver"]


def _key(name: str) -> str:
    # Same comparison getaddrinfo's hosts-file lookup makes: case-insensitive,
    # one trailing dot ignored.
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class StaticResolver:
    """Resolves names from `mapping` (name -> numeric addresses, in order).

    Names match case-insensitively, without a trailing dot. Every address
    must be numeric (checked here, so a typo fails at start-up rather than
    on first use). Unknown names raise ``ResolutionError(EAI_NONAME)``.
    """

    def __init__(self, mapping: Mapping[str, Sequence[str]]) -> None:
        table: dict[str, tuple[str, ...]] = {}
        for name, addresses in mapping.items():
            if isinstance(addresses, str):
                raise TypeError(f"addresses for {name!r} must be a list, not a string")
            for address in addresses:
                try:
                    ipaddress.ip_address(address)
                except ValueError as exc:
                    raise ValueError(
                        f"address {address!r} for {name!r} is not a numeric address"
                    ) from exc
            key = _key(name)
            table[key] = table.get(key, ()) + tuple(addresses)
        self._table = table

    def resolve(self, name: str) -> Sequence[str]:
        addresses = self._table.get(_key(name))
        if not addresses:
            raise ResolutionError(socket.EAI_NONAME, "Name or service not known")
        return addresses

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self._table.get(_key(name)))

    def __repr__(self) -> str:
        return f"StaticResolver({self._table!r})"
