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
