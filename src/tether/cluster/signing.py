"""The signature on a cluster handoff: which node holds the socket, unforgeable.

A Handoff names its owner node so that a Resume reaching another node can be
routed there. The name is signed with the key the nodes share (HMAC-SHA256
over descriptor, token and node, each length-prefixed so no two triples
sign the same bytes), so a client cannot make a node forward streams to a
node of its choosing, or learn which descriptors exist elsewhere: a Resume
whose signature does not match is refused before anything is looked up.

A handoff is also signed for the *incarnation* of the gateway that made it
(random bytes drawn at each start, carried in front of the MAC): a node
restarted under the same id (a worker its supervisor restarted, a pod
Kubernetes restarted) tells a handoff of its previous life, whose socket
died with that process, from a forged one, and says NODE_GONE at once
instead of "no socket".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from tether.cluster.errors import node_gone
from tether.gateway.core.errors import Refusal
from tether.wire import pb

_LABEL = b"tether cluster handoff v1\0"
# 64 random bits: two starts of one node drawing the same is out of reach.
INCARNATION_BYTES = 8
_MAC_BYTES = hashlib.sha256().digest_size


def _message(descriptor: str, token: str, node: str) -> bytes:
    parts = [p.encode() for p in (descriptor, token, node)]
    return _LABEL + b"".join(struct.pack(">H", len(p)) + p for p in parts)


def sign(key: bytes, descriptor: str, token: str, node: str) -> bytes:
    """HMAC-SHA256(key, descriptor, token, node)."""
    return hmac.new(key, _message(descriptor, token, node), hashlib.sha256).digest()


def verify(key: bytes, descriptor: str, token: str, node: str, signature: bytes) -> bool:
    """Whether `signature` is this cluster's over the triple (constant-time)."""
    return hmac.compare_digest(sign(key, descriptor, token, node), signature)


def new_incarnation() -> bytes:
    """This start of a gateway, told apart from every other start of the same node id."""
    return os.urandom(INCARNATION_BYTES)


def _lived(node: str, incarnation: bytes) -> str:
    # The incarnation's hex has a fixed length at the end: no two pairs give one string.
    return f"{node}#{incarnation.hex()}"


def sign_handoff(
    key: bytes, node: str, incarnation: bytes, handoff: pb.Handoff, descriptor: str
) -> None:
    """Name `node` (in its `incarnation`) in `handoff` of socket `descriptor`, signed, so
    any peer can route its Resume there."""
    handoff.node = node
    handoff.signature = incarnation + sign(
        key, descriptor, handoff.token, _lived(node, incarnation))


def signed_in(key: bytes, req: pb.Resume) -> bytes | None:
    """The incarnation of `req.node` that signed the Resume's handoff with `key`; None if
    the signature is not `key`'s over what the Resume says (forged or changed)."""
    signature = req.signature
    if len(signature) != INCARNATION_BYTES + _MAC_BYTES:
        return None
    incarnation, mac = signature[:INCARNATION_BYTES], signature[INCARNATION_BYTES:]
    if verify(key, req.descriptor, req.token, _lived(req.node, incarnation), mac):
        return incarnation
    return None


def restarted(req: pb.Resume, node: str, incarnation: bytes, signed: bytes) -> Refusal | None:
    """NODE_GONE for a handoff this node (`node`, now in `incarnation`) signed in a previous
    life; None for any other (a live one, or another node's)."""
    if req.node != node or signed == incarnation:
        return None
    return node_gone(node, "it restarted since the handoff was made, and a socket lives in "
                     "one process")


__all__ = ["INCARNATION_BYTES", "new_incarnation", "restarted", "sign", "sign_handoff",
           "signed_in", "verify"]
