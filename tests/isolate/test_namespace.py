"""The namespace's setup in words: refusals explained, the ruleset valid, the helper's errors.

A refused unshare(2) is simulated through the injection points (the
`unshare` argument, and the helper's module attribute it reads at call
time), never by changing the machine.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from tether.client.settings import Settings
from tether.endpoint import parse_endpoint
from tether.isolate import enter, namespace, rules
from tether.isolate.launch import Isolated, IsolateError, namespace_env

U, N, M = namespace.CLONE_NEWUSER, namespace.CLONE_NEWNET, namespace.CLONE_NEWNS


@pytest.mark.parametrize(
    ("flags", "err", "euid", "sysctls", "words"),
    [
        (U | N | M, errno.EPERM, 1000, {"kernel.unprivileged_userns_clone": "0"},
         ["unshare(CLONE_NEWUSER|CLONE_NEWNET|CLONE_NEWNS)", "EPERM",
          "kernel.unprivileged_userns_clone=1", "user.max_user_namespaces", "run as root",
          "here: kernel.unprivileged_userns_clone = 0"]),
        (U | N | M, errno.ENOSPC, 1000, {"user.max_user_namespaces": "0"},
         ["ENOSPC", "user.max_user_namespaces=", "here: user.max_user_namespaces = 0"]),
        (N | M, errno.EPERM, 0, {}, ["unshare(CLONE_NEWNET|CLONE_NEWNS)", "CAP_SYS_ADMIN",
                                     "seccomp"]),
        (U | N | M, errno.EINVAL, 1000, {}, ["EINVAL", "CONFIG_USER_NS", "CONFIG_NET_NS"]),
        (N | M, errno.ENOMEM, 0, {}, ["ENOMEM", "unshare(2)"]),
    ],
)
def test_refusals_say_which_syscall_and_what_to_enable(
    flags: int, err: int, euid: int, sysctls: dict[str, str], words: list[str]
) -> None:
    text = namespace.explain_refusal(flags, err, euid, sysctls)
    for word in words:
        assert word in text, (word, text)


@pytest.mark.parametrize(("uid", "flags"), [(0, N | M), (1000, U | N | M)])
def test_enter_namespaces_refused(uid: int, flags: int) -> None:
    asked: list[int] = []

    def refuse(f: int) -> None:
        asked.append(f)
        raise OSError(errno.EPERM, "Operation not permitted")

    with pytest.raises(namespace.NamespaceUnavailableError) as caught:
        namespace.enter_namespaces(uid=uid, gid=uid, unshare=refuse, sysctls=dict)
    assert asked == [flags]
    assert caught.value.errno == errno.EPERM
    assert f"unshare({namespace.flag_names(flags)})" in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namespace.shutil, "which", lambda _name: None)
    with pytest.raises(namespace.IsolateSetupError, match=r"apt-get install no-such-package"):
        namespace.tool("no-such-tool-xyz", "no-such-package")


def test_ruleset_text() -> None:
    text = rules.ruleset(15001, 53)
    assert "meta l4proto tcp redirect to :15001" in text
    assert "policy drop" in text
    assert "udp dport 53 accept" in text
    with pytest.raises(ValueError, match="1-65535"):
        rules.ruleset(0, 53)


def test_ruleset_loads_in_a_namespace() -> None:
    """nft itself accepts the ruleset (in a throwaway namespace, so nothing here changes)."""
    from isolate_tools import require_isolation

    require_isolation()
    prefix = ["unshare", "-n"] if namespace.os.geteuid() == 0 else ["unshare", "-rn"]
    done = subprocess.run([*prefix, namespace.tool("nft", "nftables"), "-c", "-f", "-"],
                          input=rules.ruleset(), capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_namespace_env_points_python_at_the_unix_socket() -> None:
    env = {"PATH": "/bin", "https_proxy": "http://proxy.test:3128",
           "TETHER_GATEWAY": "127.0.0.1:7340"}
    assert namespace_env(env, "unix:/tmp/t/gw.sock") == {
        "PATH": "/bin", "https_proxy": "http://proxy.test:3128",
        "TETHER_GATEWAY": "unix:/tmp/t/gw.sock"}


# The helper as `tether run --isolate` starts it, but with unshare(2) refusing.
REFUSING_HELPER = textwrap.dedent("""\
    import errno, sys
    from tether.isolate import enter, namespace
    def refuse(flags):
        raise OSError(errno.EPERM, "Operation not permitted")
    namespace.libc_unshare = refuse
    namespace.read_sysctls = lambda: {"user.max_user_namespaces": "0"}
    sys.exit(enter.main(sys.argv[1:]))
""")


def test_a_refused_unshare_reaches_tether_run_in_words() -> None:
    settings = Settings(gateway=parse_endpoint("127.0.0.1:9"), app="a", key="k")
    isolated = Isolated(["true"], {"PATH": "/usr/bin:/bin"}, settings,
                        helper=[sys.executable, "-c", REFUSING_HELPER])
    with pytest.raises(IsolateError) as caught:
        isolated.start()
    assert caught.value.status == enter.EXIT_SETUP
    text = str(caught.value)
    assert "the kernel refused unshare(" in text and "EPERM" in text
    assert "here: user.max_user_namespaces = 0" in text
    assert not isolated.dir.exists()  # nothing left behind
