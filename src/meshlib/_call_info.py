"""``CallInfo``: what the mesh did for one request, as the caller reads it afterwards.

A record of its own, below both the request pipeline (``_pipeline``, which fills it in)
and telemetry (which reads it), so neither imports the other for it.
"""

from __future__ import annotations

__all__ = ["CallInfo"]


class CallInfo:
    """What the mesh did for one request; ``response.extensions["meshlib"]``."""

    __slots__ = ("attempts", "endpoint", "retry_reasons", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        #: ``host:port`` of the endpoint that produced the response (or the last error).
        self.endpoint = ""
        self.attempts = 0
        #: Why each retry happened: "connect", "reset", "timeout", "503", ...
        self.retry_reasons: list[str] = []

    def __repr__(self) -> str:
        return (
            f"CallInfo(service={self.service!r}, endpoint={self.endpoint!r}, "
            f"attempts={self.attempts}, retry_reasons={self.retry_reasons!r})"
        )
