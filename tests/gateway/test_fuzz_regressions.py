"""Every crash the gateway fuzzer (tests/fuzz, ``make fuzz``) found, kept as a replayed sequence.

Each case is the minimal failing sequence Hypothesis shrank it to, as data
(the ops of tests/fuzz/gateway_machine.py), replayed without Hypothesis
against the in-process fuzz gateway with the same end checks: nothing raised
out of the loop or logged as an internal error, every stream answered or
closed, no registry record, stream or task left behind. Add a case for every
new crash, with the date it was found and what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz.gateway_machine import (
    ECHO_PORT,
    FuzzFailure,
    Op,
    quiet_gateway_log,
    replay,
    shared_target,
    stop_shared_target,
)

HELLO_A = 'client_hello { protocol_version: 1 app: "a" key: "key-a" }'
ECHO = f'host: "127.0.0.1" port: {ECHO_PORT}'


def _connect(options: str) -> str:
    return f"connect {{ transport: TRANSPORT_TCP family: FAMILY_INET {ECHO} {options} }}"


CASES: dict[str, list[Op]] = {
    # 2026-12-04: a Connect carrying an OptionValue with name 0 (or any number
    # the gateway has no entry for: proto3 enums are open) reached
    # OPTION_LEVELS[name] in core/options.py: KeyError, "internal error" logged,
    # the app told "gateway internal error: KeyError". Now ENOPROTOOPT in words.
    "connect-option-unknown-name": [
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        ("msg", -1, _connect("options { }"), ()),
    ],
    # 2026-12-04: SO_KEEPALIVE with int_value 2**31 (the wire's int64 is wider than
    # setsockopt's C int) reached setsockopt: TypeError, "internal error" logged.
    "connect-option-value-over-c-int": [
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        ("msg", -1, _connect("options { name: SO_KEEPALIVE int_value: 2147483648 }"), ()),
    ],
    # The same two faults by the request path (SetOption / GetOption on a live
    # socket), which shared the code: replayed so the fix covers both.
    "set-option-unknown-name-and-over-c-int": [
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        ("msg", -1, _connect(""), ()),
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        ("msg", -1, 'request { id: 1 set_option { descriptor: "$D0" value { name: 99 } } }', ()),
        (
            "msg",
            -1,
            'request { id: 2 set_option { descriptor: "$D0" value { name: SO_KEEPALIVE '
            "int_value: -9223372036854775808 } } }",
            (),
        ),
        ("msg", -1, 'request { id: 3 get_option { descriptor: "$D0" name: 42 } }', ()),
        ("recv", -1),
    ],
    # 2026-12-04: GetNameInfo for port 65536 (the wire's port is a uint32) reached
    # socket.getservbyport in gateway/resolve.py: OverflowError, "internal error"
    # logged. Shrunk from 15 steps. Now EINVAL, "port 65536 is not in 0-65535".
    "getnameinfo-port-over-65535": [
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        (
            "msg",
            -1,
            "request { id: 1 getnameinfo { address { family: FAMILY_INET "
            'host: "127.0.0.1" port: 65536 } } }',
            (),
        ),
        ("recv", -1),
    ],
    # Its neighbour on the same path, seen while fixing it: a host that is not an
    # address reached ipaddress.ip_address (ValueError). Now EAI_NONAME, as the
    # stdlib's getnameinfo says for a name.
    "getnameinfo-host-not-an-address": [
        ("open", True),
        ("msg", -1, HELLO_A, ()),
        (
            "msg",
            -1,
            "request { id: 1 getnameinfo { address { family: FAMILY_INET "
            'host: "localhost" port: 80 } } }',
            (),
        ),
        ("recv", -1),
    ],
}


@pytest.fixture(autouse=True, scope="module")
def _fuzz_gateway() -> Iterator[None]:
    yield
    stop_shared_target()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_regression(name: str) -> None:
    with quiet_gateway_log():
        seq = replay(CASES[name])
    # The sequence got as far as the fault did: a descriptor for the request cases.
    if name.startswith("set-option"):
        assert seq.descriptors


def test_unknown_option_is_answered_in_words() -> None:
    """What the app reads instead of "gateway internal error": the option and errno."""
    with quiet_gateway_log():
        seq = replay(
            [
                ("open", True),
                ("msg", -1, HELLO_A, ()),
                ("msg", -1, _connect("options { name: 77 }"), ()),
                ("recv", -1),
            ]
        )
    assert any("socket option number 77 is not one the gateway knows" in e for e in seq.errors), (
        seq.errors
    )


def test_the_end_checks_catch_a_leaked_stream() -> None:
    """The replay's checks can fail: a stream left in core.streams is reported."""
    target = shared_target()

    class Leaked:
        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

    leaked = Leaked()
    target.gw.call(lambda: target.core.streams.add(leaked))
    try:
        with quiet_gateway_log(), pytest.raises(FuzzFailure, match="app streams still open"):
            replay([("open", True), ("msg", -1, HELLO_A, ())])
    finally:
        target.gw.call(lambda: target.core.streams.discard(leaked))
