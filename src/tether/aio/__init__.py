"""asyncio through the gateway: the same handshake as the blocking client, driven by the loop.

See docs/asyncio.md.
"""

from __future__ import annotations
