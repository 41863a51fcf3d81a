"""Checking, on every new TLS connection, that the server is the service the balancer chose.

Certificate-chain verification proves the server belongs to the mesh; this proves it is
the *right* member. The check runs once per connection, right after the handshake and
before a byte of the request is written, so a mismatch can be retried elsewhere safely:
the mesh-TLS pools' network backend calls it (``_core.CheckedBackend``). Until 6 December
it ran in httpcore's ``trace`` extension, which httpcore calls about ten times on every
request (25 µs a request on the sync strict path), connection new or not. A pooled
connection is not checked again, so connections are pooled per destination service
(client.py): a connection verified for ``weather`` is only ever reused for ``weather``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._exceptions import IdentityMismatch
from ._spiffe import SpiffeId, from_peercert

__all__ = ["identity_check"]


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


def identity_check(expected: SpiffeId) -> Callable[[Any], None]:
    """A handshake check (``_core.Handshake``) refusing a server that is not ``expected``.

    Called with the new connection's stream (sync or async: it only reads the
    certificate); raises ``IdentityMismatch``, and the backend closes the connection.
    """

    def check(stream: Any) -> None:
        error = _mismatch(expected, stream)
        if error is not None:
            raise error

    return check
