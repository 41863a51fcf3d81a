"""Client / AsyncClient: real httpx clients whose transport is the mesh.

``MeshTransport`` wraps an inner transport that does the I/O (by default one pooled
``httpx.HTTPTransport`` for every endpoint). Hosts that are not mesh services pass
straight through to it. For mesh services, the transport is a loop around a sans-IO
``Call`` (_pipeline.py), which holds every policy decision, so the sync and async
transports below differ only in ``await``.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import httpx

from ._config import MeshConfig, load_config
from ._pipeline import Call
from ._runtime import Mesh, Pending
from .security._verify import async_identity_check, identity_check
from .telemetry import setup as setup_telemetry

__all__ = ["AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport"]


def _runtime(config: MeshConfig | None, mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        return mesh
    return Mesh.for_config(load_config() if config is None else config)


class MeshTransport(httpx.BaseTransport):
    """The mesh as an httpx transport.

    Args:
        inner: the transport that does the I/O (default: a pooled ``httpx.HTTPTransport``).
            Transport options such as ``limits`` or ``http2`` belong on it.
        config: configuration to use instead of reading the environment.
        mesh: an existing runtime to share (default: the process's runtime for ``config``).

    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.mesh = _runtime(config, mesh)
        setup_telemetry(self.mesh.config)
        self._inner = httpx.HTTPTransport() if inner is None else inner
        self._tls = _TlsPools(self.mesh, httpx.HTTPTransport, identity_check)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: through the mesh for a mesh service, else straight through."""
        service = self.mesh.lookup(request.url.host)
        if isinstance(service, Pending):
            self.mesh.discovery.wait(service.service, self.mesh.wait_timeout())
            service = self.mesh.resolve(service)
        if service is None:
            self.mesh.security.egress.check(request.url.host)
            return self._inner.handle_request(request)
        service, route = self.mesh.route(service, request)
        call = Call(service, request, self.mesh.config.tls, route)
        response: httpx.Response | None = None
        try:
            while True:
                attempt = call.start_attempt(request)
                inner = self._inner
                if attempt.tls:
                    inner = self._tls.prepare(request, service.name)
                    for old in self._tls.expired():
                        old.close()
                try:
                    response = inner.handle_request(request)
                except httpx.TransportError as exc:
                    delay = call.attempt_failed(attempt, exc)
                    if delay is None:
                        raise
                else:
                    delay = call.attempt_responded(attempt, response)
                    if delay is None:
                        return response
                    response.close()
                    response = None
                time.sleep(delay)
        finally:
            call.finish(request, response)

    def close(self) -> None:
        """Close the inner transport (the shared runtime stays up for other clients)."""
        self._inner.close()
        for pool in self._tls.drain():
            pool.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`MeshTransport`; same arguments."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.mesh = _runtime(config, mesh)
        setup_telemetry(self.mesh.config)
        self._inner = httpx.AsyncHTTPTransport() if inner is None else inner
        self._tls = _TlsPools(self.mesh, httpx.AsyncHTTPTransport, async_identity_check)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: through the mesh for a mesh service, else straight through."""
        service = self.mesh.lookup(request.url.host)
        if isinstance(service, Pending):
            await anyio.to_thread.run_sync(
                self.mesh.discovery.wait, service.service, self.mesh.wait_timeout()
            )
            service = self.mesh.resolve(service)
        if service is None:
            self.mesh.security.egress.check(request.url.host)
            return await self._inner.handle_async_request(request)
        service, route = self.mesh.route(service, request)
        call = Call(service, request, self.mesh.config.tls, route)
        response: httpx.Response | None = None
        try:
            while True:
                attempt = call.start_attempt(request)
                inner = self._inner
                if attempt.tls:
                    inner = self._tls.prepare(request, service.name)
                    for old in self._tls.expired():
                        await old.aclose()
                try:
                    response = await inner.handle_async_request(request)
                except httpx.TransportError as exc:
                    delay = call.attempt_failed(attempt, exc)
                    if delay is None:
                        raise
                else:
                    delay = call.attempt_responded(attempt, response)
                    if delay is None:
                        return response
                    await response.aclose()
                    response = None
                await anyio.sleep(delay)
        finally:
            call.finish(request, response)

    async def aclose(self) -> None:
        """Close the inner transport (the shared runtime stays up for other clients)."""
        await self._inner.aclose()
        for pool in self._tls.drain():
            await pool.aclose()


Pool = TypeVar("Pool", bound=httpx.HTTPTransport | httpx.AsyncHTTPTransport)


class _TlsPools(Generic[Pool]):
    """Mesh-TLS connection pools, one per destination service and trust generation.

    Per service, because the server's identity is checked when a connection is made
    (security/_verify.py) and a pooled connection is reused without that check: a
    connection verified for ``weather`` must only ever carry requests for ``weather``.
    Per generation of the TLS material, because a renewed leaf or a changed trust bundle
    comes as a new SSL context (security/_contexts.py); the previous generation's pools stay
    open for requests in flight and are closed two generations later (hours, with leaves
    renewed after two thirds of their lifetime).
    """

    def __init__(self, mesh: Mesh, factory: Callable[..., Pool], check: Callable[..., Any]) -> None:
        self._security = mesh.security
        self._factory: Callable[..., Pool] = factory
        self._check = check
        self._pools: dict[tuple[str, int], Pool] = {}
        self._retired: list[tuple[int, Pool]] = []  # (generation that retired it, pool)
        self._lock = threading.Lock()

    def prepare(self, request: httpx.Request, service: str) -> Pool:
        """Set SNI and the identity check on ``request``; the pool to send it on."""
        tls = self._security.tls
        assert tls is not None
        key = (service, tls.generation)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._new_pool(key, tls.client)
        extensions = request.extensions
        extensions["sni_hostname"] = service
        extensions["trace"] = self._check(self._security.expected(service), extensions.get("trace"))
        return pool

    def _new_pool(self, key: tuple[str, int], context: ssl.SSLContext) -> Pool:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._factory(verify=context)
                self._pools[key] = pool
                stale = [k for k in self._pools if k[0] == key[0] and k[1] < key[1] - 1]
                self._retired.extend((key[1], self._pools.pop(k)) for k in stale)
            return pool

    def expired(self) -> list[Pool]:
        """Retired pools two generations old (to close): nothing should still run on them."""
        if not self._retired:
            return []
        tls = self._security.tls
        generation = tls.generation if tls is not None else 0
        with self._lock:
            old = [pool for retired_at, pool in self._retired if retired_at < generation - 1]
            self._retired = [(g, p) for g, p in self._retired if g >= generation - 1]
        return old

    def drain(self) -> list[Pool]:
        """Every pool, forgotten (to close)."""
        with self._lock:
            pools = [*self._pools.values(), *(pool for _, pool in self._retired)]
            self._pools.clear()
            self._retired.clear()
        return pools


class Client(httpx.Client):
    """An ``httpx.Client`` that sends requests for mesh services through the mesh.

    ``http://weather/v1/forecast`` goes to a healthy instance of the service ``weather``;
    other URLs behave as with a plain ``httpx.Client``. Every ``httpx.Client`` argument
    works; ``transport`` becomes the mesh's inner transport. ``timeout`` is unset by default
    so the mesh's per-attempt timeout and deadline (``MESH_TIMEOUT``, ``MESH_DEADLINE``)
    apply; a ``timeout`` given here caps each attempt further.

    Per-request options go in ``extensions={"meshlib": {...}}``: ``retry_non_idempotent``
    (resend a POST/PATCH after it may have reached the server), ``deadline`` (seconds) and
    ``retries``. What the mesh did is in ``response.extensions["meshlib"]``.

    Raises:
        meshlib.ConfigError: the environment holds a bad ``MESH_*``/``CONSUL_*`` value.

    """

    def __init__(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        config: MeshConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            transport=MeshTransport(transport, config=config), timeout=timeout, **kwargs
        )


class AsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that sends requests for mesh services through the mesh.

    The async twin of :class:`Client`, with the same arguments and behaviour.
    """

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        config: MeshConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            transport=AsyncMeshTransport(transport, config=config), timeout=timeout, **kwargs
        )
