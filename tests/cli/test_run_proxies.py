"""`tether run` gives programs that are not Python the gateway's proxies: curl, wget, git, pip.

A real gateway process offers its HTTP proxy and SOCKS5 front-ends; the
commands run under `tether run` unmodified, with no proxy option: the
environment `tether run` sets takes them through the gateway, whose audit
log shows each decision. Names are mapped to loopback by `[resolver.hosts]`;
`blocked.test` is denied by the app's own rule.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import APP, Gateway, needs_program, start_gateway, tether_cli, wait_for

PAGE = b"served through the gateway\n"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A static HTTP server on loopback (untethered: the test process is not installed)."""
    root = tmp_path_factory.mktemp("site")
    (root / "page.txt").write_bytes(PAGE)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, site: tuple[Path, int]) -> Iterator[Gateway]:
    key = secrets.token_urlsafe(16)
    port = site[1]
    config = f"""\
[gateway]
listen = ["127.0.0.1:0"]
http_proxy_listen = "127.0.0.1:0"
socks5_listen = "127.0.0.1:0"

[resolver]
mode = "static"

[resolver.hosts]
"www.test" = ["127.0.0.1"]
"git.test" = ["127.0.0.1"]
"blocked.test" = ["127.0.0.1"]

[policy]
allow = ["127.0.0.1:{port}"]

[apps.{APP}]
key = "{key}"
policy = {{ deny = ["blocked.test"] }}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("gw"), config, key)
    try:
        yield gateway
    finally:
        gateway.process.stop()


def _run(gw: Gateway, tmp: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    key_file = tmp / "key"
    key_file.write_text(gw.key)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "127.0.0.1,localhost,.test"  # removed by tether run: it must not matter
    return tether_cli("run", "--gateway", gw.address, "--app", gw.app, "--key-file",
                      str(key_file), "--", *cmd, cwd=tmp, env=env)


def _decision(gw: Gateway, host: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        lines = [json.loads(line.split("tether.audit: ", 1)[1])
                 for line in gw.log_text().splitlines() if "tether.audit: " in line]
        return [d for d in lines if d["event"] == "decision" and d["host"] == host]

    assert wait_for(lambda: bool(found())), gw.log_text()[-2000:]
    return found()[-1]


def test_the_environment_names_both_proxies_and_python_keeps_the_native_path(
    gw: Gateway, tmp_path: Path
) -> None:
    code = (
        "import os, json, urllib.request\n"
        "print(json.dumps({k: os.environ.get(k) for k in ('http_proxy', 'HTTPS_PROXY', "
        "'ALL_PROXY', 'all_proxy', 'NO_PROXY', 'no_proxy')}))\n"
        "print(json.dumps(urllib.request.getproxies()))\n"
    )
    result = _run(gw, tmp_path, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    env_line, proxies_line = result.stdout.splitlines()
    seen = json.loads(env_line)
    assert seen["http_proxy"] == seen["HTTPS_PROXY"]
    assert seen["http_proxy"].startswith(f"http://{APP}:")
    assert seen["ALL_PROXY"] == seen["all_proxy"]
    assert seen["ALL_PROXY"].startswith(f"socks5h://{APP}:")
    assert seen["NO_PROXY"] is None and seen["no_proxy"] is None
    # Python goes through the gateway natively: urllib (requests, pip) sees no proxy.
    assert json.loads(proxies_line) == {}


@needs_program("curl")
def test_curl_with_no_proxy_option(gw: Gateway, site: tuple[Path, int], tmp_path: Path) -> None:
    port = site[1]
    result = _run(gw, tmp_path, "curl", "-sS", "--max-time", "10",
                  f"http://www.test:{port}/page.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE.decode()
    decision = _decision(gw, "www.test")
    assert (decision["app"], decision["outcome"], decision["port"]) == (APP, "connected", port)
    # HTTPS_PROXY / ALL_PROXY: a CONNECT tunnel (curl -p) and SOCKS5 (socks5h) work too.
    result = _run(gw, tmp_path, "curl", "-sS", "-p", "--max-time", "10",
                  f"http://www.test:{port}/page.txt")
    assert result.stdout == PAGE.decode(), result.stderr
    result = _run(gw, tmp_path, "sh", "-c",
                  f'curl -sS --max-time 10 -x "$ALL_PROXY" http://www.test:{port}/page.txt')
    assert result.stdout == PAGE.decode(), result.stderr


@needs_program("curl")
def test_curl_to_a_denied_destination_gets_the_reason(
    gw: Gateway, site: tuple[Path, int], tmp_path: Path
) -> None:
    result = _run(gw, tmp_path, "curl", "-sS", "-i", "--max-time", "10",
                  f"http://blocked.test:{site[1]}/page.txt")
    assert result.stdout.startswith("HTTP/1.1 403 Forbidden"), result.stderr
    assert (f"X-Tether-Refusal: tether: connection to blocked.test:{site[1]} denied for app "
            f"'{APP}'") in result.stdout
    assert "X-Tether-Rule: deny blocked.test" in result.stdout
    decision = _decision(gw, "blocked.test")
    assert (decision["outcome"], decision["rule"]) == ("denied", "deny blocked.test")


@needs_program("wget")
def test_wget_with_no_proxy_option(gw: Gateway, site: tuple[Path, int], tmp_path: Path) -> None:
    result = _run(gw, tmp_path, "wget", "-q", "-O", "-", "--tries=1", "--timeout=10",
                  f"http://www.test:{site[1]}/page.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE.decode()
    denied = _run(gw, tmp_path, "wget", "-S", "-O", "-", "--tries=1", "--timeout=10",
                  f"http://blocked.test:{site[1]}/page.txt")
    assert denied.returncode == 8  # wget: the server issued an error response
    assert "X-Tether-Refusal: tether: connection to blocked.test" in denied.stderr


@needs_program("git")
def test_git_clone_over_http(gw: Gateway, site: tuple[Path, int], tmp_path: Path) -> None:
    root, port = site
    work = tmp_path / "work"
    git_env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=git_env, check=True, capture_output=True,
                       timeout=60)

    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "README").write_text("cloned through tether\n")
    git("add", "README", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=work)
    git("clone", "-q", "--bare", str(work), str(root / "repo.git"), cwd=tmp_path)
    git("update-server-info", cwd=root / "repo.git")  # the dumb HTTP protocol's index
    result = _run(gw, tmp_path, "git", "clone", "-q", f"http://git.test:{port}/repo.git", "out")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "README").read_text() == "cloned through tether\n"
    assert _decision(gw, "git.test")["outcome"] == "connected"
    denied = _run(gw, tmp_path, "git", "clone", "-q", f"http://blocked.test:{port}/repo.git",
                  "no")
    assert denied.returncode != 0
    assert "403" in denied.stderr
    assert _decision(gw, "blocked.test")["outcome"] == "denied"


def _wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (PEP 427) that pip can download."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    files[f"{dist}/RECORD"] = record.encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def test_pip_download_from_a_loopback_index(
    gw: Gateway, site: tuple[Path, int], tmp_path: Path
) -> None:
    # pip is Python: under `tether run` it goes through the gateway natively
    # (the proxy variables are left out of its view), and still works.
    root, port = site
    project = root / "simple" / "tetherdemo"
    project.mkdir(parents=True)
    wheel = _wheel(project, "tetherdemo", "0.1")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (project / "index.html").write_text(
        f'<a href="{wheel.name}#sha256={digest}">{wheel.name}</a>\n'
    )
    result = _run(gw, tmp_path, sys.executable, "-m", "pip", "download", "--no-deps",
                  "--disable-pip-version-check", "--no-cache-dir", "-d", str(tmp_path / "dl"),
                  "--index-url", f"http://127.0.0.1:{port}/simple", "tetherdemo")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dl" / wheel.name).read_bytes() == wheel.read_bytes()
    assert _decision(gw, "127.0.0.1")["outcome"] == "connected"


@needs_program("curl")
def test_dev_mode_offers_the_proxies_too(site: tuple[Path, int], tmp_path: Path) -> None:
    port = site[1]
    (tmp_path / "tether.toml").write_text(
        f'[resolver]\nmode = "static"\n[resolver.hosts]\n"www.test" = ["127.0.0.1"]\n'
        f'"blocked.test" = ["127.0.0.1"]\n'
        f'[policy]\nallow = ["127.0.0.1:{port}"]\n'
        # The app's own rules come before the global allow.
        '[apps.dev]\nkey = "dev-key"\npolicy = { deny = ["blocked.test"] }\n'
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = tether_cli("run", "--", "curl", "-sS", "--max-time", "10",
                        f"http://www.test:{port}/page.txt", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE.decode()
    result = tether_cli("run", "--", "curl", "-sS", "-i", "--max-time", "10",
                        f"http://blocked.test:{port}/page.txt", cwd=tmp_path, env=env)
    assert "HTTP/1.1 403 Forbidden" in result.stdout, result.stderr
    assert "(rule: deny blocked.test)" in result.stdout


def test_a_gateway_that_cannot_be_asked_leaves_the_environment_alone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = tether_cli("run", "--gateway", "unix:" + str(tmp_path / "nothing.sock"), "--app",
                        "a", "--", sys.executable, "-c",
                        "import os; print(os.environ.get('http_proxy'))", cwd=tmp_path,
                        env={**env, "TETHER_KEY": "k"})
    assert result.stdout.strip() == "None"
    assert "no proxy variables for the command" in result.stderr
