"""A self-contained, loopback-only demonstration of tether (``tether demo``).

:mod:`tether.demo.servers` holds small local SMTP, HTTP(S), POP3 and IMAP
servers that the demo and the integration tests share; :mod:`tether.demo.run`
drives the demo itself. Both need the ``demo`` extra (aiosmtpd, trustme,
requests).
"""

from __future__ import annotations
