"""The ledger's data, with no I/O: counters, minutes, the batches a store applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["COLUMNS", "MINUTE", "ZERO", "Batch", "Counters", "Key", "add", "minute_of", "sub"]

MINUTE = 60  # seconds; rows are per minute (the unit)


class Counters(NamedTuple):
    """What an app did: one ledger row's values, a delta, or a cumulative total."""

    bytes_out: int = 0  # app -> internet: what is billed
    bytes_in: int = 0
    connects: int = 0  # sockets opened: TCP sockets and UDP associations
    denied_connects: int = 0  # connects the egress policy or a socket cap refused
    quota_refusals: int = 0  # requests a quota refused ([quota], core/admission.py)
    socket_seconds: float = 0.0  # seconds sockets were open


# The ledger's value columns, in Counters' order.
COLUMNS = Counters._fields
ZERO = Counters()


def add(a: Counters, b: Counters) -> Counters:
    return Counters(
        a.bytes_out + b.bytes_out, a.bytes_in + b.bytes_in, a.connects + b.connects,
        a.denied_connects + b.denied_connects, a.quota_refusals + b.quota_refusals,
        a.socket_seconds + b.socket_seconds,
    )


def sub(a: Counters, b: Counters) -> Counters:
    return Counters(
        a.bytes_out - b.bytes_out, a.bytes_in - b.bytes_in, a.connects - b.connects,
        a.denied_connects - b.denied_connects, a.quota_refusals - b.quota_refusals,
        a.socket_seconds - b.socket_seconds,
    )


# (app, minute): a row of one node.
Key = tuple[str, int]


def minute_of(t: float) -> int:
    """The UTC minute (epoch seconds, a multiple of 60) that wall-clock time `t` falls in."""
    return int(t // MINUTE) * MINUTE


@dataclass(frozen=True)
class Batch:
    """One flush: deltas per (app, minute), applied by a store at most once.

    ``(node, run, seq)`` identifies it: ``run`` is one gateway process's
    random id and ``seq`` counts its batches, so a store that has applied
    ``seq`` skips it when it comes again (a retry after an error whose
    COMMIT may have gone through), and rows from every process add up.
    """

    node: str
    run: str
    seq: int
    started: float  # the process's start, wall clock
    sampled: float  # when the last sample in it was taken, wall clock
    rows: dict[Key, Counters]
