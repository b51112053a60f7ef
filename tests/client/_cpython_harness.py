"""Run CPython's own ``test.test_socket`` cases with only the client half on tether.

CPython's threaded socket tests (``ThreadableTest``) run the server half in
the main thread (``setUp``, ``testFoo``) and the client half in a thread of
its own (``clientSetUp``, ``_testFoo``, started by ``clientRun``). Both halves
look names up on the one module global ``socket`` of ``test.test_socket``.

While a case runs, that global is replaced by a :class:`RoutedSocketModule`:
every attribute lookup is answered by ``tether.socket`` when it happens in a
*client context* and by the stdlib ``socket`` module otherwise. A client
context is the thread running ``clientRun`` (marked by a mixin placed in
front of the CPython class, see :func:`routed_class`) or, for a class with
no server half at all (``NetworkConnectionNoServer``), the whole test. The
test code itself is not modified; helpers such as ``test.support.socket_helper``
import the stdlib module themselves and stay on it (they bind the servers'
ports).

An audit hook makes the routing checkable and keeps the run on loopback:
while a case runs it records every kernel-level ``connect()`` with the
context it came from, and it refuses any lookup or connect that is not
loopback (tether's own name lookups go to the gateway's static table over the
control stream and never reach libc here).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket as _std
import sys
import threading
import types
import unittest
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import tether.socket as _tsock

_ctx = threading.local()


def in_client() -> bool:
    return bool(getattr(_ctx, "client", False))


@contextlib.contextmanager
def client_context() -> Iterator[None]:
    previous = in_client()
    _ctx.client = True
    try:
        yield
    finally:
        _ctx.client = previous


class RoutedSocketModule(types.ModuleType):
    """Stands in for ``test.test_socket.socket``: tether for the client, stdlib for the server.

    Attribute *assignments* go to the module the current context sees, so a
    test that patches ``socket.socket`` for ``socket.create_connection`` to
    pick up (``NetworkConnectionNoServer.mocked_socket_module``) patches the
    module whose ``create_connection`` it then calls, as it would with
    ``import tether.socket as socket``.
    """

    def __init__(self) -> None:
        super().__init__("socket", "the stdlib socket module, routed per thread to tether")

    @staticmethod
    def _target() -> types.ModuleType:
        return _tsock if in_client() else _std

    def __getattr__(self, name: str) -> Any:  # only for names not in the instance dict
        target = self._target()
        try:
            return getattr(target, name)
        except AttributeError:
            return getattr(_std, name)  # a private stdlib name tether.socket does not copy

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._target(), name)


class _ClientRunsOnTether:
    """Mixin put in front of a ThreadableTest class: its client thread is a client context."""

    def clientRun(self, test_func: Any) -> None:  # CPython's name
        _ctx.client = True
        try:
            super().clientRun(test_func)  # type: ignore[misc]
        finally:
            _ctx.client = False
            if self.queue.qsize():  # type: ignore[attr-defined]
                self._wake_server()

    def _wake_server(self) -> None:
        """The client half failed: a server half blocked in accept() would wait forever.

        CPython's own run would hang there too; shutting the listening socket
        down makes that accept() fail at once, so the failure is reported.
        """
        serv = getattr(self, "serv", None)
        if serv is not None:
            with contextlib.suppress(OSError):
                serv.shutdown(_std.SHUT_RDWR)


# -- the audit hook -----------------------------------------------------------------


@dataclass
class Recorder:
    active: bool = False
    client_connects: list[Any] = field(default_factory=list)
    server_connects: list[Any] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


_recorder = Recorder()
_hook_installed = False
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _etc_hosts_loopback_names() -> set[str]:
    """Names /etc/hosts maps to loopback: libc answers them without DNS."""
    names: set[str] = set()
    try:
        with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and _is_loopback_ip(fields[0]):
                    names.update(n.lower() for n in fields[1:])
    except OSError:
        pass
    return names


def _is_loopback_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _host_is_local(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("ascii", "replace")
    if not isinstance(host, str):
        return True  # not an Internet host (AF_UNIX path, CAN interface...)
    host = host.lower().rstrip(".")
    return host == "" or host in _LOOPBACK_NAMES or host in _HOSTS_FILE or _is_loopback_ip(host)


_HOSTS_FILE = _etc_hosts_loopback_names()
_ADDRESS_EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg"}
_LOOKUP_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    rec = _recorder
    if not rec.active or not event.startswith("socket."):
        return
    if event in _LOOKUP_EVENTS:
        host = args[0]
    elif event == "socket.getnameinfo":
        host = args[0][0] if isinstance(args[0], tuple) and args[0] else None
    elif event in _ADDRESS_EVENTS:
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None
        if event == "socket.connect":
            (rec.client_connects if in_client() else rec.server_connects).append(address)
    else:
        return
    if not _host_is_local(host):
        what = f"{event}{args[1:] if event in _ADDRESS_EVENTS else args}"
        rec.refused.append(what)
        raise PermissionError(f"cpython harness: only loopback is allowed here, refused {what}")


def _ensure_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)  # cannot be removed; inert unless a case is running
        _hook_installed = True


# -- running one case ----------------------------------------------------------------


def load_test_socket() -> types.ModuleType:
    import test.test_socket as module  # the stdlib's test package

    return module


def is_threaded(cls: type) -> bool:
    return hasattr(cls, "clientRun")


_routed: dict[type, type] = {}


def routed_class(cls: type) -> type:
    """``cls`` with its client thread marked as a client context (same test names)."""
    if not is_threaded(cls):
        return cls
    if cls not in _routed:
        namespace = {"__module__": cls.__module__}
        _routed[cls] = type(cls.__name__, (_ClientRunsOnTether, cls), namespace)
    return _routed[cls]


@dataclass
class Outcome:
    status: str  # passed | failed | skipped
    details: str
    client_connects: list[Any]
    server_connects: list[Any]
    refused: list[str]


@contextlib.contextmanager
def _routed_module(module: types.ModuleType) -> Iterator[None]:
    saved_std = dict(vars(_std))
    saved_tsock = dict(vars(_tsock))
    original = module.socket
    module.socket = RoutedSocketModule()
    try:
        yield
    finally:
        module.socket = original
        # A test that patched a module attribute and failed before restoring it
        # must not leave the patch behind for the rest of the session.
        for mod, saved in ((_std, saved_std), (_tsock, saved_tsock)):
            current = vars(mod)
            for name in set(current) - set(saved):
                delattr(mod, name)
            for name, value in saved.items():
                if current.get(name) is not value:
                    setattr(mod, name, value)


def run_case(cls: type, method: str) -> Outcome:
    """Run ``cls(method)`` with the routing and the audit hook; never raises for the test."""
    module = load_test_socket()
    _ensure_hook()
    case = routed_class(cls)(method)
    result = unittest.TestResult()
    rec = _recorder
    rec.client_connects, rec.server_connects, rec.refused = [], [], []
    whole_test_is_client = not is_threaded(cls)
    with _routed_module(module):
        rec.active = True
        try:
            if whole_test_is_client:
                with client_context():
                    case.run(result)
            else:
                case.run(result)
        finally:
            rec.active = False
    problems = [text for _case, text in result.errors + result.failures]
    problems += [f"unexpected success: {c}" for c in result.unexpectedSuccesses]
    if problems:
        status, details = "failed", "\n".join(problems)
    elif result.skipped:
        status, details = "skipped", "; ".join(reason for _case, reason in result.skipped)
    else:
        status, details = "passed", ""
    return Outcome(
        status, details, list(rec.client_connects), list(rec.server_connects), list(rec.refused)
    )
