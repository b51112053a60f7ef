"""The admin session's HTTP handling without sockets: any split, any bytes (Hypothesis).

An :class:`~tether.gateway.admin.AdminSession` is driven with a transport
that records what it is told, on a gateway core that is never started (its
loop only schedules the read timeout, which never runs here). What the
session writes is read back with an h11 client, so every answer is checked
to be well-formed HTTP/1.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.config import parse_config
from tether.endpoint import Endpoint
from tether.gateway.admin import MAX_REQUEST_HEAD, AdminServer, AdminSession
from tether.gateway.core.gateway import GatewayCore


class RecordingTransport:
    """What an asyncio transport is asked to do, for one session."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


@pytest.fixture(scope="module")
def server() -> Iterator[AdminServer]:
    loop = asyncio.new_event_loop()
    core = GatewayCore(parse_config({"apps": {"a": {"key": "key-a"}}}))
    core.loop = loop
    try:
        yield AdminServer(core, Endpoint(host="127.0.0.1", port=0))
    finally:
        loop.close()


def run(
    server: AdminServer, chunks: list[bytes], methods: list[str] | None = None
) -> tuple[RecordingTransport, list[h11.Response]]:
    """Feed `chunks` to a new session; its answers, read as answers to `methods` (GET)."""
    session = AdminSession(server)
    transport = RecordingTransport()
    session.connection_made(transport)  # type: ignore[arg-type]
    try:
        for chunk in chunks:
            if transport.closing:
                break
            if chunk:  # asyncio never delivers b"" (h11 would read it as the end)
                session.data_received(chunk)
    finally:
        session.connection_lost(None)
    return transport, responses(bytes(transport.written), methods or [])


def responses(data: bytes, methods: list[str]) -> list[h11.Response]:
    """Every response in `data`, parsed by an h11 client (fails on malformed HTTP) as the
    answers to requests of `methods` (then GET): a HEAD's answer has no body."""
    client = h11.Connection(h11.CLIENT)
    methods = list(methods)
    found: list[h11.Response] = []
    client.receive_data(data)
    client.receive_data(b"")
    while True:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        if client.our_state is h11.IDLE:
            method = methods.pop(0) if methods else "GET"
            client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            # EOF where the next response would start is the end; anything
            # else left unparsed is malformed output.
            if not client.trailing_data[0]:
                return found
            raise
        if isinstance(event, h11.Response):
            found.append(event)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
            return found


REQUESTS = {
    "/healthz": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "/readyz": (b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "/metrics": (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", 200),
    "head": (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "404": (b"GET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "405": (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
}
METHOD = {name: data.split(b" ", 1)[0].decode() for name, (data, _) in REQUESTS.items()}


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)],
                                                strict=True)]
    )


@st.composite
def pipelined(draw: st.DrawFn) -> tuple[list[bytes], list[str], list[int]]:
    names = draw(st.lists(st.sampled_from(sorted(REQUESTS)), min_size=1, max_size=5))
    data = b"".join(REQUESTS[n][0] for n in names)
    return draw(splits(data)), [METHOD[n] for n in names], [REQUESTS[n][1] for n in names]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(pipelined())
def test_any_split_of_pipelined_requests_gets_the_same_answers(
    server: AdminServer, case: tuple[list[bytes], list[str], list[int]]
) -> None:
    chunks, methods, statuses = case
    transport, answers = run(server, chunks, methods)
    assert [r.status_code for r in answers] == statuses
    assert not transport.closing  # keep-alive: the connection stays for the next scrape
    assert transport.reading


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_any_bytes_get_a_well_formed_answer_or_none(
    server: AdminServer, chunks: list[bytes]
) -> None:
    transport, answers = run(server, chunks)  # raises on malformed output
    for answer in answers[:-1]:
        assert answer.status_code in (200, 404, 405)
    if transport.closing and answers:
        assert answers[-1].status_code in (200, 400, 404, 405, 413, 431, 501, 505)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.integers(1, 64))
def test_an_unfinished_head_is_refused_past_the_limit_in_any_pieces(
    server: AdminServer, pieces: int
) -> None:
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * (2 * MAX_REQUEST_HEAD)
    size = -(-len(head) // pieces)
    transport, answers = run(server, [head[i:i + size] for i in range(0, len(head), size)])
    assert [a.status_code for a in answers] == [431]
    assert transport.closing


def test_a_failing_collector_is_a_500_not_a_dead_connection(
    server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("collector bug")

    broken = AdminServer(server.core, Endpoint(host="127.0.0.1", port=0))
    broken.registry.register(Broken())  # type: ignore[arg-type]
    transport, answers = run(broken, [REQUESTS["/metrics"][0] + REQUESTS["/healthz"][0]])
    assert [a.status_code for a in answers] == [500, 200]
    assert b"collecting the metrics failed: RuntimeError('collector bug')" in transport.written
    assert any("/metrics failed" in r.getMessage() for r in caplog.records)
