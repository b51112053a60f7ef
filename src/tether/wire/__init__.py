"""Wire protocol between apps and the gateway: messages and a sans-I/O machine.

The messages are defined in ``proto/tether/v1/tether.proto``; the generated
module is re-exported here as ``pb``. See docs/architecture.md.
"""

from __future__ import annotations

from tether.wire._pb import tether_pb2 as pb
from tether.wire.protocol import (
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PAUSED,
    PREAMBLE,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "NEED_DATA",
    "PAUSED",
    "PREAMBLE",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionClosed",
    "Event",
    "LocalProtocolError",
    "Message",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "encode_frame",
    "pb",
]
