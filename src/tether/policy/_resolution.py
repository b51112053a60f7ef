"""The resolver interface the decider uses; implementations are in tether.resolver."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ResolutionError", "Resolver"]


class ResolutionError(Exception):
    """A name could not be resolved.

    `eai` is a ``socket.EAI_*`` value (``socket.EAI_NONAME`` for an unknown
    name) so the gateway can hand the program the same ``socket.gaierror``
    a local lookup would have raised.
    """

    def __init__(self, eai: int, message: str) -> None:
        super().__init__(eai, message)
        self.eai = eai
        self.message = message

    def __str__(self) -> str:
        return f"[Errno {self.eai}] {self.message}"


@runtime_checkable
class Resolver(Protocol):
    """Turns a normalised host name into numeric addresses."""

    def resolve(self, name: str) -> Sequence[str]:
        """Numeric addresses for `name`, in preference order.

        Raises `ResolutionError` when there are none.
        """
        ...
