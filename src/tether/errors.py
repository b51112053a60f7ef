"""Exceptions shared by several tether packages."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range.

    `path` names where it is, as a dotted path into the TOML document
    (``policy.allow[2]``, ``apps.billing.key``), so the operator can find it.
    """

    def __init__(self, path: str, message: str, *, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}")
