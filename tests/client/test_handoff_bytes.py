"""The handoff token: a handed-off socket as signed plain data, not a pickle.

Property tests of the format (tether.client.handoff.state_to_bytes /
state_from_bytes): random states round-trip; any single-bit flip, any
truncation, another app's key, another app's name are refused with
HandoffTokenError before the body is read; tails up to MiBs are kept. Then
live, against an in-thread gateway: to_bytes moves a socket like pickle,
from_bytes resumes it once, with no byte lost. Between processes through a
Redis list: tests/integration/test_handoff_queue.py.
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import TIMEOUT, Peer, embedded_gateway, recv_exact, stream

from tether.client import handoff
from tether.client.handoff import (
    TOKEN_MAGIC,
    TOKEN_VERSION,
    HandoffState,
    HandoffTokenError,
    state_from_bytes,
    state_to_bytes,
)
from tether.client.settings import Settings
from tether.endpoint import parse_endpoint

MiB = 1024 * 1024
GATEWAY = parse_endpoint("127.0.0.1:1")  # never dialled: the format needs no gateway
APP_A = Settings(gateway=GATEWAY, app="a", key="key-a")
APP_B = Settings(gateway=GATEWAY, app="b", key="key-b")

_text = st.text(max_size=40)
_addr = st.one_of(
    st.tuples(_text, st.integers(0, 65535)),
    st.tuples(_text, st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.just(()),
)
states = st.builds(
    HandoffState,
    descriptor=_text,
    token=_text,
    family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    type=st.sampled_from([socket.SOCK_STREAM, socket.SOCK_STREAM | socket.SOCK_NONBLOCK]),
    proto=st.sampled_from([0, socket.IPPROTO_TCP]),
    timeout=st.none() | st.floats(0, 1e9),
    peer=_addr,
    local=_addr,
    options=st.lists(st.binary(max_size=30), max_size=4).map(tuple),
    tail=st.binary(max_size=2048),
    origin=_text,
)


@given(states)
def test_random_states_round_trip(state: HandoffState) -> None:
    data = state_to_bytes(state, APP_A)
    assert data.startswith(TOKEN_MAGIC + bytes([TOKEN_VERSION]))
    assert state_from_bytes(data, APP_A) == state


@settings(max_examples=300)
@given(states, st.data())
def test_any_single_bit_flip_is_refused(state: HandoffState, data: st.DataObject) -> None:
    token = bytearray(state_to_bytes(state, APP_A))
    bit = data.draw(st.integers(0, len(token) * 8 - 1), label="bit")
    token[bit // 8] ^= 1 << (bit % 8)
    # Each part of the header has its own words; past it, only the signature
    # is checked: the body is never parsed unverified.
    where = bit // 8
    expect = (
        "not a handoff token"
        if where < 4
        else "version"
        if where == 4
        else "truncated|longer"
        if where < 9
        else "signature does not match"
    )
    with pytest.raises(HandoffTokenError, match=expect):
        state_from_bytes(bytes(token), APP_A)


@given(states, st.data())
def test_any_truncation_or_extension_is_refused(state: HandoffState, data: st.DataObject) -> None:
    token = state_to_bytes(state, APP_A)
    cut = data.draw(st.integers(0, len(token) - 1), label="cut")
    with pytest.raises(HandoffTokenError, match=r"truncated|header"):
        state_from_bytes(token[:cut], APP_A)
    with pytest.raises(HandoffTokenError, match="longer than its header says"):
        state_from_bytes(token + data.draw(st.binary(min_size=1, max_size=8)), APP_A)


@given(states)
def test_another_apps_key_or_name_is_refused(state: HandoffState) -> None:
    token = state_to_bytes(state, APP_A)
    with pytest.raises(HandoffTokenError, match="signature does not match for app 'b'"):
        state_from_bytes(token, APP_B)
    # The same key under another name derives another signing key.
    with pytest.raises(HandoffTokenError, match="signature does not match"):
        state_from_bytes(token, Settings(gateway=GATEWAY, app="a2", key="key-a"))
    with pytest.raises(HandoffTokenError, match="signature does not match"):
        state_from_bytes(token, Settings(gateway=GATEWAY, app="a", key="key-a "))


@settings(max_examples=10, deadline=None)
@given(size=st.integers(0, 4 * MiB), seed=st.integers(0, 2**32))
def test_large_tails_are_kept(size: int, seed: int) -> None:
    tail = random.Random(seed).randbytes(size)
    state = HandoffState(
        "d" * 22,
        "t" * 22,
        socket.AF_INET,
        socket.SOCK_STREAM,
        0,
        None,
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        tail=tail,
    )
    token = state_to_bytes(state, APP_A)
    assert len(token) < size + 200  # the token adds ~100 bytes of fields and a 32-byte MAC
    assert state_from_bytes(token, APP_A).tail == tail


def _token(body: bytes, version: int = TOKEN_VERSION, magic: bytes = TOKEN_MAGIC) -> bytes:
    import hashlib
    import hmac

    signed = struct.pack(">4sBI", magic, version, len(body)) + body
    key = hmac.new(b"key-a", b"tether handoff token v1\0a", hashlib.sha256).digest()
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def test_errors_say_what_is_wrong_in_plain_words() -> None:
    state = HandoffState("d", "t", socket.AF_INET, socket.SOCK_STREAM, 0, 1.5, ("h", 1), ())
    token = state_to_bytes(state, APP_A)
    assert issubclass(HandoffTokenError, ValueError)
    with pytest.raises(HandoffTokenError, match=r"not a handoff token: it starts with b'\\x80"):
        state_from_bytes(pickle.dumps(state), APP_A)  # a pickle is not a token
    with pytest.raises(HandoffTokenError, match=r"version 2 is not supported .*reads version 1"):
        state_from_bytes(token[:4] + b"\x02" + token[5:], APP_A)
    with pytest.raises(HandoffTokenError, match="truncated: 3 bytes, shorter than its 9-byte"):
        state_from_bytes(token[:3], APP_A)
    with pytest.raises(HandoffTokenError, match=f"truncated: {len(token) - 1} bytes, expected"):
        state_from_bytes(token[:-1], APP_A)
    with pytest.raises(HandoffTokenError, match="app 'a' has no key to sign"):
        state_to_bytes(state, Settings(gateway=GATEWAY, app="a", key=""))
    # Signed with the right key but malformed inside (only a writer with the key
    # can make one): still a HandoffTokenError, never a struct or index error.
    good_body = token[9:-32]
    with pytest.raises(HandoffTokenError, match="shorter than its fields"):
        state_from_bytes(_token(good_body[:-1]), APP_A)
    with pytest.raises(HandoffTokenError, match="bytes after its last field"):
        state_from_bytes(_token(good_body + b"x"), APP_A)
    # The app inside must be the verifier's, even with a shared key.
    other = state_to_bytes(state, Settings(gateway=GATEWAY, app="b", key="key-a"))
    with pytest.raises(HandoffTokenError, match="signature"):
        state_from_bytes(other, APP_A)


def test_the_token_carries_no_key() -> None:
    state = HandoffState("d", "t", socket.AF_INET, socket.SOCK_STREAM, 0, None, (), ())
    secret = Settings(gateway=GATEWAY, app="a", key="s3cr3t-key-value")
    assert b"s3cr3t" not in state_to_bytes(state, secret)


# -- live: a socket moved as bytes, in one process ------------------------------------


@pytest.fixture
def embedded() -> Iterator[tuple[Any, Settings]]:
    with embedded_gateway() as (gw, gw_settings):
        yield gw, gw_settings


def test_to_bytes_moves_a_socket_and_from_bytes_resumes_it_once(
    embedded: tuple[Any, Settings],
) -> None:
    import tether.socket as tsock

    down = stream(b"down", 0, 2 * MiB)

    def peer(conn: socket.socket) -> bytes:
        conn.sendall(down)
        return recv_exact(conn, 5)

    with Peer(peer) as p:
        sock = tsock.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
        first = recv_exact(sock, 1000)
        data = handoff.to_bytes(sock)
        assert not data.startswith(b"\x80")  # not a pickle
        with pytest.raises(OSError, match="handed off"):
            sock.recv(1)
        resumed = handoff.from_bytes(data)
        with resumed:
            assert resumed.gettimeout() == TIMEOUT
            assert first + recv_exact(resumed, len(down) - 1000) == down
            resumed.sendall(b"hello")
            with pytest.raises(OSError) as again:
                handoff.from_bytes(data)
            assert again.value.errno == errno.EINVAL
            assert "already resumed" in str(again.value)
    assert p.result == b"hello"


def test_tampered_bytes_are_refused_and_the_token_stays_usable(
    embedded: tuple[Any, Settings],
) -> None:
    import tether.socket as tsock

    with Peer(lambda conn: conn.sendall(b"x" + conn.recv(1))) as p:
        sock = tsock.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
        data = handoff.to_bytes(sock)
        forged = bytearray(data)
        forged[-40] ^= 1
        with pytest.raises(HandoffTokenError):
            handoff.from_bytes(bytes(forged))
        with handoff.from_bytes(data) as resumed:
            resumed.sendall(b"y")
            assert recv_exact(resumed, 2) == b"xy"


def test_to_bytes_of_an_aio_state_and_of_hand_off(embedded: tuple[Any, Settings]) -> None:
    """A HandoffState (what hand_off and tether.aio's hand_off return) signs as it is."""
    import tether.socket as tsock

    with Peer(lambda conn: conn.sendall(b"ab" + conn.recv(1))) as p:
        sock = tsock.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
        with contextlib.closing(sock):
            state = handoff.hand_off(sock)
        with handoff.from_bytes(handoff.to_bytes(state)) as resumed:
            resumed.sendall(b"c")
            assert recv_exact(resumed, 3) == b"abc"


def test_an_asyncio_connection_moves_as_bytes(tethered: Any) -> None:
    """tether.aio.hand_off's state signs with to_bytes; aio's resume takes state_from_bytes."""
    import asyncio

    import tether.aio

    down = stream(b"aio-bytes", 0, 300_000)

    def peer(conn: socket.socket) -> bytes:
        conn.sendall(down)
        return recv_exact(conn, 4)

    with Peer(peer) as p:

        async def main() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            first = await reader.readexactly(10_000)
            data = handoff.to_bytes(await tether.aio.hand_off(writer))
            reader2, writer2 = await tether.aio.resume(handoff.state_from_bytes(data))
            rest = await reader2.readexactly(len(down) - len(first))
            writer2.write(b"done")
            await writer2.drain()
            writer2.close()
            return first + rest

        assert asyncio.run(main()) == down
    assert p.result == b"done"
