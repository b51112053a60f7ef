"""Patch the stdlib ``socket`` module in place so unmodified libraries use tether.

Libraries look up ``socket.socket``, ``socket.create_connection`` and the
resolver functions as module attributes when they connect, so replacing
those attributes is enough; a name imported with ``from socket import ...``
before install() keeps the stdlib object (documented in docs/architecture.md).
``ssl.SSLContext.sslsocket_class`` is replaced too, by a subclass that keeps
the tether socket's real peer and options after wrap_socket().
"""

from __future__ import annotations

import atexit
import socket as _std
import ssl
import threading
from typing import Any

from tether.aio.hooks import install_loop_hooks, uninstall_loop_hooks
from tether.client import control
from tether.client import settings as _settings

# Imported for its registration: with it, socket(AF_INET, SOCK_DGRAM) is a
# tether UDP socket however tether was imported (tether/__init__ imports
# this module).
from tether.client.dgram import DatagramSocket  # noqa: F401
from tether.client.sock import State, _Tether, get_option, set_option

_lock = threading.Lock()
_saved: dict[str, Any] | None = None
_saved_ssl: type[ssl.SSLSocket] | None = None
_dev_gateway: Any = None
_exit_hook = False  # control streams are closed at interpreter exit (registered once)


class TetherSSLSocket(ssl.SSLSocket):
    """An SSLSocket that answers getpeername()/options for a tether socket."""

    _tether_state: _Tether | None = None

    @classmethod
    def _create(cls, sock: Any, *args: Any, **kwargs: Any) -> Any:
        state = getattr(sock, "_tether", None)
        if state is not None and state.state is State.PENDING:
            # wrap_socket() takes the fd over: finish a non-blocking connect first.
            sock._finish_pending(state, block=True)
        self = super()._create(sock, *args, **kwargs)  # type: ignore[misc]
        self._tether_state = state
        return self

    def getpeername(self) -> Any:
        state = self._tether_state
        if state is None:
            return super().getpeername()
        if state.peer is None or self.fileno() == -1:
            raise OSError(107, "Transport endpoint is not connected")
        return state.peer

    def getsockname(self) -> Any:
        state = self._tether_state
        if state is None or state.local is None:
            return super().getsockname()
        return state.local

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:
        if self._tether_state is None:
            super().setsockopt(level, optname, value, *rest)
            return
        set_option(self._tether_state, level, optname, value, *rest)

    def getsockopt(self, level: int, optname: int, *rest: Any) -> Any:
        if self._tether_state is None:
            return super().getsockopt(level, optname, *rest)
        buflen = rest[0] if rest else None
        return get_option(self._tether_state, int(self.type), level, optname, buflen)


def _replacements() -> dict[str, Any]:
    from tether import socket as tsock

    return {name: getattr(tsock, name) for name in tsock.OVERRIDDEN}


def install(
    gateway: str | None = None,
    app: str | None = None,
    key: str | None = None,
    *,
    key_file: str | None = None,
    dev: bool = False,
    config: str | None = None,
) -> None:
    """Route the stdlib ``socket`` module through tether. Idempotent.

    The gateway, app and key come from the arguments, else from
    ``TETHER_GATEWAY``, ``TETHER_APP``, ``TETHER_KEY`` (or the file
    ``TETHER_KEY_FILE`` names). `key_file` reads the key from a file. With ``dev=True`` and
    no gateway configured, a gateway is started in this process (development
    mode) with the config at `config` or ``./tether.toml``.
    """
    global _saved, _saved_ssl, _dev_gateway, _exit_hook
    with _lock:
        if not _exit_hook:
            # Close the control streams at exit, or the interpreter's teardown
            # finds them open (a ResourceWarning under -X dev / -W error).
            atexit.register(_close_at_exit)
            _exit_hook = True
        resolved = _settings.resolve_settings(gateway, app, key, key_file)
        if resolved is None and dev:
            from tether.devmode import start_dev_gateway

            _dev_gateway, resolved = start_dev_gateway(config)
            atexit.register(_dev_gateway.stop)
        if resolved is not None:
            _settings.configure(resolved)
        if _saved is None:
            # multiprocessing.reduction registers fd passing for whatever
            # socket.socket is when it is first imported; imported after the
            # patch, ForkingPickler would share the raw gateway stream instead
            # of handing the socket off. Importing it first costs ~2 ms.
            import multiprocessing.reduction  # noqa: F401

            replacements = _replacements()
            _saved = {name: getattr(_std, name) for name in replacements}
            for name, value in replacements.items():
                setattr(_std, name, value)
            _saved_ssl = ssl.SSLContext.sslsocket_class
            ssl.SSLContext.sslsocket_class = TetherSSLSocket
            # The loops' own connects and lookups (uvloop's are in C); patched
            # when asyncio / uvloop are imported, so no cost for programs without.
            install_loop_hooks()


def uninstall() -> None:
    """Put the stdlib's own objects back. Open tether sockets keep working."""
    global _saved, _saved_ssl, _dev_gateway
    with _lock:
        if _saved is not None:
            for name, value in _saved.items():
                setattr(_std, name, value)
            _saved = None
        if _saved_ssl is not None:
            ssl.SSLContext.sslsocket_class = _saved_ssl
            _saved_ssl = None
        uninstall_loop_hooks()
        _settings.configure(None)
        control.close_all()
        if _dev_gateway is not None:
            _dev_gateway.stop()
            _dev_gateway = None


def _close_at_exit() -> None:
    # A forked child has its own streams (control's after-fork hook dropped
    # the parent's), so this closes only what this process opened.
    control.close_all(wait=False)


def installed() -> bool:
    return _saved is not None
