"""A small authoritative DNS server on loopback, for tests (importable as `dnsserver`).

It answers from a table of records with per-record TTLs, over UDP and TCP on
the same port, in a background thread with real (stdlib) sockets, so it works
the same whether or not tether is installed in the test process::

    from dnsserver import DNSServer

    with DNSServer() as dns_server:
        dns_server.add("www.test", "A", "127.0.0.1", ttl=30)
        dns_server.add("alias.test", "CNAME", "www.test")
        dns_server.add_host("dual.test", "127.0.0.1", "::1")
        dns_server.add_ptr("127.0.0.1", "www.test")
        dns_server.truncate_names.add("big.test")   # TC over UDP; full answer over TCP
        dns_server.rcodes["broken.test"] = dns.rcode.SERVFAIL
        dns_server.silent_names.add("slow.test")    # never answered: client times out
        ... dns_server.address (e.g. "127.0.0.1:40123"), .host, .port ...
        assert dns_server.count("www.test", "A", transport="udp") == 1

Answers follow the usual authoritative rules: a CNAME is followed inside the
table (the chain and the final records in one answer); a name with no
records of any type is NXDOMAIN and one that has records but not of the
asked type is NOERROR with no answer ("no data"), both with the zone's SOA in
the authority section so resolvers can cache the negative answer (RFC 2308:
for `negative_ttl` seconds, the SOA's TTL and MINIMUM). A UDP answer larger
than the client's limit (512 bytes, or its EDNS payload size), or than
`truncate_above` when set, is sent empty with TC set, as a real server does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.reversename
import dns.rrset
from support import Running, StdSocket

__all__ = ["DNSServer", "Query", "Record"]

# The classic DNS UDP payload limit (RFC 1035 section 2.3.4) for clients without EDNS.
_CLASSIC_UDP_LIMIT = 512
# Longest CNAME chain followed inside the table before giving up (loops end here too).
_MAX_CHAIN = 16
# Ports tried for a UDP port whose TCP twin is free too.
_BIND_TRIES = 20


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text.canonicalize()
    return dns.name.from_text(text).canonicalize()


def _rdtype(rdtype: str | int) -> dns.rdatatype.RdataType:
    if isinstance(rdtype, str):
        return dns.rdatatype.from_text(rdtype)
    return dns.rdatatype.RdataType.make(rdtype)


@dataclass(frozen=True)
class Record:
    """One resource record: `value` is its presentation form ("127.0.0.1", "www.test.")."""

    name: str
    rdtype: str
    value: str
    ttl: int = 300


@dataclass(frozen=True)
class Query:
    """One question the server received: name without the final dot, type as text."""

    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"


@dataclass
class _Table:
    records: dict[tuple[dns.name.Name, int], list[tuple[dns.rdata.Rdata, int]]] = field(
        default_factory=dict
    )

    def names(self) -> set[dns.name.Name]:
        return {name for name, _ in self.records}


class DNSServer(Running):
    """A loopback DNS server; see the module docstring. Start it with `with` or start()."""

    def __init__(
        self,
        records: Iterable[Record] = (),
        *,
        host: str = "127.0.0.1",
        zone: str = "test.",
        negative_ttl: int = 60,
        truncate_above: int | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.zone = _name(zone)
        self.negative_ttl = negative_ttl
        self.truncate_above = truncate_above
        # Names (without or with the final dot) whose UDP answers always carry TC.
        self.truncate_names: set[str] = set()
        # Names answered with this rcode and nothing else (SERVFAIL, REFUSED, ...).
        self.rcodes: dict[str, int] = {}
        # Names never answered (a client asking them times out); `silent` ignores every query.
        self.silent_names: set[str] = set()
        self.silent = False
        self.queries: list[Query] = []
        self._table = _Table()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._workers: list[threading.Thread] = []
        # A bug in the server must fail the test, not just time a query out: stop() raises it.
        self.errors: list[BaseException] = []
        for record in records:
            self.add(record.name, record.rdtype, record.value, ttl=record.ttl)

    # -- the table -----------------------------------------------------------

    def add(self, name: str, rdtype: str | int, value: str, *, ttl: int = 300) -> None:
        """Add one record; relative names in `value` are taken as absolute."""
        owner = _name(name)
        kind = _rdtype(rdtype)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, kind, value, origin=dns.name.root, relativize=False
        )
        with self._lock:
            self._table.records.setdefault((owner, kind), []).append((rdata, ttl))

    def add_host(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """Add A and AAAA records for numeric addresses, each by its family."""
        for address in addresses:
            version = ipaddress.ip_address(address).version
            self.add(name, "A" if version == 4 else "AAAA", address, ttl=ttl)

    def add_ptr(self, address: str, name: str, *, ttl: int = 300) -> None:
        """Add the PTR record mapping a numeric address back to `name`."""
        self.add(dns.reversename.from_address(address).to_text(), "PTR", name + ".", ttl=ttl)

    def remove(self, name: str, rdtype: str | int | None = None) -> None:
        """Drop a name's records (of one type, or all of them)."""
        owner = _name(name)
        with self._lock:
            for key in list(self._table.records):
                if key[0] == owner and (rdtype is None or key[1] == _rdtype(rdtype)):
                    del self._table.records[key]

    # -- counting ------------------------------------------------------------

    def count(
        self, name: str | None = None, rdtype: str | None = None, *, transport: str | None = None
    ) -> int:
        """How many queries matched (every filter left as None matches anything)."""
        wanted = name.rstrip(".").lower() if name is not None else None
        with self._lock:
            return sum(
                1
                for q in self.queries
                if (wanted is None or q.name == wanted)
                and (rdtype is None or q.rdtype == rdtype.upper())
                and (transport is None or q.transport == transport)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    # -- life cycle ----------------------------------------------------------

    @property
    def address(self) -> str:
        """`host:port` (`[v6]:port` for an IPv6 host), the form tether's config takes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> DNSServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock_class = StdSocket
        # The kernel picks a free UDP port; the same TCP port may be taken (by any
        # TCP socket, even an outgoing one), so try again with another one then.
        for tries_left in reversed(range(_BIND_TRIES)):
            udp = sock_class(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            tcp = sock_class(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                if not tries_left:
                    raise
                continue
            break
        self.port = udp.getsockname()[1]
        tcp.listen(16)
        self._udp, self._tcp = udp, tcp
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="test-dns-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for worker in self._workers:
            worker.join(5)
        self._workers.clear()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None
        if self.errors:
            raise RuntimeError(f"test DNS server failed: {self.errors[0]!r}") from self.errors[0]

    # -- serving -------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, "udp")
            selector.register(self._tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.data == "udp":
                        self._serve_udp(self._udp)
                    else:
                        conn, _peer = self._tcp.accept()
                        worker = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
                        self._workers.append(worker)
                        worker.start()

    def _serve_udp(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            data, peer = sock.recvfrom(65535)
            reply = self._answer(data, "udp")
            if reply is not None:
                sock.sendto(reply, peer)

    def _serve_tcp(self, conn: socket.socket) -> None:
        # One connection may carry several length-prefixed queries (RFC 7766).
        with conn, contextlib.suppress(OSError):
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    header = _recv_exactly(conn, 2)
                except TimeoutError:
                    continue
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                conn.settimeout(5)
                data = _recv_exactly(conn, length)
                conn.settimeout(0.2)
                if data is None:
                    return
                reply = self._answer(data, "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)

    def _answer(self, data: bytes, transport: str) -> bytes | None:
        try:
            return self._answer_or_raise(data, transport)
        except Exception as exc:
            self.errors.append(exc)
            return None

    def _answer_or_raise(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname = question.name.canonicalize()
        key = qname.to_text(omit_final_dot=True)
        with self._lock:
            self.queries.append(Query(key, dns.rdatatype.to_text(question.rdtype), transport))
            if self.silent or key in _names(self.silent_names):
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            rcode = self.rcodes.get(key, self.rcodes.get(key + "."))
            if rcode is not None:
                response.set_rcode(rcode)
                return response.to_wire()
            self._fill(response, qname, question.rdtype)
            truncate = key in _names(self.truncate_names)
        if transport == "udp":
            limit = query.payload if query.edns >= 0 else _CLASSIC_UDP_LIMIT
            if self.truncate_above is not None:
                limit = min(limit, self.truncate_above)
            # max_size: measure the whole answer here rather than let dnspython raise TooBig.
            wire = response.to_wire(max_size=65535)
            if truncate or len(wire) > limit:
                response.answer.clear()
                response.authority.clear()
                response.additional.clear()
                response.flags |= dns.flags.TC
            return response.to_wire()
        return response.to_wire(max_size=65535)

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, rdtype: int) -> None:
        records = self._table.records
        name = qname
        for _ in range(_MAX_CHAIN):
            found = records.get((name, rdtype))
            if found:
                response.answer.append(_rrset(name, rdtype, found))
                return
            cname = records.get((name, dns.rdatatype.CNAME))
            if not cname or rdtype == dns.rdatatype.CNAME:
                break
            response.answer.append(_rrset(name, dns.rdatatype.CNAME, cname))
            target = cname[0][0]
            assert isinstance(target, dns.rdtypes.ANY.CNAME.CNAME)
            name = target.target.canonicalize()
        else:
            response.set_rcode(dns.rcode.SERVFAIL)
            return
        if name not in self._table.names():
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa())

    def _soa(self) -> dns.rrset.RRset:
        zone = self.zone.to_text()
        soa = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}",
        )
        return _rrset(self.zone, dns.rdatatype.SOA, [(soa, self.negative_ttl)])


def _rrset(
    name: dns.name.Name, rdtype: int, found: list[tuple[dns.rdata.Rdata, int]]
) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype))
    # An RRset has one TTL (RFC 2181 5.2): the smallest of the records'.
    rrset.update_ttl(min(ttl for _, ttl in found))
    for rdata, _ in found:
        rrset.add(rdata)
    return rrset


def _names(names: Iterable[str]) -> Iterator[str]:
    return (name.rstrip(".").lower() for name in names)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)
