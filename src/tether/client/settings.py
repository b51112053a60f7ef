"""Where the client's gateway is and who the app is.

From :func:`tether.install` arguments, else the environment:
``TETHER_GATEWAY`` (``host:port`` or ``unix:/path``), ``TETHER_APP``,
``TETHER_KEY`` or ``TETHER_KEY_FILE`` (a file holding the key, so the key
is on no command line and in no environment listing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from tether.endpoint import Endpoint, parse_endpoint

ENV_GATEWAY = "TETHER_GATEWAY"
ENV_APP = "TETHER_APP"
ENV_KEY = "TETHER_KEY"
ENV_KEY_FILE = "TETHER_KEY_FILE"


@dataclass(frozen=True)
class Settings:
    gateway: Endpoint
    app: str
    key: str = field(repr=False)  # never shown, never logged


class NotConfiguredError(ConnectionError):
    """No gateway is configured (neither install() arguments nor TETHER_GATEWAY)."""


class KeyFileError(NotConfiguredError):
    """A key file is missing, unreadable or empty."""


def read_key_file(path: str | os.PathLike[str]) -> str:
    """The key in the file at `path`, stripped of surrounding whitespace.

    Errors name the path; an empty file is an error, not an empty key (an
    app that needs no key gives none rather than an empty file).
    """
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeyFileError(
            f"cannot read the key file {os.fspath(path)!r}: {reason}"
        ) from exc
    if not key:
        raise KeyFileError(f"the key file {os.fspath(path)!r} is empty")
    return key


def env_key(environ: Mapping[str, str]) -> str:
    """The key from the environment: TETHER_KEY, else the file TETHER_KEY_FILE names."""
    key = environ.get(ENV_KEY, "")
    if not key and environ.get(ENV_KEY_FILE):
        try:
            key = read_key_file(environ[ENV_KEY_FILE])
        except KeyFileError as exc:
            raise KeyFileError(f"tether: {ENV_KEY_FILE}: {exc}") from exc
    return key


def choose_key(
    key: str | None, key_file: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> str:
    """An explicit key, else an explicit key file, else the environment's."""
    if key is not None and key_file is not None:
        raise ValueError("give a key or a key file, not both")
    if key is not None:
        return key
    if key_file is not None:
        return read_key_file(key_file)
    return env_key(environ)


_lock = threading.Lock()
_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    global _configured
    with _lock:
        _configured = settings


def _env_gateway(env: Mapping[str, str]) -> Endpoint | None:
    gateway = env.get(ENV_GATEWAY)
    if not gateway:
        return None
    try:
        return parse_endpoint(gateway)
    except ValueError as exc:
        raise NotConfiguredError(f"tether: {ENV_GATEWAY} is not valid: {exc}") from exc


def from_env(environ: Mapping[str, str] | None = None) -> Settings | None:
    env = os.environ if environ is None else environ
    endpoint = _env_gateway(env)
    if endpoint is None:
        return None
    return Settings(gateway=endpoint, app=env.get(ENV_APP, ""), key=env_key(env))


def resolve_settings(
    gateway: str | Endpoint | None = None,
    app: str | None = None,
    key: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> Settings | None:
    """Arguments first, then the environment; None when no gateway is known."""
    if gateway is None:
        endpoint = _env_gateway(os.environ)
        if endpoint is None:
            return None
    else:
        endpoint = gateway if isinstance(gateway, Endpoint) else parse_endpoint(gateway)
    return Settings(
        gateway=endpoint,
        app=app if app is not None else os.environ.get(ENV_APP, ""),
        key=choose_key(key, key_file, os.environ),
    )


def current() -> Settings:
    """The settings in force; raises NotConfiguredError if there are none."""
    settings = _configured or from_env()
    if settings is None:
        raise NotConfiguredError(
            "tether: no gateway configured; set TETHER_GATEWAY (and TETHER_APP, TETHER_KEY_FILE "
            "or TETHER_KEY) "
            "or call tether.install(gateway=..., app=..., key_file=...)"
        )
    return settings
