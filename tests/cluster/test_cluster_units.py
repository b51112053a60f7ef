"""The cluster's pure parts: [cluster] config, handoff signatures, link frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.cluster.config import for_worker, parse_cluster
from tether.cluster.link import END, EOF_FRAME, MAX_LINK_FRAME, Deframer, LinkProtocolError, frame
from tether.cluster.signing import sign, verify
from tether.config import parse_config
from tether.errors import ConfigError

KEY = "k" * 32
BASE = {"redis": "redis://127.0.0.1:6379/0", "node_id": "n1",
        "link_listen": "unix:/run/tether/n1.sock", "key": KEY}


def test_no_cluster_table_no_cluster() -> None:
    assert parse_config({}).cluster is None
    assert parse_cluster(None) is None


def test_defaults_and_their_numbers() -> None:
    config = parse_cluster(BASE)
    assert config is not None
    assert (config.heartbeat_interval, config.heartbeat_ttl, config.redis_timeout) == (1, 3, 0.5)
    assert (config.prefix, config.quota_fail, config.lease_fraction) == ("tether:", "closed", 0.1)
    assert config.key == KEY.encode() and not config.tls
    assert "k" * 32 not in repr(config)  # the key never reaches a log line


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"redis": None}, "cluster.redis", "missing"),
    ({"redis": "http://x"}, "cluster.redis", "redis://"),
    ({"node_id": "a b"}, "cluster.node_id", "letters, digits"),
    ({"link_listen": None}, "cluster.link_listen", "missing"),
    ({"link_listen": "127.0.0.1:7341"}, "cluster.tls_cert", "mutual TLS"),
    ({"advertise": "10.0.0.1:7341"}, "cluster.advertise", "same kind"),
    ({"key": "short"}, "cluster.key", "at least 16"),
    ({"key": None}, "cluster.key", "missing"),
    ({"key_file": "/nonexistent/key"}, "cluster.key", "not both"),
    ({"prefix": "a*"}, "cluster.prefix", "without"),
    ({"heartbeat_ttl": 1.5}, "cluster.heartbeat_ttl", "twice"),
    ({"redis_timeout": 0}, "cluster.redis_timeout", "positive"),
    ({"quota_fail": "maybe"}, "cluster.quota_fail", "'closed', 'open'"),
    ({"lease_fraction": 0}, "cluster.lease_fraction", "above 0"),
    ({"tls_ca": "/nonexistent/ca.pem"}, "cluster.tls_ca", "no such file"),
    ({"nodes": 3}, "cluster.nodes", "unknown setting"),
])
def test_bad_values_name_their_key(change: dict[str, Any], path: str, words: str) -> None:
    table = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=words) as caught:
        parse_cluster(table)
    assert caught.value.path == path


def test_key_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_text("a-key-from-a-file-0123456789\n")
    table = {k: v for k, v in BASE.items() if k != "key"}
    config = parse_cluster({**table, "key_file": str(key_file)})
    assert config is not None and config.key == b"a-key-from-a-file-0123456789"


def test_a_worker_is_a_node_of_its_own() -> None:
    config = parse_cluster(BASE)
    assert config is not None
    worker = for_worker(config, 2, "/run/tether/w/worker-2.sock")
    assert worker.node_id == "n1-2" and worker.link_listen.path == "/run/tether/w/worker-2.sock"
    tcp = parse_cluster({**BASE, "link_listen": "unix:/x", "advertise": "unix:/y"})
    assert tcp is not None and for_worker(tcp, 1, "/w1").advertise is not None


# -- signatures ----------------------------------------------------------------------


texts = st.text(min_size=0, max_size=40)


@given(texts, texts, texts)
def test_a_signature_verifies_only_what_it_signed(descriptor: str, token: str, node: str) -> None:
    key = b"s" * 32
    signature = sign(key, descriptor, token, node)
    assert len(signature) == 32
    assert verify(key, descriptor, token, node, signature)
    assert not verify(b"t" * 32, descriptor, token, node, signature)
    assert not verify(key, descriptor + "x", token, node, signature)
    assert not verify(key, descriptor, token, node + "x", signature)
    # The fields are length-prefixed: moving a character across a boundary changes it.
    if token:
        assert not verify(key, descriptor + token[0], token[1:], node, signature)


@given(st.binary(min_size=32, max_size=32), st.integers(0, 31))
def test_a_changed_signature_fails(signature: bytes, i: int) -> None:
    good = sign(b"s" * 32, "d", "t", "n")
    bad = good[:i] + bytes([good[i] ^ 1]) + good[i + 1:]
    assert not verify(b"s" * 32, "d", "t", "n", bad)
    assert verify(b"s" * 32, "d", "t", "n", signature) == (signature == good)


@given(texts, texts, texts, st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8))
def test_a_handoff_names_the_life_of_the_node_that_signed_it(
    descriptor: str, token: str, node: str, life: bytes, other: bytes
) -> None:
    from tether.cluster import signing
    from tether.wire import pb

    key = b"s" * 32
    handoff = pb.Handoff(token=token)
    signing.sign_handoff(key, node, life, handoff, descriptor)
    req = pb.Resume(descriptor=descriptor, token=token, node=node, signature=handoff.signature)
    assert signing.signed_in(key, req) == life
    # Its own node, this life: no refusal; another life: NODE_GONE; another node's: not its say.
    assert signing.restarted(req, node, life, life) is None
    gone = signing.restarted(req, node, other, life)
    assert (gone is None) == (other == life)
    assert gone is None or gone.code == pb.Error.NODE_GONE
    assert signing.restarted(req, node + "x", other, life) is None
    # The life is signed: another one put in front of the MAC does not verify.
    if other != life:
        forged = pb.Resume(descriptor=descriptor, token=token, node=node,
                           signature=other + handoff.signature[8:])
        assert signing.signed_in(key, forged) is None
    for cut in (handoff.signature[:-1], handoff.signature[8:], b""):
        short = pb.Resume(descriptor=descriptor, token=token, node=node, signature=cut)
        assert signing.signed_in(key, short) is None


# -- link frames ---------------------------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_frames_come_out_as_they_went_in_however_split(chunks: list[bytes], data: Any) -> None:
    wire = b"".join(frame(c) for c in chunks) + EOF_FRAME
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    deframer = Deframer()
    out: list[bytes | None] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out += deframer.feed(wire[start:end])
    assert out == [*chunks, END]
    assert deframer.ended


def test_bad_frames_are_refused() -> None:
    with pytest.raises(LinkProtocolError, match="over the limit"):
        Deframer().feed((MAX_LINK_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(LinkProtocolError, match="after the end-of-stream"):
        Deframer().feed(EOF_FRAME + b"x")
    deframer = Deframer()
    deframer.feed(EOF_FRAME)
    with pytest.raises(LinkProtocolError, match="after the end-of-stream"):
        deframer.feed(frame(b"late"))


# -- the handoff token keeps the node and signature ---------------------------------


def test_a_signed_token_carries_the_node_and_signature_and_old_ones_still_read() -> None:
    import hashlib
    import hmac
    import socket
    import struct

    from tether.client import handoff
    from tether.client.settings import Settings
    from tether.client.sock import HandoffState
    from tether.endpoint import parse_endpoint

    settings = Settings(gateway=parse_endpoint("127.0.0.1:1"), app="a", key="key-a")
    state = HandoffState("d" * 22, "t" * 22, socket.AF_INET, socket.SOCK_STREAM, 0, None,
                         ("127.0.0.1", 80), ("127.0.0.1", 5000), tail=b"tail", node="n3",
                         signature=b"\x01" * 32)
    back = handoff.state_from_bytes(handoff.state_to_bytes(state, settings), settings)
    assert (back.node, back.signature, back.tail) == ("n3", b"\x01" * 32, b"tail")
    assert back.resume_request().node == "n3"
    # A token from before the cluster fields: the same body without them, still read.
    token = handoff.state_to_bytes(
        HandoffState(**{**state.__dict__, "node": "", "signature": b""}), settings)
    header = handoff._HEADER
    body = token[header.size:-32]
    old_body = body[:-4]  # an empty node (2 bytes) and an empty signature (2 bytes) dropped
    key = handoff._token_key(settings)
    signed = struct.pack(">4sBI", handoff.TOKEN_MAGIC, handoff.TOKEN_VERSION, len(old_body))
    signed += old_body
    old = signed + hmac.new(key, signed, hashlib.sha256).digest()
    back = handoff.state_from_bytes(old, settings)
    assert (back.node, back.signature, back.tail) == ("", b"", b"tail")


def test_without_a_cluster_no_redis_is_imported() -> None:
    """A gateway without [cluster] does not need redis-py (the `cluster` extra)."""
    import subprocess
    import sys

    code = ("import sys, tether.gateway.server, tether.cli.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis' "
            "or m in ('tether.cluster.node', 'tether.cluster.membership')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# -- the owner's view of a TLS link: LinkTransport -----------------------------------


class _FakeTLS:
    """What LinkTransport uses of a TLS transport, recorded."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class _Loop:
    def __init__(self) -> None:
        self.ready: list[Any] = []

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.ready.append((callback, args))

    def run(self) -> None:
        while self.ready:
            callback, args = self.ready.pop(0)
            callback(*args)


class _Reader:
    """A protocol that pauses reading now and then, as a session does at each request."""

    def __init__(self, pauses: list[bool]) -> None:
        self.got = bytearray()
        self.eof = False
        self.pauses = pauses
        self.transport: Any = None
        self.while_paused = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.transport.is_reading():
            self.while_paused += 1
        self.got += data
        if self.pauses and self.pauses.pop(0):
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pass


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=12), st.data())
def test_a_link_transport_hands_up_what_was_framed_in_order_never_while_paused(
    chunks: list[bytes], data: Any
) -> None:
    from tether.cluster.link import LinkTransport, _Unframe

    loop = _Loop()
    tls = _FakeTLS()
    reader = _Reader(data.draw(st.lists(st.booleans(), max_size=30)))
    unframe = _Unframe(loop, lambda: reader)  # type: ignore[arg-type]
    unframe.connection_made(tls)  # type: ignore[arg-type]
    wire = b"".join(frame(c) for c in chunks) + EOF_FRAME
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        unframe.data_received(wire[start:end])
        loop.run()
        while reader.transport is not None and not reader.transport.is_reading():
            reader.transport.resume_reading()  # the session reads on
            loop.run()
    assert bytes(reader.got) == b"".join(chunks)
    assert reader.eof == (reader.transport is not None)
    assert reader.while_paused == 0
    stream = unframe.stream
    assert isinstance(stream, LinkTransport)
    # Written back: frames; a half-close is the end-of-stream frame, once.
    stream.write(b"answer")
    stream.write_eof()
    stream.write_eof()
    stream.write(b"late")
    assert Deframer().feed(bytes(tls.written)) == [b"answer", END]


# -- membership, against the machine's Redis under a prefix of the test's own --------


def test_membership_beats_lists_and_forgets() -> None:
    import asyncio
    import secrets

    from clustersupport import REDIS_PORT, REDIS_URL, delete_prefix
    from support import require_service

    from tether.cluster.membership import Membership, connect
    from tether.endpoint import parse_endpoint

    require_service(REDIS_PORT, "Redis")
    prefix = f"tether-test-{secrets.token_hex(6)}:"

    def config(node: str, ttl: float) -> Any:
        return parse_cluster({**BASE, "redis": REDIS_URL, "prefix": prefix, "node_id": node,
                              "heartbeat_interval": ttl / 3, "heartbeat_ttl": ttl})

    async def main() -> None:
        a_config, b_config = config("a", 30.0), config("b", 0.3)
        client = connect(a_config)
        a = Membership(client, a_config, parse_endpoint("unix:/run/a.sock"))
        b = Membership(client, b_config, parse_endpoint("10.0.0.2:7341"))
        await b.beat()
        seen = await a.beat()
        assert {n: str(e) for n, e in seen.items()} == {
            "a": "unix:/run/a.sock", "b": "10.0.0.2:7341"}
        assert str(await a.address("b")) == "10.0.0.2:7341"
        # b stops beating: within its 0.3 s TTL it is gone from the list and its key.
        for _ in range(100):
            if set(await a.members()) == {"a"}:
                break
            await asyncio.sleep(0.05)
        assert set(await a.members()) == {"a"}
        assert await a.address("b") is None
        assert set(await a.beat()) == {"a"}  # the expired entry is dropped, not listed
        await a.leave()
        assert await a.members() == {} and await a.address("a") is None
        await client.aclose()

    try:
        asyncio.run(main())
    finally:
        delete_prefix(prefix)
