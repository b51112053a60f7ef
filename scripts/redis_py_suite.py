"""redis-py's own asyncio tests, direct and through tether, with the per-test outcomes compared.

    .venv/bin/python scripts/redis_py_suite.py [--work DIR] [--no-uvloop] [FILE ...]

Not part of the test suite: it downloads redis-py's sdist (the version
pinned in constraints.txt) and installs its test tools into a throwaway
venv under the work directory, and a run takes a few minutes. Nothing of
redis-py is copied into this repository.

The same test files run twice against a private ``redis-server`` this
script starts on a free 127.0.0.1 port (redis-py's fixtures FLUSHDB, which
must never touch the machine's shared Redis) and stops by its PID:

1. direct: pytest on this host, ``--uvloop`` by default;
2. tethered: the same pytest under ``tether run`` inside a new network
   namespace with no network (tests/netns.py), the gateway outside it
   reached over a Unix socket. There, anything that does not go through the
   gateway fails instead of passing.

It prints, per file, the passed/failed/skipped/error counts of both runs,
every test whose outcome differs, and the gateway's connected decisions;
exit status 0 only when every test has the same outcome both ways.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from netns import netns_argv  # noqa: E402  (tests/ is not a package on the path)

from tether.devmode import GatewayProcess  # noqa: E402

# Files that need nothing but one plain Redis: no cluster, sentinel, modules,
# TLS, or servers of their own on the test's loopback (which, inside the
# namespace, is not the loopback the gateway connects from).
DEFAULT_FILES = (
    "test_commands.py",
    "test_pipeline.py",
    "test_pubsub.py",
    "test_connection_pool.py",
    "test_connection.py",
    "test_lock.py",
    "test_scripting.py",
    "test_monitor.py",
    "test_hash.py",
    "test_keyspace_notifications.py",
    "test_encoding.py",
    "test_retry.py",
    "test_client.py",
)
# redis-py's dev_requirements.txt: what its test files import beyond redis.
TEST_TOOLS = ("pytest", "pytest-timeout", "pytest-asyncio", "packaging")
# A pytest plugin (-p) that records, for every test, the loop it ran on and
# whose socket class the socket module had: evidence that the tethered run
# was on uvloop with tether installed, not merely asked to be.
PROBE = """\
import asyncio, os, socket
import pytest_asyncio

@pytest_asyncio.fixture(autouse=True)
async def _tether_loop_probe():
    with open(os.environ["LOOP_PROBE_FILE"], "a") as f:
        loop = type(asyncio.get_running_loop())
        f.write(f"{loop.__module__}.{loop.__name__} {socket.socket.__module__}\\n")
    yield
"""
START_TIMEOUT = 10.0  # redis-server answering PING; seconds
RUN_TIMEOUT = 1800.0  # one pytest run; the direct one takes ~2 minutes here
APP = "redis-py"


def pinned(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit(f"{name} is not pinned in constraints.txt")


def run(argv: list[str], **kwargs: object) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def fetch_sdist(work: Path, version: str) -> Path:
    """redis-py's sdist, unpacked (it carries the tests/ tree)."""
    tree = work / f"redis-{version}"
    if not tree.is_dir():
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", f"redis=={version}", "-d", str(work)])
        with tarfile.open(work / f"redis-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    if not (tree / "tests" / "test_asyncio").is_dir():
        raise SystemExit(f"{tree} has no tests/test_asyncio")
    return tree


def make_venv(work: Path, version: str) -> Path:
    """A throwaway venv with tether (this checkout), redis and redis-py's test tools."""
    env_dir = work / "venv"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.create(env_dir, with_pip=True)
        run([str(python), "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints.txt"),
             "-e", str(REPO), f"redis=={version}", *TEST_TOOLS])
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)],
        stdout=(work / "redis-server.log").open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit(f"redis-server did not answer on 127.0.0.1:{port}")


def gateway_config(work: Path, key: str) -> Path:
    (work / "audit.jsonl").unlink(missing_ok=True)  # this run's lines only (--work is reused)
    path = work / "tether.toml"
    path.write_text(
        "[gateway]\n"
        f'audit_log = "{work / "audit.jsonl"}"\n\n'
        '[resolver]\nmode = "static"\n\n'
        '[resolver.hosts]\n"localhost" = ["127.0.0.1"]\n\n'
        # The private Redis is on loopback, which the policy denies unless allowed.
        '[policy]\nallow = ["127.0.0.0/8:*"]\n\n'
        f'[apps.{APP}]\nkey = "{key}"\n'
    )
    return path


def outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from pytest's JUnit XML."""
    result: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = "passed"
        for kind in ("error", "failure", "skipped"):
            if kind in kinds:
                outcome = {"failure": "failed"}.get(kind, kind)
                break
        # A test can report twice (a failed call, then an error in teardown).
        if result.get(test_id, "passed") == "passed":
            result[test_id] = outcome
    return result


def per_file(results: dict[str, str]) -> dict[str, collections.Counter[str]]:
    files: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for test_id, outcome in results.items():
        module = test_id.split("::")[0]
        name = next((p for p in module.split(".") if p.startswith("test_") and
                     p != "test_asyncio"), module)
        files[name][outcome] += 1
    return files


def connected_decisions(audit: Path) -> int:
    if not audit.exists():
        return 0
    count = 0
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "decision" and record.get("outcome") == "connected":
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES),
                        help="files under redis-py's tests/test_asyncio")
    parser.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one)")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                        help="the default asyncio loop instead of uvloop")
    args = parser.parse_args()

    temporary = args.work is None
    work: Path = Path(tempfile.mkdtemp(prefix="redis-py-suite-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    version = pinned("redis")
    tree = fetch_sdist(work, version)
    python = make_venv(work, version)
    redis_proc, port = start_redis(work)
    key = secrets.token_urlsafe(16)
    gateway = GatewayProcess(gateway_config(work, key), listen=f"unix:{work / 'gateway.sock'}")
    try:
        address = gateway.start()
        pytest_argv = [
            str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
            f"--redis-url=redis://localhost:{port}/0",
            *(["--uvloop"] if args.uvloop else []),
            *(f"tests/test_asyncio/{name}" for name in args.files),
        ]
        probe_dir = work / "probe"
        probe_dir.mkdir(exist_ok=True)
        (probe_dir / "tether_loop_probe.py").write_text(PROBE)
        results: dict[str, dict[str, str]] = {}
        seen: dict[str, collections.Counter[str]] = {}
        for mode in ("direct", "tethered"):
            junit, probe = work / f"{mode}.xml", work / f"{mode}.loops"
            probe.unlink(missing_ok=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
            env.update(PYTHONPATH=str(probe_dir), LOOP_PROBE_FILE=str(probe))
            argv = [*pytest_argv, "-p", "tether_loop_probe", f"--junitxml={junit}"]
            if mode == "tethered":
                tether = str(python.parent / "tether")
                argv = netns_argv([tether, "run", "--gateway", address, "--app", APP,
                                   f"--key={key}", "--", *argv])
            started = time.monotonic()
            print(f"== {mode}", flush=True)
            with (work / f"{mode}.log").open("w") as log:
                subprocess.run(argv, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                               timeout=RUN_TIMEOUT, check=False)
            print(f"   {time.monotonic() - started:.0f} s, log {work / f'{mode}.log'}")
            results[mode] = outcomes(junit)
            seen[mode] = collections.Counter(probe.read_text().splitlines())
    finally:
        gateway.stop()
        redis_proc.terminate()
        redis_proc.wait(10)

    direct, tethered = results["direct"], results["tethered"]
    print(f"\nredis-py {version}, {len(args.files)} files, "
          f"{'uvloop' if args.uvloop else 'default asyncio loop'}; "
          "tethered = namespace with no network, gateway over unix:")
    kinds = ("passed", "failed", "skipped", "error")
    print(f"{'file':<36}" + "".join(f"{k + ' d/t':>18}" for k in kinds))
    by_direct, by_tethered = per_file(direct), per_file(tethered)
    totals = {mode: collections.Counter[str]() for mode in ("d", "t")}
    for name in sorted(set(by_direct) | set(by_tethered)):
        d, t = by_direct[name], by_tethered[name]
        totals["d"].update(d)
        totals["t"].update(t)
        print(f"{name:<36}" + "".join(f"{f'{d[k]}/{t[k]}':>18}" for k in kinds))
    d, t = totals["d"], totals["t"]
    print(f"{'total':<36}" + "".join(f"{f'{d[k]}/{t[k]}':>18}" for k in kinds))
    print(f"gateway: {connected_decisions(work / 'audit.jsonl')} connections decided and made")
    want_loop = "uvloop.Loop" if args.uvloop else "asyncio.unix_events._UnixSelectorEventLoop"
    want_socket = {"direct": "socket", "tethered": "tether.client.sock"}
    wrong = 0
    for mode, counts in seen.items():
        print(f"{mode}: tests on (loop, socket class):",
              ", ".join(f"{what} x{n}" for what, n in counts.items()))
        wrong += sum(n for what, n in counts.items() if what != f"{want_loop} {want_socket[mode]}")

    differ = sorted(
        (test_id, direct.get(test_id, "absent"), tethered.get(test_id, "absent"))
        for test_id in set(direct) | set(tethered)
        if direct.get(test_id) != tethered.get(test_id)
    )
    for test_id, d_outcome, t_outcome in differ:
        print(f"DIFFERS {test_id}: direct {d_outcome}, tethered {t_outcome}")
    print(f"{len(differ)} of {len(set(direct) | set(tethered))} tests differ")
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory kept: {work}")
    if wrong:
        print(f"{wrong} tests ran on another loop or socket class than asked")
    return 1 if differ or wrong or not direct else 0


if __name__ == "__main__":
    sys.exit(main())
