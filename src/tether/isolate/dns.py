"""The namespace's DNS responder, sans-I/O: datagrams in, a lookup to make, datagrams out.

Every program in the namespace resolves through ``/etc/resolv.conf``, bound
to ``nameserver 127.0.0.1``, where the agent's UDP socket is. A query for a
name becomes a :class:`Lookup`: the I/O layer asks the *gateway's* resolver
whether the name resolves for this app (so names follow the same rules and
no query leaves by itself), then :meth:`Responder.answer` builds the reply:

- the name resolves: ``A`` gets the name's fake address (names.py), ``AAAA``
  and every other type an empty answer (NOERROR, no data), so clients fall
  back to the ``A`` record and connect to the fake address;
- it does not: NXDOMAIN;
- the gateway could not be asked: SERVFAIL (a client may retry).

``PTR`` for a fake address answers the name it stands for; other reverse
lookups are NXDOMAIN (the namespace has no real addresses to name).
Malformed queries get FORMERR when their header can be read, and are
dropped otherwise; nothing a program sends can raise out of here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from tether.isolate.names import FakeNames, NamesExhaustedError, normalise

# Seconds a program may cache an answer. Short, because whether a name
# resolves is the gateway's to say and may change (its own cache does the
# caching); a fake address itself never goes stale (names.py never reuses one).
ANSWER_TTL = 5
_HEADER = 12  # bytes of a DNS header (RFC 1035 4.1.1)


@dataclass(frozen=True)
class Lookup:
    """A question only the gateway can answer: does `name` resolve for this app?"""

    name: str  # normalised: lower case, no trailing dot
    qtype: int
    query: dns.message.Message


class Responder:
    """Turns queries into replies; holds the fake-address table it answers from."""

    def __init__(self, names: FakeNames) -> None:
        self.names = names

    def receive(self, datagram: bytes) -> bytes | Lookup | None:
        """A reply to send at once, a :class:`Lookup` to make first, or None (drop)."""
        try:
            query = dns.message.from_wire(datagram)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return _formerr(datagram)
        if query.flags & dns.flags.QR:
            return None  # a response, not a query: never answer one (no loops)
        if query.opcode() != dns.opcode.QUERY:
            return _reply(query, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            return _reply(query, dns.rcode.NOTIMP)
        name = question.name
        if question.rdtype == dns.rdatatype.PTR:
            return self._reverse(query, name)
        text = normalise(name.to_text(omit_final_dot=True))
        if not text or text == "@":
            return _reply(query, dns.rcode.NXDOMAIN)  # the root has no address
        return Lookup(text, int(question.rdtype), query)

    def answer(self, lookup: Lookup, resolves: bool) -> bytes:
        """The reply once the gateway said whether the name resolves."""
        query = lookup.query
        if not resolves:
            return _reply(query, dns.rcode.NXDOMAIN)
        if lookup.qtype not in (dns.rdatatype.A, dns.rdatatype.ANY):
            return _reply(query, dns.rcode.NOERROR)  # no data: the client asks for A
        try:
            address = self.names.address_for(lookup.name)
        except NamesExhaustedError:
            return _reply(query, dns.rcode.SERVFAIL)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, ANSWER_TTL, "IN", "A", str(address))
        )
        return _wire(response)

    def failure(self, lookup: Lookup) -> bytes:
        """The reply when the gateway could not be asked."""
        return _reply(lookup.query, dns.rcode.SERVFAIL)

    def _reverse(self, query: dns.message.Message, name: dns.name.Name) -> bytes:
        try:
            address = str(dns.reversename.to_address(name))
        except (dns.exception.DNSException, ValueError):
            return _reply(query, dns.rcode.NXDOMAIN)
        found = self.names.name_of(address) if _is_v4(address) else None
        if found is None:
            return _reply(query, dns.rcode.NXDOMAIN)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, ANSWER_TTL, "IN", "PTR", found + ".")
        )
        return _wire(response)


def _is_v4(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address)
    except ValueError:
        return False


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(rcode)
    return _wire(response)


def _wire(response: dns.message.Message) -> bytes:
    # 512 bytes is the classic UDP limit (RFC 1035 2.3.4); make_response
    # carries the client's EDNS size when it sent one. An answer that does
    # not fit is sent truncated (TC), which tells the client to retry on TCP
    # (which this responder does not serve: a single A record always fits).
    try:
        return response.to_wire()
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire()


def _formerr(datagram: bytes) -> bytes | None:
    """FORMERR echoing the query's id, from the header alone; None if there is no header."""
    if len(datagram) < _HEADER:
        return None
    flags = int.from_bytes(datagram[2:4], "big")
    if flags & 0x8000:
        return None  # QR set: a response; never answer one
    opcode_bits = flags & 0x7800  # opcode, kept as the client sent it
    rd = flags & 0x0100
    out_flags = 0x8000 | opcode_bits | rd | 0x0080 | int(dns.rcode.FORMERR)
    # id, flags, then zero counts: no question echoed back (it could not be read).
    return datagram[:2] + out_flags.to_bytes(2, "big") + bytes(8)

