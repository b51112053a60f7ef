"""``tether serve --workers N``: N gateway processes sharing the listeners.

One gateway is one Python process on one core. With ``--workers N`` the
command becomes a **supervisor** that runs N worker processes (each the
same ``tether serve``, told which worker it is by ``--worker-spec``):

- TCP listeners: every worker binds its own socket with ``SO_REUSEPORT``;
  the kernel spreads new connections over the workers listening (a hash of
  the connection's addresses). The supervisor binds each address first,
  with the same option and without listening, so an ephemeral port (``:0``)
  is chosen once for all workers and the port stays the service's while a
  worker restarts.
- Unix listeners (``gateway.listen`` and each app's own): ``SO_REUSEPORT``
  does not balance ``AF_UNIX``, so the supervisor binds and listens once and
  every worker inherits the descriptor and accepts from it.
- Each worker is a node: ``node_id`` is ``BASE-I`` (BASE: the host's name),
  with a node-link Unix socket path ``RUNTIME_DIR/worker-I.sock`` in a
  directory only this user can enter; :class:`WorkerSpec` gives every
  worker the others' ids and paths, so they find each other without Redis.
- The supervisor restarts a worker that exits (backoff, one log line with
  the exit status), passes SIGHUP on (each worker reloads its config),
  passes SIGTERM and SIGINT on (each worker drains, docs/workers.md), and
  exits once every worker has exited after one of them.

Limits given as numbers in the config (``max_sockets``,
``max_sockets_per_app``, ``[apps.NAME] max_sockets``) are the service's:
each worker enforces its share, rounded up (:func:`share_caps`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tether.config import Config
from tether.endpoint import Endpoint, parse_endpoint
from tether.quota.limits import WINDOWS, Limits

if TYPE_CHECKING:
    from tether.gateway.server import Gateway

log = logging.getLogger("tether.supervisor")

# A dead worker is restarted after RESTART_FIRST s, doubling per exit up to
# RESTART_MAX, like Kubernetes' CrashLoopBackOff (10 s doubling to 5 min,
# reset after 10 min up) scaled down: a local worker starts in well under a
# second and its siblings serve meanwhile, but a worker that dies at start
# (a config made bad since) must not spin a core.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# A worker that ran this long before exiting starts again from RESTART_FIRST.
RESTART_RESET = 60.0
# After SIGTERM the workers drain for gateway.drain_timeout, then answer
# apps asking why for server.SHUTDOWN_GRACE (2 s); one that has not exited
# this long after those is killed.
STOP_SLACK = 10.0
# The kernel queue of the shared Unix listener: asyncio's create_server default.
UNIX_BACKLOG = 100
# The proxy front-ends' listener keys ([gateway]): bound by the supervisor too.
PROXY_LISTENERS = ("http_proxy_listen", "socks5_listen")
# HMAC-SHA256's own output size: the key the workers sign handoffs with.
HANDOFF_KEY_BYTES = 32
# Linux prctl(2): the signal a worker gets when its supervisor dies.
_PR_SET_PDEATHSIG = 1


def node_base() -> str:
    """The host's name: a worker's node id is ``NAME-I``."""
    return socket.gethostname()


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told by its supervisor (``--worker-spec``, JSON).

    `unix`: each shared Unix listener's path and the descriptor the worker
    inherits for it; `ready_fd`: a pipe the worker writes its index to once
    it listens.
    """

    index: int
    count: int
    base: str
    runtime_dir: str
    supervisor: int
    ready_fd: int = -1
    unix: dict[str, int] = field(default_factory=dict)
    # The proxy front-ends' listeners with the ports the supervisor chose
    # for ":0" (config key -> endpoints), so every worker has the same ones.
    proxies: dict[str, list[str]] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.node_of(self.index)

    def node_of(self, index: int) -> str:
        return f"{self.base}-{index}"

    @property
    def key_path(self) -> str:
        """The key this run's workers sign handoffs with (made by the supervisor, mode 0600)."""
        return os.path.join(self.runtime_dir, "handoff.key")

    def read_key(self) -> bytes:
        with open(self.key_path, "rb") as f:
            return f.read()

    def link_path(self, index: int) -> str:
        """Worker `index`'s node-link Unix socket (same-host forwarding)."""
        return os.path.join(self.runtime_dir, f"worker-{index}.sock")

    @property
    def peers(self) -> dict[str, str]:
        """The other workers of this host: node id -> node-link path."""
        return {self.node_of(i): self.link_path(i) for i in range(self.count) if i != self.index}

    def to_json(self) -> str:
        return json.dumps({
            "index": self.index, "count": self.count, "base": self.base,
            "runtime_dir": self.runtime_dir, "supervisor": self.supervisor,
            "ready_fd": self.ready_fd, "unix": self.unix, "proxies": self.proxies,
        })

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            index=int(data["index"]), count=int(data["count"]), base=str(data["base"]),
            runtime_dir=str(data["runtime_dir"]), supervisor=int(data["supervisor"]),
            ready_fd=int(data["ready_fd"]),
            unix={str(k): int(v) for k, v in dict(data["unix"]).items()},
            proxies={str(k): [str(e) for e in v] for k, v in dict(data["proxies"]).items()},
        )

    # -- in the worker ---------------------------------------------------------

    def attach(self, gateway: Gateway) -> None:
        """Before `gateway` starts: its node id, SO_REUSEPORT, the inherited Unix listeners."""
        _die_with_supervisor(self.supervisor)
        gateway.node_id = self.node_id
        gateway.worker = self
        gateway.reuse_port = True
        for path, fd in self.unix.items():
            gateway.inherited[path] = socket.socket(fileno=fd)

    def started(self, gateway: Gateway) -> None:
        """`gateway` listens: tell the supervisor (once)."""
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, f"{self.index}\n".encode())
                os.close(self.ready_fd)
            object.__setattr__(self, "ready_fd", -1)


def share(value: int | None, count: int) -> int | None:
    """One worker's share of a limit: divided by `count`, rounded up, at least 1."""
    return None if value is None else max(1, math.ceil(value / count))


def share_caps(config: Config, count: int) -> Config:
    """`config`'s limits as one of `count` workers enforces them: each divided, rounded up.

    The caps (``max_sockets``, ``max_sockets_per_app``) and, without
    ``[cluster]`` (whose quotas are counted in Redis across the nodes), every
    per-app quota limit. The kernel spreads connections evenly on average,
    not exactly, so an app may be refused by one worker while another has
    room; rounding up lets the host as a whole exceed a limit by at most
    count - 1. Caps left to be derived from the open-files limit are per
    process already.
    """
    if count <= 1:
        return config

    def limits(value: Limits) -> Limits:
        shares: dict[str, Any] = {name: share(getattr(value, name), count) for name in WINDOWS}
        return replace(value, **shares)

    changes: dict[str, Any] = {
        "max_sockets": share(config.max_sockets, count),
        "max_sockets_per_app": share(config.max_sockets_per_app, count),
        "apps": {name: replace(app, max_sockets=share(app.max_sockets, count))
                 for name, app in config.apps.items()},
    }
    if config.cluster is None:
        quota = config.quota
        changes["quota"] = replace(
            quota, defaults=limits(quota.defaults),
            apps={name: limits(value) for name, value in quota.apps.items()},
        )
    return replace(config, **changes)


def worker_config(config: Config, spec: WorkerSpec) -> Config:
    """`config` as worker `spec` runs it: its share of the limits; its own admin listener;
    the proxy listeners on the ports the supervisor chose."""
    config = share_caps(config, spec.count)
    changes: dict[str, Any] = {
        key: tuple(parse_endpoint(text) for text in texts) for key, texts in spec.proxies.items()
    }
    admin = config.admin_listen
    if admin is not None:
        # One per worker, so a scrape reads one worker (each is a node).
        if admin.is_unix:
            base, ext = os.path.splitext(admin.path)
            changes["admin_listen"] = Endpoint(path=f"{base}-{spec.index}{ext}")
        elif admin.port:
            changes["admin_listen"] = Endpoint(host=admin.host, port=admin.port + spec.index)
    return replace(config, **changes)


def _die_with_supervisor(supervisor: int) -> None:
    """A worker whose supervisor is gone (SIGKILL) drains and exits instead of lingering."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# -- the supervisor ---------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_FIRST
    restart_at: float | None = None
    # Listening (it wrote to the ready pipe): its signal handlers are in place.
    ready: bool = False
    # A SIGHUP came while it was starting: passed on once it is ready.
    reload_pending: bool = False


class Supervisor:
    """Runs `count` workers of `argv` (``tether serve`` without --workers) until stopped."""

    def __init__(
        self,
        config: Config,
        count: int,
        argv: Callable[[list[Endpoint], WorkerSpec], list[str]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.count = count
        self.argv = argv
        self.clock = clock
        self.workers = [_Worker(i) for i in range(count)]
        self.stopping: signal.Signals | None = None
        self.kill_at: float | None = None
        self.status = 0
        self._held: list[socket.socket] = []
        self._unix: dict[str, socket.socket] = {}
        self._endpoints: list[Endpoint] = []
        self._proxies: dict[str, list[str]] = {}
        self.runtime_dir = ""
        self._ready_r = self._ready_w = -1
        self._announced = False

    # -- listeners ---------------------------------------------------------------

    def bind(self) -> list[Endpoint]:
        """Bind every listener once; gateway.listen with real ports. OSError if one fails.

        Unix sockets are bound and listened on here, for the workers to
        inherit (a worker binding its own would unlink its sibling's); TCP
        addresses are bound without listening, to fix a ":0" port once for
        every worker (each binds its own with SO_REUSEPORT).
        """
        endpoints = [self._bind(e) for e in self.config.listen]
        for endpoint, _app in self.config.app_listeners:
            self._bind(endpoint)
        for key in PROXY_LISTENERS:
            self._proxies[key] = [str(self._bind(e)) for e in getattr(self.config, key)]
        self._endpoints = endpoints
        return endpoints

    def _bind(self, endpoint: Endpoint) -> Endpoint:
        if endpoint.is_unix:
            self._bind_unix(endpoint.path)
            return endpoint
        sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
        self._held.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((endpoint.host, endpoint.port))
        # Held, not listening: the port stays the service's; connections go
        # only to the workers' listening sockets.
        return Endpoint(host=endpoint.host, port=sock.getsockname()[1])

    def _bind_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if _is_socket(path):
                os.unlink(path)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(UNIX_BACKLOG)
        sock.set_inheritable(True)
        self._unix[path] = sock

    # -- workers ---------------------------------------------------------------

    def spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(
            index=index, count=self.count, base=node_base(), runtime_dir=self.runtime_dir,
            supervisor=os.getpid(), ready_fd=self._ready_w,
            unix={path: sock.fileno() for path, sock in self._unix.items()},
            proxies=self._proxies,
        )

    def spawn(self, worker: _Worker) -> None:
        spec = self.spec(worker.index)
        fds = [*spec.unix.values(), self._ready_w]
        worker.proc = subprocess.Popen(
            self.argv(self._endpoints, spec), pass_fds=fds, stdin=subprocess.DEVNULL
        )
        worker.started = self.clock()
        worker.restart_at = None
        worker.ready = worker.reload_pending = False
        log.info("worker %d (node %s) started: pid %d",
                 worker.index, spec.node_id, worker.proc.pid)

    def reap(self) -> None:
        """Look at every worker: a dead one is logged and, unless stopping, scheduled again."""
        now = self.clock()
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            worker.proc = None
            status = proc.returncode
            what = (f"was killed by {_signal_name(-status)}" if status < 0
                    else f"exited with status {status}")
            if self.stopping is not None:
                log.info("worker %d (pid %d) %s", worker.index, proc.pid, what)
                if status not in (0, -int(signal.SIGTERM), -int(signal.SIGINT)):
                    self.status = 1
                continue
            if now - worker.started >= RESTART_RESET:
                worker.backoff = RESTART_FIRST
            worker.restart_at = now + worker.backoff
            log.warning("worker %d (pid %d) %s; restarting it in %g s",
                        worker.index, proc.pid, what, worker.backoff)
            worker.backoff = min(RESTART_MAX, worker.backoff * 2)

    def signal_all(self, sig: signal.Signals) -> int:
        sent = 0
        for worker in self.workers:
            if sig == signal.SIGHUP and not worker.ready:
                # Before its handler is in place SIGHUP would end it; and it
                # may have read the config before the change.
                worker.reload_pending = True
                continue
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)
                    sent += 1
        return sent

    def on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            sent = self.signal_all(sig)
            log.info("SIGHUP: passed on to %d workers (each reloads its config)%s", sent,
                     "; the others get it once they listen" if sent < self.count else "")
            return
        if sig not in (signal.SIGTERM, signal.SIGINT):
            return  # SIGCHLD: reap() looks
        first = self.stopping is None
        self.stopping = sig
        if first:
            # Workers drain for drain_timeout; SIGINT stops them at once.
            self.kill_at = self.clock() + self.config.drain_timeout + STOP_SLACK
        sent = self.signal_all(sig)
        log.info("%s: passed on to %d workers; exiting once they have", sig.name, sent)

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data = os.read(self._ready_r, 4096)
            for line in data.split():
                index = int(line)
                if 0 <= index < self.count:
                    worker = self.workers[index]
                    worker.ready = True
                    pid = worker.proc.pid if worker.proc is not None else 0
                    log.info("worker %d (node %s, pid %d) listening",
                             index, self.spec(index).node_id, pid)
                    if worker.reload_pending and worker.proc is not None:
                        worker.reload_pending = False
                        worker.proc.send_signal(signal.SIGHUP)
        if not self._announced and all(w.ready for w in self.workers):
            self._announced = True
            log.info(
                "%d workers ready on %s (nodes %s)", self.count,
                ", ".join(str(e) for e in self._endpoints),
                ", ".join(self.spec(w.index).node_id for w in self.workers),
            )

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Bind, start the workers and supervise them until they have exited after a stop."""
        try:
            self.bind()
        except OSError as exc:
            log.error("cannot listen: %s", exc)  # noqa: TRY400 - the reason is enough
            self._close()
            return 1
        self.runtime_dir = tempfile.mkdtemp(prefix="tether-workers-")  # mode 0700
        # Handoffs name the worker holding the socket, signed with this key
        # (gateway/workerlink.py); new for every run, as the sockets are.
        key_fd = os.open(os.path.join(self.runtime_dir, "handoff.key"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(key_fd, "wb") as key_file:
            key_file.write(secrets.token_bytes(HANDOFF_KEY_BYTES))
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, _noop) for sig in wanted}
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for worker in self.workers:
                self.spawn(worker)
            while True:
                self.reap()
                if self.stopping is not None and all(w.proc is None for w in self.workers):
                    break
                now = self.clock()
                if self.stopping is None:
                    for worker in self.workers:
                        if worker.restart_at is not None and worker.restart_at <= now:
                            self.spawn(worker)
                elif self.kill_at is not None and now >= self.kill_at:
                    log.warning("workers still running %g s after the drain: killing them",
                                STOP_SLACK)
                    self.signal_all(signal.SIGKILL)
                    self.kill_at = None
                    self.status = 1
                due = [w.restart_at for w in self.workers if w.restart_at is not None]
                if self.kill_at is not None:
                    due.append(self.kill_at)
                timeout = max(0.0, min(due) - now) if due else None
                readable, _, _ = select.select([wake_r, self._ready_r], [], [], timeout)
                if self._ready_r in readable:
                    self._read_ready()
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        for signum in os.read(wake_r, 1024):
                            self.on_signal(signal.Signals(signum))
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (wake_r, wake_w):
                os.close(fd)
            self._close()
        return self.status

    def _close(self) -> None:
        for sock in self._held:
            sock.close()
        for path, sock in self._unix.items():
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for fd in (self._ready_r, self._ready_w):
            if fd >= 0:
                os.close(fd)
        self._ready_r = self._ready_w = -1
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _noop(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd carries the signal to the loop."""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def worker_argv(args: argparse.Namespace) -> Callable[[list[Endpoint], WorkerSpec], list[str]]:
    """The command line of a worker: this ``tether serve`` with its listeners and its spec."""

    def argv(endpoints: list[Endpoint], spec: WorkerSpec) -> list[str]:
        command = [sys.executable, "-m", "tether.gateway"]
        if args.config is not None:
            command += ["--config", str(args.config)]
        for endpoint in endpoints:
            command += ["--listen", str(endpoint)]
        if args.verbose:
            command.append("-v")
        return [*command, "--worker-spec", spec.to_json()]

    return argv


def supervise(config: Config, count: int, args: argparse.Namespace) -> int:
    """``tether serve --workers COUNT``: run the supervisor; its exit status."""
    log.info("supervisor (pid %d): starting %d workers", os.getpid(), count)
    return Supervisor(config, count, worker_argv(args)).run()


__all__ = [
    "RESTART_FIRST",
    "RESTART_MAX",
    "Supervisor",
    "WorkerSpec",
    "share_caps",
    "supervise",
    "worker_argv",
]
