"""Where the client's gateway is and who the app is.

From :func:`tether.install` arguments, else the environment:
``TETHER_GATEWAY`` (``host:port`` or ``unix:/path``), ``TETHER_APP``,
``TETHER_KEY``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from tether.endpoint import Endpoint, parse_endpoint

ENV_GATEWAY = "TETHER_GATEWAY"
ENV_APP = "TETHER_APP"
ENV_KEY = "TETHER_KEY"


@dataclass(frozen=True)
class Settings:
    gateway: Endpoint
    app: str
    key: str = field(repr=False)  # never shown, never logged


class NotConfiguredError(ConnectionError):
    """No gateway is configured (neither install() arguments nor TETHER_GATEWAY)."""


_lock = threading.Lock()
_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    global _configured
    with _lock:
        _configured = settings


def from_env(environ: dict[str, str] | os._Environ[str] | None = None) -> Settings | None:
    env = os.environ if environ is None else environ
    gateway = env.get(ENV_GATEWAY)
    if not gateway:
        return None
    try:
        endpoint = parse_endpoint(gateway)
    except ValueError as exc:
        raise NotConfiguredError(f"tether: {ENV_GATEWAY} is not valid: {exc}") from exc
    return Settings(gateway=endpoint, app=env.get(ENV_APP, ""), key=env.get(ENV_KEY, ""))


def resolve_settings(
    gateway: str | Endpoint | None = None, app: str | None = None, key: str | None = None
) -> Settings | None:
    """Arguments first, then the environment; None when no gateway is known."""
    env = from_env()
    if gateway is None:
        if env is None:
            return None
        endpoint = env.gateway
    else:
        endpoint = gateway if isinstance(gateway, Endpoint) else parse_endpoint(gateway)
    return Settings(
        gateway=endpoint,
        app=app if app is not None else (env.app if env else os.environ.get(ENV_APP, "")),
        key=key if key is not None else (env.key if env else os.environ.get(ENV_KEY, "")),
    )


def current() -> Settings:
    """The settings in force; raises NotConfiguredError if there are none."""
    settings = _configured or from_env()
    if settings is None:
        raise NotConfiguredError(
            "tether: no gateway configured; set TETHER_GATEWAY (and TETHER_APP, TETHER_KEY) "
            "or call tether.install(gateway=..., app=..., key=...)"
        )
    return settings
