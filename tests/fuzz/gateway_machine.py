"""A fuzz target for the gateway: random and mutated frame sequences on real streams.

A Hypothesis rule-based state machine opens streams to an in-process gateway
(the real server, TetherSession front-end and core, in a thread) and sends
them well-formed frames (hellos good and bad, connects, resumes, every
request), the same frames mutated (bit flips, truncation, inserted bytes,
a forged length prefix) and random bytes, reads what comes back, half-closes
and closes streams. After every step and every sequence it checks:

- the gateway never raises out of its loop: no exception reaches the loop's
  exception handler, and no "internal error" (or any ERROR) is logged;
- it always answers or closes a stream: once the app half-closes, every
  stream ends (EOF or reset) within a deadline;
- it leaks nothing: with every stream closed and idle sockets swept, the
  registry and ``core.streams`` are empty and no task is left pending;
- memory stays bounded and is returned: what the gateway's streams hold
  unsent is bounded at every step, and after a sequence no TetherSession
  object is left alive (the runner in tests/fuzz/run.py also records the
  process's RSS).

Every step is recorded as plain data (:data:`Op`), so a failing sequence,
once shrunk, is replayed by :func:`replay` in tests/gateway/test_fuzz_regressions.py
without Hypothesis. Messages are kept as protobuf text of a ``Frame``; the
echo peer's port, a closed port, descriptors and tokens the gateway handed
out are placeholders bound when the step runs (ports differ per run).

Network: the gateway's policy allows 127.0.0.0/8 and ::1 only and its
resolver is static, so no sequence, however mutated, reaches another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import re
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import FakeClock

from tether.config import parse_config
from tether.gateway.embedded import EmbeddedGateway
from tether.gateway.frontends.tether import TetherSession
from tether.wire import PREAMBLE, encode_frame, pb

# -- placeholders, bound when a step runs -------------------------------------

ECHO_PORT = 1_000_001  # the echo peer (uint32 holds it; no real port is this high)
CLOSED_PORT = 1_000_002  # a loopback port nothing listens on
_REF = re.compile(r"^\$([DT])(-?\d+)$")  # "$D3": the 4th descriptor seen; "$T0": the 1st token

APPS = {"a": "key-a", "b": "key-b"}
ADMIN_KEY = "key-admin"

# Bounds, for a sequence and for the checks. A stream must end within
# CLOSE_DEADLINE of its half-close (the gateway's own dial timeout below is
# 2 s, so an answer that waits on a dial comes well within it).
MAX_STREAMS = 6
CLOSE_DEADLINE = 6.0
SETTLE_DEADLINE = 5.0
# What the gateway may hold unsent for the fuzzer's streams at any step: the
# fuzzer reads everything, so more than this is a buffer growing unbounded.
MAX_UNSENT = 8 * 1024 * 1024

# Op: one recorded step, plain data.
#   ("open", preamble)              a new stream; sends b"TTHR" first if preamble
#   ("msg", i, frame_text, mutations) one frame on stream i (placeholders bound),
#                                   then mutated: (("flip", n) | ("cut", n) | ("ins", n, byte) |
#                                   ("len", n)) with n taken modulo the frame's length
#   ("raw", i, data)                bytes as they are
#   ("recv", i)                     read what has arrived on stream i
#   ("shut", i)                     half-close stream i
#   ("close", i, reset)             close stream i (reset: SO_LINGER 0, an RST)
#   ("sweep", seconds)              move the gateway's clock and reclaim idle sockets
Op = tuple[Any, ...]


class FuzzFailure(AssertionError):
    """An invariant the gateway broke; the message names it and the stream."""


# -- the echo peer --------------------------------------------------------------


class EchoServer:
    """A loopback peer that echoes each connection until its EOF, then closes."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name="fuzz-echo", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            while data := conn.recv(65536):
                conn.sendall(data)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the gateway under test -------------------------------------------------------


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {exc})\n" + "".join(
                traceback.format_exception(exc)[-6:]
            )
        self.records.append(text)


@dataclass
class Target:
    """One embedded gateway, its echo peer and what its loop reported."""

    gw: EmbeddedGateway
    clock: FakeClock
    echo: EchoServer
    closed_port: int
    loop_errors: list[str] = field(default_factory=list)
    log_errors: _Errors = field(default_factory=_Errors)
    baseline_tasks: int = 0

    @property
    def core(self) -> Any:
        assert self.gw.gateway is not None
        return self.gw.gateway

    @property
    def address(self) -> tuple[str, int]:
        endpoint = self.gw.endpoints[0]
        return (endpoint.host, endpoint.port)

    def take_failures(self) -> list[str]:
        """What the loop and the log reported since the last call (each reported once)."""
        failures = [f"loop: {e}" for e in self.loop_errors] + [
            f"log: {e}" for e in self.log_errors.records
        ]
        self.loop_errors.clear()
        self.log_errors.records.clear()
        return failures

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.log_errors)
        self.gw.stop()
        self.echo.listener.close()


def start_target() -> Target:
    config = parse_config(
        {
            "gateway": {
                "listen": ["127.0.0.1:0"],
                "connect_timeout": 2,
                "admin_key": ADMIN_KEY,
                "max_frame": 4096,  # small, so the over-limit path is reached often
            },
            "resolver": {"mode": "static"},
            "policy": {"allow": ["127.0.0.0/8:*", "[::1]:*"]},
            "apps": {name: {"key": key} for name, key in APPS.items()},
        }
    )
    clock = FakeClock()
    gw = EmbeddedGateway(config, clock=clock)
    gw.start()
    target = Target(gw=gw, clock=clock, echo=EchoServer(), closed_port=_closed_port())

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        target.loop_errors.append(f"{context.get('message')}: {exc!r}")

    def setup() -> int:
        asyncio.get_running_loop().set_exception_handler(handler)
        return len(asyncio.all_tasks())

    target.baseline_tasks = gw.call(setup)
    logging.getLogger().addHandler(target.log_errors)
    return target


_shared: Target | None = None
_shared_lock = threading.Lock()


def shared_target() -> Target:
    """The process's one fuzz gateway: started on first use, reused by every sequence."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = start_target()
        return _shared


def stop_shared_target() -> None:
    """Stop the process's fuzz gateway (a test module's end); the next use starts another."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.stop()
            _shared = None


# -- one sequence -----------------------------------------------------------------


@dataclass
class _Stream:
    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    framed: bool = True  # still parsing frames from the gateway
    ended: bool = False  # EOF or reset seen
    shut: bool = False
    closed: bool = False


class Sequence:
    """Runs ops against a target, recording them; :meth:`finish` checks the end state."""

    def __init__(self, target: Target) -> None:
        self.target = target
        target.take_failures()  # a failed sequence's leftovers are not this one's
        self.ops: list[Op] = []
        self.streams: list[_Stream] = []
        self.descriptors: list[str] = []
        self.tokens: list[str] = []
        self.errors: list[str] = []  # the gateway's error messages, in the order read

    # -- ops --------------------------------------------------------------

    def run(self, op: Op) -> None:
        self.ops.append(op)
        kind = op[0]
        if kind == "open":
            self._open(bool(op[1]))
        elif kind == "msg":
            self._send(op[1], mutate(self._frame(op[2]), op[3]))
        elif kind == "raw":
            self._send(op[1], bytes(op[2]))
        elif kind == "recv":
            self._recv(op[1], 0.01)
        elif kind == "shut":
            self._shut(op[1])
        elif kind == "close":
            self._close(op[1], bool(op[2]))
        elif kind == "sweep":
            self.target.clock.advance(float(op[1]))
            self.target.gw.call(self.target.core.sweep)
        else:
            raise ValueError(f"unknown fuzz op {op!r}")
        self.check_loop()

    def _open(self, preamble: bool) -> None:
        sock = socket.create_connection(self.target.address, timeout=5)
        sock.setblocking(False)
        self.streams.append(_Stream(sock))
        if preamble:
            self._send(len(self.streams) - 1, PREAMBLE)

    def _stream(self, i: int) -> _Stream | None:
        if not self.streams:
            return None
        s = self.streams[i % len(self.streams)]
        return None if s.closed else s

    def _send(self, i: int, data: bytes) -> None:
        s = self._stream(i)
        if s is None or s.shut or s.ended:
            return
        view = memoryview(data)
        deadline = time.monotonic() + 2
        while view and time.monotonic() < deadline:
            try:
                n = s.sock.send(view)
            except BlockingIOError:
                # The gateway is not reading (paused, or not yet): read its
                # answers meanwhile so neither side waits on the other.
                self._recv(i, 0.01)
                continue
            except OSError:
                s.ended = True
                return
            view = view[n:]
        self.target.gw.call(lambda: None)  # the gateway has read and dispatched them
        self._recv(i, 0.005)

    def _recv(self, i: int, wait: float) -> None:
        s = self._stream(i)
        if s is None or s.ended:
            return
        ready, _, _ = select.select([s.sock], [], [], wait)
        while ready:
            try:
                chunk = s.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                s.ended = True
                break
            if not chunk:
                s.ended = True
                break
            if s.framed:
                s.received += chunk
                self._harvest(s)
            ready, _, _ = select.select([s.sock], [], [], 0)

    def _harvest(self, s: _Stream) -> None:
        """Descriptors and tokens the gateway sent, for later frames to use."""
        buf = s.received
        while s.framed and len(buf) >= 4:
            length = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + length:
                return
            frame = pb.Frame()
            try:
                frame.ParseFromString(bytes(buf[4 : 4 + length]))
            except DecodeError:
                s.framed = False
                return
            del buf[: 4 + length]
            kind = frame.WhichOneof("msg")
            message = getattr(frame, kind) if kind else None
            if kind == "error":
                self.errors.append(frame.error.message)
            elif message is not None and message.HasField("error"):
                self.errors.append(message.error.message)
            if kind == "connect_result":
                result = frame.connect_result
                if result.descriptor:
                    self.descriptors.append(result.descriptor)
                if not result.HasField("error") and not result.HasField("relay"):
                    s.framed = False  # raw bytes from here on
            elif kind == "response" and frame.response.HasField("handoff"):
                self.tokens.append(frame.response.handoff.token)

    def _shut(self, i: int) -> None:
        s = self._stream(i)
        if s is None or s.shut:
            return
        s.shut = True
        with contextlib.suppress(OSError):
            s.sock.shutdown(socket.SHUT_WR)

    def _close(self, i: int, reset: bool) -> None:
        s = self._stream(i)
        if s is None:
            return
        if reset:
            with contextlib.suppress(OSError):
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.sock.close()
        s.closed = True

    def _frame(self, text: str) -> bytes:
        frame = pb.Frame()
        text_format.Parse(text, frame)
        _bind(frame, self)
        kind = frame.WhichOneof("msg")
        if kind is None:
            return encode_frame(pb.Error())  # an empty Frame cannot be built by encode_frame
        message = getattr(frame, kind)
        return encode_frame(message)

    def ref(self, kind: str, n: int) -> str:
        pool = self.descriptors if kind == "D" else self.tokens
        return pool[n % len(pool)] if pool else ""

    # -- checks -----------------------------------------------------------

    def check_loop(self) -> None:
        failures = self.target.take_failures()
        if failures:
            raise FuzzFailure(
                "the gateway raised out of its loop or logged an error:\n" + "\n".join(failures)
            )
        assert self.target.gw._thread is not None and self.target.gw._thread.is_alive(), (
            "the gateway's thread died"
        )

    def check_memory(self) -> None:
        def unsent() -> int:
            return sum(
                t.get_write_buffer_size() for t in self.target.core.streams if not t.is_closing()
            )

        held = self.target.gw.call(unsent)
        if held > MAX_UNSENT:
            raise FuzzFailure(
                f"the gateway holds {held} unsent bytes for its streams (bound {MAX_UNSENT})"
            )

    def finish(self) -> None:
        """Half-close every stream; each must end; then nothing may be left behind.

        Every check runs, and the gateway is brought back to empty, before
        the first problem is raised: the next sequence starts clean.
        """
        problems: list[str] = []
        for i, s in enumerate(self.streams):
            if s.closed:
                continue
            self._shut(i)
            deadline = time.monotonic() + CLOSE_DEADLINE
            while not s.ended and time.monotonic() < deadline:
                self._recv(i, 0.05)
            if not s.ended:
                problems.append(
                    f"stream {i} was neither answered to its end nor closed "
                    f"{CLOSE_DEADLINE:g} s after the app half-closed it"
                )
        for i, s in enumerate(self.streams):
            if not s.closed:
                self._close(i, reset=False)
        target = self.target
        core = target.core
        problems += _settle(
            target,
            lambda: not core.streams,
            "app streams still open at the gateway",
            lambda: f"{len(core.streams)} streams",
        )
        target.clock.advance(10 * 365 * 86400)  # past any idle timeout: sweep the handed-off
        target.gw.call(core.sweep)
        problems += _settle(
            target,
            lambda: len(core.registry) == 0,
            "socket records left in the registry",
            lambda: ", ".join(f"{r.descriptor[:8]} {r.state}" for r in core.registry),
        )
        problems += _settle(
            target,
            lambda: len(asyncio.all_tasks()) <= target.baseline_tasks,
            "tasks left pending",
            lambda: repr(asyncio.all_tasks()),
        )
        problems += _settle(
            target,
            _no_live_sessions,
            "session objects still alive",
            lambda: f"{_live_sessions()} TetherSession objects",
        )
        problems += [
            f"the gateway raised out of its loop or logged an error: {f}"
            for f in target.take_failures()
        ]
        if problems:
            raise FuzzFailure("\n".join(problems))


def _live_sessions() -> int:
    gc.collect()
    return sum(isinstance(o, TetherSession) for o in gc.get_objects())


def _no_live_sessions() -> bool:
    """Memory is returned: every closed stream's session object is gone (not just unlisted)."""
    return _live_sessions() == 0


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _settle(
    target: Target, predicate: Callable[[], bool], what: str, detail: Callable[[], str]
) -> list[str]:
    """[] once predicate() holds on the gateway's loop; else what is left, in words."""
    if _wait(lambda: target.gw.call(predicate), SETTLE_DEADLINE):
        return []
    return [f"{what} {SETTLE_DEADLINE:g} s after every stream closed: {target.gw.call(detail)}"]


def _bind(message: Message, seq: Sequence) -> None:
    """Replace placeholders (ports, "$D0", "$T0") in `message` and its sub-messages."""
    for fd, value in message.ListFields():
        if fd.message_type is not None:
            values = [value] if isinstance(value, Message) else list(value)
            for sub in values:
                _bind(sub, seq)
        elif fd.name == "port" and value in (ECHO_PORT, CLOSED_PORT):
            port = seq.target.echo.port if value == ECHO_PORT else seq.target.closed_port
            setattr(message, fd.name, port)
        elif isinstance(value, str) and (m := _REF.match(value)):
            setattr(message, fd.name, seq.ref(m.group(1), int(m.group(2))))


def mutate(data: bytes, mutations: tuple[tuple[Any, ...], ...] | list[Any]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        if not out:
            break
        kind, n = m[0], int(m[1])
        if kind == "flip":
            bit = n % (len(out) * 8)
            out[bit // 8] ^= 1 << (bit % 8)
        elif kind == "cut":
            del out[n % len(out) :]
        elif kind == "ins":
            out.insert(n % (len(out) + 1), int(m[2]) & 0xFF)
        elif kind == "len":  # a forged length prefix
            out[:4] = (n & 0xFFFFFFFF).to_bytes(4, "big")
        else:
            raise ValueError(f"unknown mutation {m!r}")
    return bytes(out)


def replay(ops: list[Op] | tuple[Op, ...], target: Target | None = None) -> Sequence:
    """Run a recorded sequence and its end checks; raises FuzzFailure if the gateway fails."""
    seq = Sequence(target or shared_target())
    for op in ops:
        seq.run(op)
        seq.check_memory()
    seq.finish()
    return seq


# -- strategies: frames as protobuf text ---------------------------------------------

_texts = st.text(max_size=24) | st.sampled_from(["", "a\nforged line", "\x00", "é" * 40])
_descriptor = st.sampled_from(["$D0", "$D1", "$D2", "$D-1"]) | _texts
_token = st.sampled_from(["$T0", "$T1"]) | _texts
_u32 = st.integers(0, 2**32 - 1)
_port = st.sampled_from([ECHO_PORT, ECHO_PORT, CLOSED_PORT, 0, 65535, 65536]) | _u32
_host = st.sampled_from(
    [
        "127.0.0.1",
        "127.0.0.1",
        "::1",
        "localhost",
        "nonexistent.invalid",
        "",
        "256.0.0.1",
        "127.0.0.1%lo",
        "[::1]",
        "::ffff:127.0.0.1",
    ]
)
_family = st.sampled_from([pb.FAMILY_INET, pb.FAMILY_INET6, 0]) | st.integers(0, 9)
_transport = st.sampled_from([pb.TRANSPORT_TCP, pb.TRANSPORT_TCP, pb.TRANSPORT_UDP]) | st.integers(
    0, 5
)
_double = st.sampled_from([0.0, 0.5, -1.0, math.inf, math.nan, 1e308]) | st.floats()
_i64 = st.sampled_from([0, 1, -1, 2**31, 2**63 - 1]) | st.integers(-(2**63), 2**63 - 1)


@st.composite
def _option(draw: st.DrawFn) -> pb.OptionValue:
    return pb.OptionValue(
        name=draw(st.integers(0, 12)),
        int_value=draw(_i64),
        linger_on=draw(st.booleans()),
        linger_seconds=draw(st.integers(-(2**31), 2**31 - 1)),
    )


@st.composite
def _address(draw: st.DrawFn) -> pb.Address:
    return pb.Address(family=draw(_family), host=draw(_host), port=draw(_port))


def _frame(**kw: Any) -> pb.Frame:
    return pb.Frame(**kw)


@st.composite
def hello_frames(draw: st.DrawFn) -> pb.Frame:
    app = draw(st.sampled_from(["a", "a", "b", "*", "zz", ""]) | _texts)
    key = {**APPS, "*": ADMIN_KEY}.get(app, "")
    key = draw(st.sampled_from([key, key, key, "wrong", ""]))
    return _frame(
        client_hello=pb.ClientHello(
            protocol_version=draw(st.sampled_from([1, 1, 1, 0, 2]) | _u32),
            app=app,
            key=key,
            client_version=draw(_texts),
        )
    )


@st.composite
def connect_frames(draw: st.DrawFn) -> pb.Frame:
    connect = pb.Connect(
        transport=draw(_transport),
        family=draw(_family),
        host=draw(_host),
        port=draw(_port),
        timeout=draw(_double),
        options=draw(st.lists(_option(), max_size=3)),
    )
    if draw(st.booleans()):
        connect.source.CopyFrom(draw(_address()))
    return _frame(connect=connect)


@st.composite
def resume_frames(draw: st.DrawFn) -> pb.Frame:
    return _frame(
        resume=pb.Resume(
            descriptor=draw(_descriptor),
            token=draw(_token),
            tail_length=draw(
                st.sampled_from([0, 1, 5, 4096, 2**64 - 1]) | st.integers(0, 2**64 - 1)
            ),
        )
    )


@st.composite
def request_frames(draw: st.DrawFn) -> pb.Frame:
    d = draw(_descriptor)
    op = draw(
        st.sampled_from(
            [
                "getaddrinfo",
                "gethostbyname",
                "gethostbyaddr",
                "getnameinfo",
                "set_option",
                "get_option",
                "detach",
                "close_reason",
                "touch",
                "list_sockets",
                "allow_destination",
            ]
        )
    )
    req = pb.Request(id=draw(st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)))
    if op == "getaddrinfo":
        req.getaddrinfo.SetInParent()
        req.getaddrinfo.host = draw(_host)
        req.getaddrinfo.has_host = draw(st.booleans())
        req.getaddrinfo.port = draw(st.sampled_from(["", "80", "http", "x" * 30]))
        req.getaddrinfo.has_port = draw(st.booleans())
        req.getaddrinfo.family = draw(_family)
        req.getaddrinfo.socktype = draw(st.integers(0, 6))
        req.getaddrinfo.proto = draw(st.integers(-(2**31), 2**31 - 1))
        for flag in ("passive", "canonname", "numerichost", "numericserv", "all"):
            setattr(req.getaddrinfo, flag, draw(st.booleans()))
    elif op == "gethostbyname":
        req.gethostbyname.name = draw(_host)
    elif op == "gethostbyaddr":
        req.gethostbyaddr.address = draw(_host)
    elif op == "getnameinfo":
        req.getnameinfo.address.CopyFrom(draw(_address()))
        for flag in ("numerichost", "numericserv", "namereqd", "nofqdn", "dgram"):
            setattr(req.getnameinfo, flag, draw(st.booleans()))
    elif op == "set_option":
        req.set_option.descriptor = d
        req.set_option.value.CopyFrom(draw(_option()))
    elif op == "get_option":
        req.get_option.descriptor = d
        req.get_option.name = draw(st.integers(0, 12))
    elif op == "detach":
        req.detach.descriptor = d
    elif op == "close_reason":
        req.close_reason.descriptor = d
    elif op == "touch":
        req.touch.descriptor = d
    elif op == "list_sockets":
        req.list_sockets.SetInParent()
    else:
        req.allow_destination.host = draw(_host)
        req.allow_destination.port = draw(_port)
    return _frame(request=req)


@st.composite
def other_frames(draw: st.DrawFn) -> pb.Frame:
    """Frames only the gateway may send, an Error, or an empty Frame."""
    kind = draw(st.sampled_from(["error", "server_hello", "connect_result", "response", "empty"]))
    if kind == "error":
        return _frame(error=pb.Error(code=draw(st.integers(0, 20)), message=draw(_texts)))
    if kind == "server_hello":
        return _frame(server_hello=pb.ServerHello(protocol_version=1))
    if kind == "connect_result":
        return _frame(connect_result=pb.ConnectResult(descriptor=draw(_descriptor)))
    if kind == "response":
        return _frame(response=pb.Response(id=1, done=True))
    return pb.Frame()


frames = hello_frames() | connect_frames() | resume_frames() | request_frames() | other_frames()
mutations = st.lists(
    st.tuples(st.just("flip"), st.integers(0, 2**16))
    | st.tuples(st.just("cut"), st.integers(0, 2**16))
    | st.tuples(st.just("ins"), st.integers(0, 2**16), st.integers(0, 255))
    | st.tuples(st.just("len"), st.sampled_from([0, 1, 4096, 4097, 2**31, 2**32 - 1])),
    max_size=3,
)
# Half the steps go to the newest stream, so a session's steps follow one another.
_stream_index = st.just(-1) | st.integers(0, MAX_STREAMS - 1)


def frame_text(frame: pb.Frame) -> str:
    return text_format.MessageToString(frame, as_one_line=True)


class GatewayFuzz(RuleBasedStateMachine):
    """The state machine: every rule is one recorded op on the shared fuzz gateway."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = Sequence(shared_target())

    def _run(self, op: Op) -> None:
        try:
            self.seq.run(op)
        except BaseException:
            note(f"fuzz sequence as data ({len(self.seq.ops)} ops): {self.seq.ops!r}")
            raise

    @precondition(lambda self: len(self.seq.streams) < MAX_STREAMS)
    @rule(preamble=st.booleans() | st.just(True))
    def open(self, preamble: bool) -> None:
        self._run(("open", preamble))

    # Well-formed steps, so sequences reach relaying, detached and resumed
    # sockets often (random frames alone almost never authenticate first).

    @precondition(lambda self: len(self.seq.streams) < MAX_STREAMS)
    @rule(app=st.sampled_from(["a", "a", "b", "*"]), dial=st.booleans())
    def open_session(self, app: str, dial: bool) -> None:
        """A stream with a good hello; with `dial`, relaying to the echo peer too."""
        self._run(("open", True))
        hello = pb.ClientHello(protocol_version=1, app=app, key={**APPS, "*": ADMIN_KEY}[app])
        self._run(("msg", -1, frame_text(_frame(client_hello=hello)), ()))
        if dial:
            connect = pb.Connect(
                transport=pb.TRANSPORT_TCP, family=pb.FAMILY_INET, host="127.0.0.1", port=ECHO_PORT
            )
            self._run(("msg", -1, frame_text(_frame(connect=connect)), ()))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(
        i=_stream_index,
        host=st.sampled_from(["127.0.0.1", "::1", "localhost"]),
        port=st.sampled_from([ECHO_PORT, ECHO_PORT, CLOSED_PORT]),
        options=st.lists(_option(), max_size=2),
    )
    def connect(self, i: int, host: str, port: int, options: list[pb.OptionValue]) -> None:
        family = pb.FAMILY_INET6 if host == "::1" else pb.FAMILY_INET
        connect = pb.Connect(
            transport=pb.TRANSPORT_TCP, family=family, host=host, port=port, options=options
        )
        self._run(("msg", i, frame_text(_frame(connect=connect)), ()))

    def _own_stream(self, app: str | None) -> int:
        """-1 after opening a new stream for `app` (a good hello), else a random stream's index."""
        if app is None or len(self.seq.streams) >= MAX_STREAMS:
            return -2 if self.seq.streams else -1
        self.open_session(app, dial=False)
        return -1

    @precondition(lambda self: bool(self.seq.streams))
    @rule(app=st.sampled_from(["a", "b"]) | st.none(), d=st.integers(-2, 2))
    def detach(self, app: str | None, d: int) -> None:
        i = self._own_stream(app)
        req = pb.Request(id=7, detach=pb.Detach(descriptor=f"$D{d}"))
        self._run(("msg", i, frame_text(_frame(request=req)), ()))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(
        app=st.sampled_from(["a", "b"]) | st.none(),
        d=st.integers(-2, 2),
        t=st.integers(-2, 2),
        tail=st.binary(max_size=32),
        extra=st.integers(-2, 2),
    )
    def resume(self, app: str | None, d: int, t: int, tail: bytes, extra: int) -> None:
        i = self._own_stream(app)
        resume = pb.Resume(
            descriptor=f"$D{d}", token=f"$T{t}", tail_length=max(0, len(tail) + extra)
        )
        self._run(("msg", i, frame_text(_frame(resume=resume)), ()))
        self._run(("raw", i, tail))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index, frame=hello_frames())
    def hello(self, i: int, frame: pb.Frame) -> None:
        self._run(("msg", i, frame_text(frame), ()))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index, frame=frames)
    def send(self, i: int, frame: pb.Frame) -> None:
        self._run(("msg", i, frame_text(frame), ()))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index, frame=frames, how=mutations)
    def send_mutated(self, i: int, frame: pb.Frame, how: list[tuple[Any, ...]]) -> None:
        self._run(("msg", i, frame_text(frame), tuple(how)))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index, data=st.binary(max_size=64) | st.sampled_from([PREAMBLE, b"\0" * 4]))
    def raw(self, i: int, data: bytes) -> None:
        self._run(("raw", i, data))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index)
    def recv(self, i: int) -> None:
        self._run(("recv", i))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index)
    def shut(self, i: int) -> None:
        self._run(("shut", i))

    @precondition(lambda self: bool(self.seq.streams))
    @rule(i=_stream_index, reset=st.booleans())
    def close(self, i: int, reset: bool) -> None:
        self._run(("close", i, reset))

    @rule(seconds=st.sampled_from([1.0, 600.0, 10 * 86400.0]))
    def sweep(self, seconds: float) -> None:
        self._run(("sweep", seconds))

    @invariant()
    def bounded(self) -> None:
        self.seq.check_memory()

    def teardown(self) -> None:
        try:
            self.seq.finish()
        except BaseException:
            # The minimal failing sequence as data, for tests/gateway/test_fuzz_regressions.py.
            note(f"fuzz sequence as data ({len(self.seq.ops)} ops): {self.seq.ops!r}")
            raise


@contextlib.contextmanager
def quiet_gateway_log() -> Iterator[None]:
    """Warnings and info from the gateway are expected under fuzzing; keep them off stderr."""
    logger = logging.getLogger("tether")
    was = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(was)
