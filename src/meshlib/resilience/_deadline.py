"""Deadlines: the budget of a whole logical request, and how it travels downstream.

The remaining budget is sent as ``x-mesh-deadline-ms`` (milliseconds, relative, so clock
skew between hosts does not matter; gRPC's ``grpc-timeout`` works the same way). An
inbound meshlib service reads it, refuses work whose budget is already gone, and caps
its own outbound calls by what is left (``inbound_deadline``).
"""

from __future__ import annotations

import contextvars
import time

__all__ = ["DEADLINE_HEADER", "Deadline", "inbound_deadline", "parse_deadline_header"]

DEADLINE_HEADER = "x-mesh-deadline-ms"
#: Longest budget accepted from a header (one day); larger values are treated as absent.
_MAX_MS = 86_400_000


class Deadline:
    """A point in (monotonic) time by which a request must be done."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float, now: float | None = None) -> Deadline:
        """A deadline ``seconds`` from now."""
        return cls((time.monotonic() if now is None else now) + seconds)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left (negative once passed)."""
        return self.at - (time.monotonic() if now is None else now)

    def header_value(self, now: float | None = None) -> str:
        """The remaining budget as the ``x-mesh-deadline-ms`` value (at least 0)."""
        return str(max(int(self.remaining(now) * 1000), 0))


def parse_deadline_header(value: str | None) -> float | None:
    """Seconds of budget from an ``x-mesh-deadline-ms`` value; ``None`` if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    # isascii(): "²".isdigit() is True, but int("²") raises (and headers arrive as latin-1).
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        return None
    ms = int(value)
    return ms / 1000 if ms <= _MAX_MS else None


#: The deadline of the inbound request this task or thread is serving, if any; outbound
#: calls made while serving it never get more time than it has left.
inbound_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "meshlib_inbound_deadline", default=None
)
