"""Who an app stream speaks for: an app and its key, or the operator."""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.gateway.core.gateway import GatewayCore

# Compared against when the app is unknown, so a wrong app name costs the
# same time as a wrong key and timing does not reveal which apps exist.
_DUMMY_KEY = os.urandom(32).hex()
ADMIN_APP = "*"  # not a valid app table name in practice; see [gateway] admin_key


def authenticate(core: GatewayCore, app: str, key: str) -> bool:
    """True if `key` is `app`'s (or, for ADMIN_APP, the operator's) key.

    Bound as ``GatewayCore.authenticate``.
    """
    config = core.config
    if app == ADMIN_APP:
        # The operator's identity: may list every app's sockets, open none.
        expected = config.admin_key or _DUMMY_KEY
        known = config.admin_key is not None
    else:
        entry = config.apps.get(app)
        expected = entry.key if entry is not None else _DUMMY_KEY
        known = entry is not None
    return hmac.compare_digest(key.encode(), expected.encode()) and known


__all__ = ["ADMIN_APP", "authenticate"]
