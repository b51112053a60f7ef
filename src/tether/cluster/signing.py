"""The signature on a cluster handoff: which node holds the socket, unforgeable.

A Handoff names its owner node so that a Resume reaching another node can be
routed there. The name is signed with the key the nodes share (HMAC-SHA256
over descriptor, token and node, each length-prefixed so no two triples
sign the same bytes), so a client cannot make a node forward streams to a
node of its choosing, or learn which descriptors exist elsewhere: a Resume
whose signature does not match is refused before anything is looked up.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.wire import pb

_LABEL = b"tether cluster handoff v1\0"


def _message(descriptor: str, token: str, node: str) -> bytes:
    parts = [p.encode() for p in (descriptor, token, node)]
    return _LABEL + b"".join(struct.pack(">H", len(p)) + p for p in parts)


def sign(key: bytes, descriptor: str, token: str, node: str) -> bytes:
    """HMAC-SHA256(key, descriptor, token, node)."""
    return hmac.new(key, _message(descriptor, token, node), hashlib.sha256).digest()


def verify(key: bytes, descriptor: str, token: str, node: str, signature: bytes) -> bool:
    """Whether `signature` is this cluster's over the triple (constant-time)."""
    return hmac.compare_digest(sign(key, descriptor, token, node), signature)


def sign_handoff(key: bytes, node: str, handoff: pb.Handoff, descriptor: str) -> None:
    """Name `node` in `handoff` (of socket `descriptor`), signed: any peer can route its Resume."""
    handoff.node = node
    handoff.signature = sign(key, descriptor, handoff.token, node)


__all__ = ["sign", "sign_handoff", "verify"]
