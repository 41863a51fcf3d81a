"""Checking, on every new TLS connection, that the server is the service the balancer chose.

Certificate-chain verification proves the server belongs to the mesh; this proves it is
the *right* member. The check runs in httpcore's ``connection.start_tls.complete`` trace
event: after the handshake, before a byte of the request is written, so a mismatch can be
retried elsewhere safely. A pooled connection skips that event, so connections are pooled
per destination service (client.py): a connection verified for ``weather`` is only ever
reused for ``weather``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .._exceptions import IdentityMismatch
from ._spiffe import SpiffeId, from_peercert

__all__ = ["async_identity_check", "identity_check"]

_EVENT = "connection.start_tls.complete"

Trace = Callable[[str, Mapping[str, Any]], None]
AsyncTrace = Callable[[str, Mapping[str, Any]], Awaitable[None]]


def _mismatch(expected: SpiffeId, stream: Any) -> IdentityMismatch | None:
    ssl_object = stream.get_extra_info("ssl_object")
    peer = from_peercert(ssl_object.getpeercert() if ssl_object is not None else None)
    if peer is not None and peer.same_service(expected):
        return None
    return IdentityMismatch(
        f"service {expected.service!r}: the endpoint proved {peer or 'no SPIFFE identity'}, "
        f"expected {expected}",
        service=expected.service,
    )


def identity_check(expected: SpiffeId, then: Trace | None = None) -> Trace:
    """A sync httpcore ``trace`` extension that refuses the wrong server identity."""

    def trace(event: str, info: Mapping[str, Any]) -> None:
        if then is not None:
            then(event, info)
        if event == _EVENT:
            stream = info["return_value"]
            error = _mismatch(expected, stream)
            if error is not None:
                stream.close()
                raise error

    return trace


def async_identity_check(expected: SpiffeId, then: AsyncTrace | None = None) -> AsyncTrace:
    """The async twin of ``identity_check``."""

    async def trace(event: str, info: Mapping[str, Any]) -> None:
        if then is not None:
            await then(event, info)
        if event == _EVENT:
            stream = info["return_value"]
            error = _mismatch(expected, stream)
            if error is not None:
                await stream.aclose()
                raise error

    return trace
