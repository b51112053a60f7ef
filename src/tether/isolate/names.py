"""The namespace's fake addresses: one per name asked for, mapped back at connect.

A program inside the namespace asks DNS for ``api.example.com``; the answer
is an address from a reserved range that stands for that name only. When
the program connects to it, the agent reads the original destination, finds
the name again and asks the gateway to connect *by name*, so the policy's
rules written for names apply, and the gateway (not the namespace) decides
which real address the name has today.

The range is 198.18.0.0/15 (RFC 2544, reserved for benchmarking by RFC
5735/6890): it is never routed on the Internet and no real service lives
there, so a fake address can never hide a real destination a program might
also dial by number; it holds 131,070 usable addresses, far more names than
one command asks for.
"""

from __future__ import annotations

import ipaddress

FAKE_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


class NamesExhaustedError(OSError):
    """Every address of the fake range has been handed out in this namespace."""


def normalise(name: str) -> str:
    """A DNS name as the table keys it: lower case, no trailing dot."""
    return name.rstrip(".").lower()


class FakeNames:
    """A two-way table name <-> fake IPv4 address, filled on first ask, never reused.

    An address keeps its name for the namespace's whole life, so a program
    that cached an answer still reaches the same name. Pure: no I/O.
    """

    def __init__(self, network: ipaddress.IPv4Network = FAKE_RANGE) -> None:
        self.network = network
        self._first = int(network.network_address) + 1  # skip the network address
        self._last = int(network.broadcast_address) - 1  # and the broadcast address
        self._next = self._first
        self._by_name: dict[str, ipaddress.IPv4Address] = {}
        self._by_address: dict[ipaddress.IPv4Address, str] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        """The name's fake address, handing out the next one on first ask."""
        key = normalise(name)
        found = self._by_name.get(key)
        if found is not None:
            return found
        if self._next > self._last:
            raise NamesExhaustedError(
                f"tether isolate: all {self._last - self._first + 1} fake addresses of "
                f"{self.network} are handed out; cannot give one to {key!r}"
            )
        address = ipaddress.IPv4Address(self._next)
        self._next += 1
        self._by_name[key] = address
        self._by_address[address] = key
        return address

    def is_fake(self, address: str) -> bool:
        """Whether `address` is in the fake range (handed out or not)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return isinstance(ip, ipaddress.IPv4Address) and ip in self.network

    def name_of(self, address: str) -> str | None:
        """The name `address` was handed out for, or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if not isinstance(ip, ipaddress.IPv4Address):
            return None
        return self._by_address.get(ip)
