"""A tiny authoritative DNS server on loopback UDP, for `tether demo`.

It answers A queries for the names it is given (and NXDOMAIN for the rest)
with dnspython's message API, in a thread. It exists so the demo can show
an unmodified dnspython query travelling through a tether UDP socket
without asking any real DNS server.
"""

from __future__ import annotations

import _socket
import threading
from collections.abc import Mapping
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# Answers are small and short-lived: the demo asks once.
TTL = 60
MAX_QUERY = 512  # a classic DNS UDP message (RFC 1035 section 4.2.1)


class DNSServer:
    """``with DNSServer({"www.test": "127.0.0.1"}) as dns: dns.port``."""

    def __init__(self, names: Mapping[str, str], host: str = "127.0.0.1") -> None:
        self.names = {name.rstrip(".").lower() + ".": addr for name, addr in names.items()}
        # The C-level socket: a server must not go through tether when the
        # stdlib module is patched (tether.install()).
        self.sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.queries = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="demo-dns", daemon=True)

    def __enter__(self) -> DNSServer:
        self._thread.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # close() does not wake a thread blocked in recvfrom: a datagram does.
        self._stopping = True
        waker = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            waker.sendto(b"", self.sock.getsockname())
        finally:
            waker.close()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(MAX_QUERY)
            except OSError:
                return
            if self._stopping:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # not DNS: ignore it, as a real server would
            self.queries += 1
            self.sock.sendto(self._answer(query).to_wire(), client)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        # A question is an RRset with no records: falsy, so compare with None.
        question = query.question[0] if query.question else None
        address = None if question is None else self.names.get(str(question.name).lower())
        if question is None or address is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(
                dns.rrset.from_text(question.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, address)
            )
        return response


__all__ = ["DNSServer"]
