"""The audit log: one JSON line per decision and one per socket close.

The lines are on the connect path of every socket, so writing them must be
cheap. With ``gateway.audit_log`` set they go to that file through a small
batched writer: lines are joined and written with one ``write(2)`` at most
FLUSH_DELAY after the first of them, or as soon as FLUSH_LINES are waiting
(an O_APPEND file, so lines from several gateways sharing it never
interleave mid-line); shutdown writes what is left. The stdlib
``logging`` path costs ~60 us a line (a LogRecord, caller lookup,
formatting, a flush per line), which was a tenth of a connection's cost in
the gateway (bench/README.md, connection rate). Without a file the lines go
to the ``tether.audit`` logger, i.e. the gateway's stderr log.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
from typing import Any

__all__ = ["AuditFile", "close", "emit", "emit_line", "encode", "open_file", "quote"]

log = logging.getLogger("tether.audit")

# One encoder for every line: json.dumps() with options builds a new one per
# call, and JSONEncoder.encode() a new C encoder per call; this is the C
# encoder itself, made once (what JSONEncoder.iterencode builds, one-shot).
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    _C_ENCODE = _c_make_encoder(
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def encode(record: dict[str, Any]) -> str:
        """`record` as one compact JSON line (ASCII; non-JSON values as str())."""
        return "".join(_C_ENCODE(record, 0))

else:  # a Python without the C accelerator
    _ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)

    def encode(record: dict[str, Any]) -> str:
        """`record` as one compact JSON line (ASCII; non-JSON values as str())."""
        return _ENCODER.encode(record)

# A JSON string literal, as the encoder writes it.
quote = json.encoder.encode_basestring_ascii


# How long a line may wait for others to share its write(2): at a thousand
# connections a second (two lines each) one write per ~40 lines instead of
# one per loop turn, i.e. per connection (bench/README.md, connection rate),
# while a line still reaches the file within a few hundredths of a second.
FLUSH_DELAY = 0.02
# A burst larger than this is written at once: it bounds what waits in memory.
FLUSH_LINES = 256


class AuditFile:
    """Appends lines to a file in batches (see FLUSH_DELAY)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # 0o640: the log names apps and peers; it is the operator's, not the world's.
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None  # the scheduled flush

    def write(self, line: str) -> None:
        pending = self.pending
        pending.append(line)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop (start-up, shutdown, tools): write now
                return
            self._timer = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending:
            return
        data = ("\n".join(self.pending) + "\n").encode()
        self.pending.clear()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            # The gateway keeps serving; the operator sees why lines are missing.
            logging.getLogger("tether.gateway").exception(
                "audit log %s: %d bytes not written", self.path, len(view)
            )

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


_file: AuditFile | None = None


def open_file(path: str) -> AuditFile:
    """Send audit lines to `path` (appended) from now on."""
    global _file
    close()
    _file = AuditFile(path)
    atexit.register(close)
    return _file


def close() -> None:
    """Write what is pending and stop writing to the file."""
    global _file
    if _file is not None:
        f, _file = _file, None
        f.close()


def emit(record: dict[str, Any]) -> None:
    """Write one audit record as a compact JSON line."""
    emit_line(encode(record))


def emit_line(line: str) -> None:
    """Write one audit record already encoded as a JSON object (no newline)."""
    if _file is not None:
        _file.write(line)
    else:
        log.info(line)
