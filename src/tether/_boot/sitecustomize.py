"""Installs tether at interpreter start-up when TETHER_AUTOINSTALL=1.

`tether run` puts this directory on PYTHONPATH. Any other sitecustomize
further down the path still runs afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys


def _install() -> None:
    if os.environ.get("TETHER_AUTOINSTALL") != "1":
        return
    try:
        import tether

        tether.install()
    except Exception as exc:  # start-up must not crash the app's interpreter
        sys.stderr.write(f"tether: not installed at start-up: {exc}\n")
        return
    if os.environ.get("TETHER_PROXIES"):
        _skip_own_proxies(set(os.environ["TETHER_PROXIES"].split()))


def _skip_own_proxies(ours: set[str]) -> None:
    """Python's proxy lookup (urllib.request.getproxies) leaves out the gateway's proxies.

    `tether run` sets HTTP_PROXY and friends for the programs that are not
    Python; this process already goes through the gateway natively, and a
    connect to the gateway's own proxy address would be refused (never a
    destination). requests, pip, httpx and aiohttp all ask getproxies(),
    after this runs; the environment itself is left as it is, for the
    programs this one starts.
    """
    import urllib.request

    original = urllib.request.getproxies

    def getproxies() -> dict[str, str]:
        return {
            scheme: url for scheme, url in original().items()
            if _without_credentials(url) not in ours
        }

    urllib.request.getproxies = getproxies


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url


def _chain() -> None:
    """Run the sitecustomize this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved_path = list(sys.path)
    me = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        with contextlib.suppress(ImportError):
            importlib.import_module("sitecustomize")
    finally:
        sys.path[:] = saved_path
        if me is not None:
            sys.modules["sitecustomize"] = me


_install()
_chain()
