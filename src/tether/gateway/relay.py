"""The data path: bytes between an app's stream and its outbound socket.

After a successful connect the app's transport and the outbound transport
are joined by a :class:`Link`: two small protocols that write what one side
receives to the other. Flow control is the transports' own: when one side's
write buffer passes its high-water mark, asyncio calls ``pause_writing`` and
the link stops reading the other side until it drains, so a slow reader
never makes the gateway buffer without bound. Half-closes are passed on as
``write_eof``. Metering is done here, where the bytes are relayed
(smokescreen's InstrumentedConn): the counters live on the socket's record.

Quotas (docs/quotas.md) are charged here too, only for an app with a byte
limit (``Link.meter``; one attribute test per chunk otherwise): past
``bytes_out_per_minute`` the link stops reading the app until the budget
refills, so the app's ``send()`` blocks as on a slow link and no byte is
lost; at a daily byte limit it passes the bytes up to the limit and closes
the socket with the reason as its tombstone (``Link.over_quota``).

A handoff (docs/handoff.md) detaches the app side without touching the
outbound connection: the link stops reading the peer, lets the old holder
drain what was already sent to it, and waits, with the peer's bytes held
back by TCP flow control, until a new stream resumes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tether.endpoint import arm_reset
from tether.gateway.core.registry import ATTACHED, DETACHING, HANDED_OFF

if TYPE_CHECKING:
    from tether.gateway.core.registry import SocketRecord
    from tether.quota import AppMeter

log = logging.getLogger("tether.gateway")

# How long a Resume may wait for the old holder's stream to finish closing
# (it has already read the gateway's EOF, so this is one loop turn in practice).
DETACH_SETTLE_TIMEOUT = 5.0

# The largest tail a Resume may announce. A real tail is what the old holder
# had not read: at most its kernel receive buffer (Linux tcp_rmem max, 6 MiB
# by default), what was in flight from the gateway (tcp_wmem max, 4 MiB, plus
# our write buffer's high-water mark) and a makefile() reader's buffer; the
# ring test's largest was ~9 MiB. The gateway echoes the tail back without
# waiting for the app to read (it is inside pickle.loads until the echo is
# queued), so this bounds what one resume can make the gateway buffer.
MAX_RESUME_TAIL = 32 * 1024 * 1024

# A socket closed at a daily quota first gives the app what was already
# relayed to it, then resets; an app that reads none of it for this long
# (the write-stall timeout's default, gateway.write_stall_timeout) is reset
# at once.
QUOTA_CLOSE_GRACE = 30.0


class _Half(asyncio.Protocol):
    """Receives on one transport, writes to the other."""

    __slots__ = ("eof", "link", "other", "outgoing", "paused", "transport")

    def __init__(self, link: Link, outgoing: bool) -> None:
        self.link = link
        # True for the app's side: what it receives is the app's outgoing traffic.
        self.outgoing = outgoing
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.eof = False
        # Our transport's write buffer is above its high-water mark (asyncio
        # says so only when it crosses, so the state must be remembered).
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing
        # it (an annotation, not typing.cast: this runs twice per connection).
        self.transport = transport  # type: ignore[assignment]
        if not self.outgoing and self.link.starting:
            transport.pause_reading()  # type: ignore[attr-defined]  # until the ConnectResult

    def data_received(self, data: bytes) -> None:
        other = self.other
        assert other is not None
        if self.link.starting:
            # Before the app has its ConnectResult (and before the socket is
            # registered): held, and metered when it is passed on.
            self.link.held.append(data)
            return
        link = self.link
        meter = link.meter
        over = ""
        if meter is not None:
            # The app's quota: how much may pass, how long to wait (out).
            n = len(data)
            if self.outgoing:
                allowed, delay = meter.out(n)
                if delay and allowed == n:
                    link.throttle(delay)
            else:
                allowed = meter.inbound(n)
            if allowed < n:
                over = "bytes_out_per_day" if self.outgoing else "bytes_in_per_day"
                data = data[:allowed]
        record = link.record
        if other.transport is None:
            # The app side is detached (handoff): hold what slipped through
            # before the pause took effect; it is sent first on resume.
            link.held.append(data)
        else:
            other.transport.write(data)
        if self.outgoing:
            record.bytes_out += len(data)
        else:
            record.bytes_in += len(data)
        record.last_active = record.registry.clock()
        if over:
            link.over_quota(over)

    def eof_received(self) -> bool:
        self.eof = True
        link = self.link
        other = self.other
        assert other is not None
        if self.outgoing and link.record.state == DETACHING:
            # The old holder has sent its last byte: everything it wrote is
            # now queued to the peer. Close our side after flushing what we
            # sent it (its tail); connection_lost then marks it handed off.
            assert self.transport is not None
            self.transport.close()
            return True
        if other.transport is None:
            return True  # the peer closed while handed off: passed on at resume
        if other.eof:
            link.close("closed by both sides")
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True  # keep our transport open: the other direction may still flow

    def pause_writing(self) -> None:
        # Our transport's buffer is full: stop reading the side that fills it.
        self.paused = True
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.link.holding and self.outgoing:
            return  # the peer stays paused until the handoff completes
        if not self.outgoing and self.link.throttled is not None:
            return  # the app waits for its quota: the throttle's timer resumes it
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        link = self.link
        if self.outgoing and link.record.state in (DETACHING, HANDED_OFF):
            link.detached(exc)
            return
        if exc is None:
            reason = "closed by the app" if self.outgoing else "closed by the peer"
        else:
            who = "app" if self.outgoing else "peer"
            reason = f"{who} connection lost: {exc}"
        link.close(reason)
        self.transport = None
        if link.bound and link.peer_side.transport is None and link.app_side.transport is None:
            link.release()


class _TailEcho(asyncio.Protocol):
    """On a resumed stream: send the first `remaining` bytes back, then relay.

    Those bytes are the old holder's unread tail, which the new holder's fd
    must deliver before anything else from the peer.
    """

    def __init__(self, link: Link, remaining: int) -> None:
        self.link = link
        self.remaining = remaining

    def data_received(self, data: bytes) -> None:
        transport = self.link.app_side.transport
        assert transport is not None
        n = min(len(data), self.remaining)
        transport.write(data[:n])
        self.remaining -= n
        if self.remaining == 0:
            transport.set_protocol(self.link.app_side)
            self.link.tail_sent()
            if len(data) > n:
                self.link.app_side.data_received(data[n:])

    def eof_received(self) -> bool:
        return self.link.app_side.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.app_side.connection_lost(exc)

    # The peer is held while the tail is echoed; the app side only records
    # that its buffer is full, so tail_sent() leaves the peer paused until the
    # app has read the echo (the echo itself is bounded by MAX_RESUME_TAIL).
    def pause_writing(self) -> None:
        self.link.app_side.pause_writing()

    def resume_writing(self) -> None:
        self.link.app_side.resume_writing()


class Link:
    """One relayed socket: the app's stream joined to the outbound connection."""

    __slots__ = (
        "app_side",
        "bound",
        "closed",
        "held",
        "holding",
        "loop",
        "meter",
        "peer_side",
        "record",
        "settled",
        "starting",
        "throttled",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, record: SocketRecord | None) -> None:
        self.loop = loop
        # Set by bind() once the outbound transport exists; only then is the
        # socket registered (a failed setup leaves no record behind).
        self.record: SocketRecord = record  # type: ignore[assignment]
        self.bound = record is not None
        self.starting = record is None
        self.app_side = _Half(self, outgoing=True)
        self.peer_side = _Half(self, outgoing=False)
        self.app_side.other = self.peer_side
        self.peer_side.other = self.app_side
        self.closed = False
        self.holding = False  # peer reading paused for a handoff
        self.held: list[bytes] = []
        # Set when the old holder's stream is gone; made by begin_detach()
        # (most sockets are never handed off: no Event for them).
        self.settled: asyncio.Event | None = None
        # The app's quota meter (core.quota.meter(app), set by dial()); None:
        # the app has no byte limit and the relay meters only the counters.
        self.meter: AppMeter | None = None
        # bytes_out_per_minute: the timer that resumes reading the app.
        self.throttled: asyncio.TimerHandle | None = None

    def bind(self, record: SocketRecord) -> None:
        self.record = record
        self.bound = True
        record.link = self
        if self.closed:  # the peer went away while the connect was being set up
            record.finish("closed by the peer during connect")

    def started(self) -> None:
        """The app has its ConnectResult: let the peer's bytes flow.

        uvloop starts reading a new transport after connection_made() even if
        the protocol paused it there, so a first chunk may already be held.
        """
        self.starting = False
        over = False
        if self.held:  # mostly empty: nothing to count or charge
            held = sum(map(len, self.held))
            meter = self.meter
            if meter is not None and (allowed := meter.inbound(held)) < held:
                self.held = [b"".join(self.held)[:allowed]]
                held, over = allowed, True
            self.record.bytes_in += held
        self.tail_sent()
        if over:
            self.over_quota("bytes_in_per_day")

    def join(self, transport: asyncio.Transport, first: bytes = b"") -> None:
        """A front-end's app stream becomes this socket's, once the app has its answer.

        Every front-end ends a successful connect here: the stream's bytes are
        relayed from now on, starting with `first` (what the app sent behind
        its request), and the peer's bytes flow (started()).
        """
        transport.set_protocol(self.app_side)
        self.app_side.connection_made(transport)
        self.started()
        if first:
            self.app_side.data_received(first)
        if not transport.is_closing():
            transport.resume_reading()

    # -- quota -------------------------------------------------------------------

    def throttle(self, delay: float) -> None:
        """bytes_out_per_minute: read nothing more from the app for `delay` seconds.

        What the app sends meanwhile waits in its own socket buffer, then
        its send() blocks: a slow link, not an error. A later chunk's delay
        (read before the pause took effect) replaces this one: it is the
        later, and the right, time. Not while a handoff drains the old
        holder: its last bytes and its EOF must be read now (they are still
        charged, so the new holder starts with the debt and waits in turn).
        """
        transport = self.app_side.transport
        if transport is None or self.record.state is not ATTACHED:
            return
        if self.throttled is not None:
            self.throttled.cancel()
        transport.pause_reading()
        self.throttled = self.loop.call_later(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttled = None
        transport = self.app_side.transport
        if self.closed or transport is None or self.record.state != ATTACHED:
            return
        if not self.peer_side.paused:
            # (Still paused: the peer's buffer is full, and its
            # resume_writing() resumes the app once it drains.)
            transport.resume_reading()

    def over_quota(self, limit: str) -> None:
        """A daily byte `limit` is reached: close, telling the app why on its next call.

        The bytes up to the limit were passed on. The peer's side is closed
        after what was written to it is flushed; the app's after what was
        written to it is (then with a reset, so its next call fails and the
        client asks the tombstone why, as after an idle reclaim).
        """
        if self.closed:
            return
        meter = self.meter
        assert meter is not None
        reason = meter.book.over(meter.app, limit).reason()
        self.closed = True
        if self.throttled is not None:
            self.throttled.cancel()
            self.throttled = None
        peer = self.peer_side.transport
        if peer is not None and not peer.is_closing():
            peer.close()
        app = self.app_side.transport
        if app is not None and not app.is_closing():
            app.pause_reading()
            arm_reset(app)
            app.close()
            # An app that never reads what is buffered for it is reset anyway.
            self.loop.call_later(QUOTA_CLOSE_GRACE, app.abort)
        if self.settled is not None:
            self.settled.set()
        if self.bound:
            self.record.finish(reason)

    # -- handoff ---------------------------------------------------------------

    def begin_detach(self) -> None:
        self.record.state = DETACHING
        self.holding = True
        self.settled = asyncio.Event()
        if self.throttled is not None:
            # The old holder drains now (see throttle()).
            self.throttled.cancel()
            self.throttled = None
            app = self.app_side.transport
            if app is not None and not self.peer_side.paused:
                app.resume_reading()
        if self.peer_side.transport is not None:
            self.peer_side.transport.pause_reading()

    def detached(self, exc: Exception | None) -> None:
        """The old holder's stream is closed: wait for a Resume."""
        self.app_side.transport = None
        self.record.state = HANDED_OFF
        self.record.touch()  # waiting to be resumed counts as idle from now
        if exc is not None:
            log.info("socket %s: holder left during handoff: %s", self.record.descriptor[:8], exc)
        if self.settled is not None:
            self.settled.set()

    def attach(self, transport: asyncio.Transport, tail_length: int, trailing: bytes) -> None:
        """Join a resumed app stream; its first `tail_length` bytes are echoed back."""
        record = self.record
        record.state = ATTACHED
        record.token = None
        record.touch()
        if self.throttled is not None:  # the old holder's pause: the new stream reads
            self.throttled.cancel()
            self.throttled = None
        self.app_side.transport = transport
        self.app_side.eof = False
        self.app_side.paused = False  # a new transport starts below its high-water mark
        if tail_length:
            echo = _TailEcho(self, tail_length)
            transport.set_protocol(echo)
            if trailing:
                echo.data_received(trailing)
        else:
            transport.set_protocol(self.app_side)
            self.tail_sent()
            if trailing:
                self.app_side.data_received(trailing)

    def tail_sent(self) -> None:
        """The app stream is ready: the held bytes, the peer's EOF, then reading."""
        transport = self.app_side.transport
        assert transport is not None
        for chunk in self.held:
            transport.write(chunk)
        self.held.clear()
        if self.peer_side.eof and transport.can_write_eof():
            transport.write_eof()
        if self.record.state != ATTACHED:
            # A new Detach arrived while this tail was still being echoed:
            # the peer stays held for the next holder.
            return
        if self.peer_side.paused:
            # The peer's buffer is still full from before the handoff: the new
            # stream waits, as the old one did, until the peer drains it. (Not
            # before: the tail must be read to be echoed, whatever the peer does.)
            transport.pause_reading()
        self.holding = False
        if self.peer_side.transport is not None and not self.app_side.paused:
            # Still paused: resume_writing() resumes the peer once the app reads.
            self.peer_side.transport.resume_reading()

    # -- ending ------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close both transports (after flushing what is buffered) and log once."""
        if self.closed:
            return
        self.closed = True
        if self.throttled is not None:
            self.throttled.cancel()
            self.throttled = None
        for half in (self.app_side, self.peer_side):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()
        if self.settled is not None:
            self.settled.set()
        if self.bound:
            self.record.finish(reason)

    def release(self) -> None:
        """Both transports are gone: cut the references that make this a cycle.

        A transport keeps its protocol until it is freed, the halves point at
        each other and at the link, and the record at the link. Left whole,
        every connection's transports, halves, link and record waited for
        the cyclic collector, which then ran every few dozen connections on
        the connect path (bench/README.md, connection rate). Cut, they are
        freed as the last transport is. Nothing calls a half after its
        connection_lost(), and the record has left the registry (finish()).
        """
        self.record.link = None
        for half in (self.app_side, self.peer_side):
            half.other = None
            del half.link

    def abort(self, reason: str, *, reset_app: bool = False) -> None:
        """Drop both sides now, discarding buffered data (reclaim, shutdown).

        With `reset_app` the app's stream gets a TCP reset rather than a FIN,
        so its next call fails (ECONNRESET) instead of reading a clean EOF:
        the client then asks the gateway why, and tells the app.
        """
        if self.closed:
            return
        self.closed = True
        if self.throttled is not None:
            self.throttled.cancel()
            self.throttled = None
        app = self.app_side.transport
        if reset_app and app is not None:
            arm_reset(app)
        for half in (self.app_side, self.peer_side):
            if half.transport is not None:
                half.transport.abort()
        if self.settled is not None:
            self.settled.set()
        if self.bound:
            self.record.finish(reason)
