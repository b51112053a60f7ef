"""The namespace's DNS responder (sans-I/O): every query shape, and bytes that are no query."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.isolate.dns import ANSWER_TTL, Lookup, Responder
from tether.isolate.names import FakeNames


def query(name: str, rdtype: str, **kw: object) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]


def parse(reply: bytes | Lookup | None) -> dns.message.Message:
    assert isinstance(reply, bytes), reply
    return dns.message.from_wire(reply)


def looked_up(responder: Responder, q: dns.message.Message, resolves: bool) -> dns.message.Message:
    lookup = responder.receive(q.to_wire())
    assert isinstance(lookup, Lookup)
    return parse(responder.answer(lookup, resolves))


def test_a_name_the_gateway_resolves_gets_its_fake_address() -> None:
    responder = Responder(FakeNames())
    q = query("Web.Test.", "A")
    lookup = responder.receive(q.to_wire())
    assert isinstance(lookup, Lookup)
    assert (lookup.name, lookup.qtype) == ("web.test", dns.rdatatype.A)
    reply = parse(responder.answer(lookup, True))
    assert reply.id == q.id and reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA
    [rrset] = reply.answer
    assert rrset.ttl == ANSWER_TTL
    assert [r.to_text() for r in rrset] == ["198.18.0.1"]
    # asked again (another case): the same address
    again = looked_up(responder, query("web.test", "A"), True)
    assert [r.to_text() for r in again.answer[0]] == ["198.18.0.1"]


@pytest.mark.parametrize(
    ("rdtype", "resolves", "rcode", "answers"),
    [
        ("A", False, dns.rcode.NXDOMAIN, 0),
        ("AAAA", True, dns.rcode.NOERROR, 0),  # no data: the client falls back to A
        ("AAAA", False, dns.rcode.NXDOMAIN, 0),
        ("MX", True, dns.rcode.NOERROR, 0),
        ("TXT", False, dns.rcode.NXDOMAIN, 0),
        ("ANY", True, dns.rcode.NOERROR, 1),
    ],
)
def test_answers_by_type_and_gateway_verdict(
    rdtype: str, resolves: bool, rcode: dns.rcode.Rcode, answers: int
) -> None:
    reply = looked_up(Responder(FakeNames()), query("web.test", rdtype), resolves)
    assert reply.rcode() == rcode
    assert len(reply.answer) == answers


def test_gateway_unreachable_is_servfail() -> None:
    responder = Responder(FakeNames())
    q = query("web.test", "A")
    lookup = responder.receive(q.to_wire())
    assert isinstance(lookup, Lookup)
    reply = parse(responder.failure(lookup))
    assert (reply.id, reply.rcode()) == (q.id, dns.rcode.SERVFAIL)


def test_full_fake_range_is_servfail() -> None:
    import ipaddress

    responder = Responder(FakeNames(ipaddress.IPv4Network("198.18.0.0/31")))  # none usable
    assert looked_up(responder, query("web.test", "A"), True).rcode() == dns.rcode.SERVFAIL


def test_reverse_lookups() -> None:
    names = FakeNames()
    responder = Responder(names)
    looked_up(responder, query("web.test", "A"), True)
    fake = parse(responder.receive(query("1.0.18.198.in-addr.arpa", "PTR").to_wire()))
    assert [r.to_text() for r in fake.answer[0]] == ["web.test."]
    for other in ("2.0.18.198.in-addr.arpa", "1.0.0.127.in-addr.arpa", "not.a.reverse.name"):
        reply = parse(responder.receive(query(other, "PTR").to_wire()))
        assert reply.rcode() == dns.rcode.NXDOMAIN, other


def _with_two_questions() -> bytes:
    q = query("a.test", "A")
    q.question.append(dns.rrset.RRset(dns.name.from_text("b.test"), dns.rdataclass.IN,
                                      dns.rdatatype.A))
    return q.to_wire()


def _opcode(opcode: dns.opcode.Opcode) -> bytes:
    q = query("a.test", "A")
    q.set_opcode(opcode)
    return q.to_wire()


def _response() -> bytes:
    q = query("a.test", "A")
    return dns.message.make_response(q).to_wire()


@pytest.mark.parametrize(
    ("wire", "rcode"),
    [
        (_with_two_questions(), dns.rcode.FORMERR),
        (_opcode(dns.opcode.NOTIFY), dns.rcode.NOTIMP),
        (query("a.test", "A", rdclass="CH").to_wire(), dns.rcode.NOTIMP),
        (query(".", "A").to_wire(), dns.rcode.NXDOMAIN),
        (b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\xff", dns.rcode.FORMERR),
    ],
)
def test_queries_answered_at_once(wire: bytes, rcode: dns.rcode.Rcode) -> None:
    reply = Responder(FakeNames()).receive(wire)
    assert isinstance(reply, bytes)
    assert reply[:2] == wire[:2]  # the query's id
    assert reply[3] & 0x0F == rcode


@pytest.mark.parametrize("wire", [b"", b"\x00" * 11, _response()])
def test_dropped(wire: bytes) -> None:
    assert Responder(FakeNames()).receive(wire) is None


@given(st.binary(max_size=600))
def test_no_bytes_raise(data: bytes) -> None:
    out = Responder(FakeNames()).receive(data)
    if isinstance(out, bytes):
        assert out[:2] == data[:2]
        assert out[2] & 0x80  # a response
    elif isinstance(out, Lookup):
        assert out.name


names_st = st.lists(st.text(alphabet="abcxyz09-", min_size=1, max_size=12), min_size=1,
                    max_size=4).map(".".join)


@given(names_st, st.sampled_from(["A", "AAAA", "MX", "TXT", "SRV", "HTTPS"]), st.booleans())
def test_any_name_and_type_gets_a_matching_reply(name: str, rdtype: str, resolves: bool) -> None:
    responder = Responder(FakeNames())
    q = query(name, rdtype)
    reply = looked_up(responder, q, resolves)
    assert reply.id == q.id
    assert reply.question == q.question
    expected = dns.rcode.NOERROR if resolves else dns.rcode.NXDOMAIN
    assert reply.rcode() == expected
    if resolves and rdtype == "A":
        assert responder.names.name_of(reply.answer[0][0].to_text()) == name.lower()
