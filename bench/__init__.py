"""Tether's benchmark suite: ``python -m bench`` (``make bench``).

Measures, side by side on loopback only, the paths a user could pick: a
direct stdlib socket (the limit), Tether over TCP and over a Unix socket,
and PySocks through Dante and through microsocks (Debian's SOCKS5 servers),
on bulk download/upload, 64-byte round trips, connection rate and proxy
memory per idle connection. See ``bench/README.md``.
"""

from __future__ import annotations

__all__: list[str] = []
