"""Per-app quotas: the limits (``limits``), the per-minute pacing (``gcra``) and the book.

Pure: no sockets, no event loop, clocks injected. The gateway keeps one
:class:`QuotaBook` (``GatewayCore.quota``) and asks it at admission
(``core/admission.py``), in the TCP relay (``gateway/relay.py``) and in the
UDP association (``gateway/udp.py``); docs/quotas.md describes the model.
"""

from tether.quota.book import AppMeter, Exceeded, LocalStore, QuotaBook, QuotaStore
from tether.quota.limits import (
    CONCURRENT,
    DAY,
    MINUTE,
    DayWindow,
    Limits,
    QuotaConfig,
    format_size,
    parse_quota,
    parse_size,
)

__all__ = [
    "CONCURRENT",
    "DAY",
    "MINUTE",
    "AppMeter",
    "DayWindow",
    "Exceeded",
    "Limits",
    "LocalStore",
    "QuotaBook",
    "QuotaConfig",
    "QuotaStore",
    "format_size",
    "parse_quota",
    "parse_size",
]
