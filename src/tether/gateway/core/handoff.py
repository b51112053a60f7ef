"""Handoff: detach a socket from its holder, and check a Resume before it re-attaches.

The relay does the moving (``Link.begin_detach``, ``Link.attach``); this
decides whether a request may, with the words the app is told when not
(docs/handoff.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac

from tether.gateway.core.errors import Refusal
from tether.gateway.core.inspect import gone
from tether.gateway.core.registry import (
    ATTACHED,
    DETACHING,
    HANDED_OFF,
    Registry,
    SocketRecord,
)
from tether.gateway.relay import DETACH_SETTLE_TIMEOUT, MAX_RESUME_TAIL
from tether.wire import pb


def detach(record: SocketRecord) -> str | Refusal:
    """Begin handing `record` off; the one-time token its resumer must show."""
    if record.state != ATTACHED or record.link is None:
        return Refusal(pb.Error.INVALID_REQUEST, errno.EINVAL,
            f"tether: socket {record.descriptor[:8]}... is {record.state}, "
            "not attached: it cannot be handed off now")
    record.link.begin_detach()
    record.handoffs += 1
    return record.new_token()


async def resumable(
    registry: Registry, app: str, descriptor: str, token: str, tail_length: int
) -> SocketRecord | Refusal:
    """The handed-off socket a Resume may take over, or why it may not.

    Waits (DETACH_SETTLE_TIMEOUT at most) for an old holder whose close is
    still in flight.
    """
    record = registry.get(app, descriptor)
    if record is None:
        return gone(registry, app, descriptor)
    if tail_length > MAX_RESUME_TAIL:
        # Refused before the token is checked, so it stays valid.
        return Refusal(pb.Error.INVALID_REQUEST, errno.EMSGSIZE,
            f"tether: resuming socket {record.descriptor[:8]}...: a tail of "
            f"{tail_length} bytes is over the gateway's limit of {MAX_RESUME_TAIL}")
    link = record.link
    if record.state == DETACHING and link is not None and token == record.token:
        # The old holder has read our EOF but its close is still in flight.
        with contextlib.suppress(TimeoutError):
            assert link.settled is not None  # made by begin_detach()
            await asyncio.wait_for(link.settled.wait(), DETACH_SETTLE_TIMEOUT)
        if record.closed_reason is not None:
            # The peer left while we waited: the link is closed and released.
            return gone(registry, app, descriptor)
    expected = record.token
    if (
        record.state != HANDED_OFF
        or link is None
        or expected is None
        or not hmac.compare_digest(token.encode(), expected.encode())
    ):
        if record.state == ATTACHED:
            return Refusal(pb.Error.ALREADY_RESUMED, errno.EALREADY,
                f"tether: socket {record.descriptor[:8]}... was already resumed: "
                "a pickled socket can be resumed once")
        return Refusal(pb.Error.INVALID_REQUEST, errno.EINVAL,
            f"tether: socket {record.descriptor[:8]}... is {record.state}; "
            "this handoff cannot be resumed")
    return record


__all__ = ["detach", "resumable"]
