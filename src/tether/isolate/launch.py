"""``tether run --isolate``: start the helper, take the namespace's sockets, serve them.

The order matters and is the whole protocol with enter.py:

1. a private temporary directory: the namespace's resolv.conf and, when the
   gateway is on TCP, the bridge's Unix socket for Python's drop-in;
2. the helper, started with one end of a socket pair, gets the spec (the
   command, its environment, the resolv.conf) and answers with the
   namespace's sockets or an error in words;
3. the agent serves the sockets on a loop in a thread of this process;
4. the helper has become the command: ``tether run`` waits for it
   (forwarding SIGINT/SIGTERM), then stops the agent and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from tether.client import settings as client_settings
from tether.client.settings import ENV_GATEWAY, Settings
from tether.devmode import gateway_env
from tether.isolate import enter, rules
from tether.isolate.agent import Agent

HELPER = [sys.executable, "-m", "tether.isolate.enter"]
START_TIMEOUT = 30.0  # seconds for the helper's setup: an interpreter start, ip and nft runs
STOP_TIMEOUT = 5.0  # seconds for the agent's loop to close its sockets at the end


class IsolateError(OSError):
    """The namespace could not be set up; the text says which step and why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def namespace_env(env: dict[str, str], gateway_for_python: str) -> dict[str, str]:
    """The command's environment, with the drop-in's gateway reachable from inside.

    ``tether run`` adds no proxy variables under --isolate (every connection
    is redirected to the gateway anyway); the user's own are left as they
    are: a proxy they name is then reached through the gateway, like any
    other destination.
    """
    return {**env, ENV_GATEWAY: gateway_for_python}


class Isolated:
    """One isolated command: its helper process, its agent thread, its directory."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        settings: Settings,
        *,
        helper: list[str] | None = None,
        log: Callable[[str], None] | None = None,
        user_namespace: bool | None = None,
    ) -> None:
        self.cmd = cmd
        self.settings = settings
        self.helper = helper or HELPER
        self.user_namespace = user_namespace  # None: only without root (namespace.py)
        self.dir = Path(tempfile.mkdtemp(prefix="tether-isolate-"))
        self.resolv_conf = self.dir / "resolv.conf"
        self.resolv_conf.write_text(rules.RESOLV_CONF)
        self.resolv_conf.chmod(0o644)  # read by every process in the namespace
        self.bridge = None if settings.gateway.is_unix else str(self.dir / "gateway.sock")
        python_gateway = f"unix:{self.bridge}" if self.bridge else str(settings.gateway)
        self.env = namespace_env(env, python_gateway)
        self.agent = Agent(settings, own_port=rules.AGENT_PORT, log=log)
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    def start(self) -> subprocess.Popen[bytes]:
        """Set the namespace up and start the agent; the command's process. Raises IsolateError."""
        client_settings.configure(self.settings)  # the agent's tether client: this gateway
        parent, child = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [*self.helper, str(child.fileno())], pass_fds=[child.fileno()], env=gateway_env()
            )
            child.close()
            enter.write_spec(parent, {
                "argv": self.cmd,
                "env": self.env,
                "resolv_conf": str(self.resolv_conf),
                "agent_port": rules.AGENT_PORT,
                "user_namespace": self.user_namespace,
            })
            parent.settimeout(START_TIMEOUT)
            message, fds, _flags, _addr = socket.recv_fds(parent, 1 << 16, 8)
        except OSError as exc:
            self._abandon()
            raise IsolateError(f"tether run --isolate: the helper did not answer: {exc}",
                               enter.EXIT_SETUP) from exc
        finally:
            child.close()
            parent.close()
        if message != enter.READY or not fds:
            for fd in fds:
                os.close(fd)
            raise self._helper_error(message)
        sockets = [socket.socket(fileno=fd) for fd in fds]
        self.thread = threading.Thread(target=self._run_agent, args=(sockets,),
                                       name="tether-isolate-agent", daemon=True)
        self.thread.start()
        self._serving.wait(START_TIMEOUT)
        if self._failure is not None:
            self.stop()
            raise IsolateError(f"tether run --isolate: the agent did not start: {self._failure}",
                               enter.EXIT_SETUP) from self._failure
        return self.proc

    def _helper_error(self, message: bytes) -> IsolateError:
        """The helper's error message (it exits after sending it), or why there is none."""
        status = enter.EXIT_SETUP
        text = "tether run --isolate: the helper ended before the namespace was ready"
        if message:
            import json

            with contextlib.suppress(ValueError):
                body = json.loads(message[4:])
                text, status = str(body["error"]), int(body["exit"])
        self._abandon()
        return IsolateError(text, status)

    def _abandon(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(START_TIMEOUT)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run_agent(self, sockets: list[socket.socket]) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve(sockets))
        except BaseException as exc:  # reported by start() or ignored at the end
            self._failure = exc
        finally:
            self._serving.set()
            for s in sockets:
                s.close()

    async def _serve(self, sockets: list[socket.socket]) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sock in sockets:
            if sock.type == socket.SOCK_DGRAM:
                await self.agent.serve_dns(sock)
            else:
                await self.agent.serve_tcp(sock)
        if self.bridge is not None:
            await self.agent.serve_bridge(self.bridge)
        self._serving.set()
        await self._stop.wait()
        await self.agent.close()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(STOP_TIMEOUT)
        client_settings.configure(None)
        shutil.rmtree(self.dir, ignore_errors=True)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where installed (a tether dependency off Windows): the agent relays every byte."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
