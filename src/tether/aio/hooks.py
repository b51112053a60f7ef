"""The loop hooks: the default asyncio loop and uvloop go through the gateway.

``tether.install()`` patches the socket module, which covers what the
default loop does with Python sockets, but not everything it does, and
nothing uvloop does: uvloop opens, connects and resolves in C (libuv). So
the loop classes' own methods are replaced:

================================  ==========================================
``create_connection(host, port)``  the driver connects through the gateway,
                                   then the loop's own method wraps the
                                   socket (``sock=``), TLS included
``create_connection(sock=...)``    a tether socket: given to the loop (on
                                   uvloop over a ``unix:`` gateway, as a
                                   socket of its real family); a still
                                   connecting one is awaited first
``sock_connect``                   a tether socket: the driver's connect (the
                                   blocking one would wait for the answer
                                   inside getsockopt(SO_ERROR), freezing the
                                   loop); a plain Internet socket: refused
``getaddrinfo`` / ``getnameinfo``  tether's lookups (at the gateway), in the
                                   loop's executor
``create_datagram_endpoint``       tether.aio.datagram
``create_server`` (uvloop)         only on loopback, as a tether socket binds
================================  ==========================================

on ``asyncio.selector_events.BaseSelectorEventLoop`` (the default loop's
class and its subclasses) and on ``uvloop.Loop`` (a Python subclass of
uvloop's C loop, so its methods can be replaced). Neither module is
imported by ``install()``: a program that never imports asyncio does not
pay for it. The classes are patched now if their module is loaded, else
right after it is (an import hook); ``uninstall_loop_hooks()`` puts the
loop's own methods back.
"""

from __future__ import annotations

import errno
import functools
import importlib.abc
import importlib.machinery
import ipaddress
import socket as _socket_mod
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tether.client import resolve
from tether.client.sock import socket

if TYPE_CHECKING:
    import asyncio

# The hooks import tether.aio.connection (and with it asyncio) when a loop
# first calls one: by then asyncio is loaded anyway.

_lock = threading.Lock()
_installed = False
_finder: _PatchOnImport | None = None
# The loop classes' own methods, by (class, name), while hooked; and which
# of them the class defined itself (put back) rather than inherited (removed).
ORIGINALS: dict[tuple[type, str], Any] = {}
_OWN: set[tuple[type, str]] = set()

# The module that defines each loop class, and the class's name in it.
_LOOPS = {
    "asyncio.selector_events": "BaseSelectorEventLoop",
    "uvloop": "Loop",
}
_INET = (_socket_mod.AF_INET, _socket_mod.AF_INET6)


# -- the hooks (self is the loop) --------------------------------------------------


async def _create_connection(
    self: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: Any = None,
    **kwargs: Any,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    from tether.aio import connection

    return await connection.create_connection(self, protocol_factory, host, port, **kwargs)


async def _sock_connect(self: asyncio.AbstractEventLoop, sock: Any, address: Any) -> None:
    from tether.aio import connection, driver

    stream = sock.type == _socket_mod.SOCK_STREAM
    if isinstance(sock, socket) and sock._tether is not None and stream:
        if driver.is_local_listener(address) and sock._tether.state is driver.State.NEW:
            sock._make_local(sock._tether)  # a listener of this process, as connect() does
        else:
            await driver.connect(self, sock, address)
            return
    elif (
        sock.family in _INET
        and stream
        and not isinstance(sock, socket)
    ):
        raise connection.refuse_plain(sock, address, "loop.sock_connect()")
    await connection.original(self, "sock_connect")(sock, address)


async def _getaddrinfo(
    self: asyncio.AbstractEventLoop,
    host: Any,
    port: Any,
    *,
    family: int = 0,
    type: int = 0,
    proto: int = 0,
    flags: int = 0,
) -> list[tuple[Any, Any, int, str, Any]]:
    call = functools.partial(resolve.getaddrinfo, host, port, family, type, proto, flags)
    return await self.run_in_executor(None, call)


async def _getnameinfo(
    self: asyncio.AbstractEventLoop, sockaddr: Any, flags: int = 0
) -> tuple[str, str]:
    return await self.run_in_executor(None, resolve.getnameinfo, sockaddr, flags)


async def _create_datagram_endpoint(
    self: asyncio.AbstractEventLoop, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    from tether.aio.datagram import create_datagram_endpoint

    return await create_datagram_endpoint(self, protocol_factory, *args, **kwargs)


async def _create_server(
    self: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: Any = None,
    port: Any = None,
    **kwargs: Any,
) -> Any:
    # uvloop binds in C. A tether socket may bind only to loopback (local
    # plumbing, never reached from outside), and so may uvloop's listener.
    if kwargs.get("sock") is None:
        hosts: Sequence[Any] = [host] if host is None or isinstance(host, str) else host
        for one in hosts:
            if not _is_loopback(one):
                raise OSError(
                    errno.EACCES,
                    f"tether: sockets are outbound only; loop.create_server(host={one!r}, "
                    f"port={port!r}) is not allowed (only a loopback address, for a server "
                    "local to this host)",
                )
    from tether.aio.connection import original

    return await original(self, "create_server")(protocol_factory, host, port, **kwargs)


async def _start_tls(
    self: asyncio.AbstractEventLoop, transport: Any, protocol: Any, sslcontext: Any, **kwargs: Any
) -> Any:
    from tether.aio.connection import start_tls

    return await start_tls(self, transport, protocol, sslcontext, **kwargs)


def _is_loopback(host: Any) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


_COMMON: dict[str, Callable[..., Any]] = {
    "create_connection": _create_connection,
    "sock_connect": _sock_connect,
    "getaddrinfo": _getaddrinfo,
    "getnameinfo": _getnameinfo,
    "create_datagram_endpoint": _create_datagram_endpoint,
}
_HOOKS: dict[str, dict[str, Callable[..., Any]]] = {
    "asyncio.selector_events": _COMMON,
    "uvloop": {**_COMMON, "create_server": _create_server, "start_tls": _start_tls},
}


# -- installing ---------------------------------------------------------------------


def _patch(module: ModuleType) -> None:
    """Replace the hooked methods of `module`'s loop class (once)."""
    cls = getattr(module, _LOOPS[module.__name__])
    for name, hook in _HOOKS[module.__name__].items():
        if (cls, name) not in ORIGINALS:
            ORIGINALS[(cls, name)] = getattr(cls, name)
            if name in cls.__dict__:
                _OWN.add((cls, name))
            setattr(cls, name, hook)


def _unpatch() -> None:
    for (cls, name), method in list(ORIGINALS.items()):
        if (cls, name) in _OWN:
            setattr(cls, name, method)
        else:
            delattr(cls, name)
    ORIGINALS.clear()
    _OWN.clear()


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a loop module right after it is first imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _LOOPS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            with _lock:
                if _installed:
                    _patch(module)

        # On this module's own loader object (made for this spec): the rest
        # of it (get_source for tracebacks, resources) stays as it is.
        setattr(loader, "exec_module", exec_and_patch)  # noqa: B010 - mypy: a method
        return spec


def install_loop_hooks() -> None:
    """Route both loops through the gateway (called by tether.install()). Idempotent."""
    global _installed, _finder
    with _lock:
        _installed = True
        for name in _LOOPS:
            module = sys.modules.get(name)
            if module is not None:
                _patch(module)
        if _finder is None:
            _finder = _PatchOnImport()
            sys.meta_path.insert(0, _finder)


def uninstall_loop_hooks() -> None:
    """Put the loops' own methods back (tether.uninstall()). Open connections keep working."""
    global _installed, _finder
    with _lock:
        _installed = False
        if _finder is not None:
            sys.meta_path.remove(_finder)
            _finder = None
        _unpatch()


def loop_hooks_installed() -> bool:
    return _installed


__all__ = ["install_loop_hooks", "loop_hooks_installed", "uninstall_loop_hooks"]
