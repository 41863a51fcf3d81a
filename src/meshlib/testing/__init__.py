"""Helpers to test code that uses meshlib: fake services, faults, a pinned caller identity.

``FakeMesh`` is a mesh in this process: named fake services (canned answers or handlers),
each a real HTTP server on loopback, reached through meshlib's own pipeline (discovery,
balancing, retries, deadlines), so a test sees what production would: how many attempts a
call made, what a timeout or a reset does to the caller. ``pinned_peer`` wraps an ASGI app
so every request arrives from a given mesh identity, to test inbound authorization
without certificates. With pytest, the plugin (``meshlib.testing.plugin``, registered by
installing meshlib) gives the fixture ``fake_mesh``.

    from meshlib.testing import Answer, FakeMesh

    with FakeMesh() as mesh:
        forecast = mesh.service("forecast", Answer(json={"summary": "sunny"}))
        forecast.fault(reset=True, times=1)
        with mesh.client() as client:
            r = client.get("http://forecast/forecast")
        assert r.json() == {"summary": "sunny"}
        assert len(forecast.attempts) == 2  # the reset, then the retry

See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .._config import load_config
from ..client import AsyncClient, Client
from ..security import SpiffeId
from ._fake import Answer, FakeService, Handler, Received

__all__ = ["Answer", "FakeMesh", "FakeService", "Received", "pinned_peer"]

#: quick retries for tests: backoff in milliseconds, not the production tens of ms
_TEST_DEFAULTS = {"MESH_RETRY_BACKOFF": "1ms", "MESH_RETRY_BACKOFF_MAX": "5ms"}


class FakeMesh:
    """Named fake services and the environment that makes meshlib send to them."""

    def __init__(self, **settings: str) -> None:
        """``settings``: extra ``MESH_*`` variables for the clients (``MESH_TIMEOUT="200ms"``)."""
        self.settings = {**_TEST_DEFAULTS, **settings}
        self._services: dict[str, list[FakeService]] = {}

    def service(
        self, name: str, answer: Answer | Handler | None = None, *, instances: int = 1
    ) -> FakeService:
        """Add ``instances`` fake instances of ``name``; returns the first.

        Add every service before building a client or reading ``env``.
        """
        fakes = [FakeService(name, answer) for _ in range(instances)]
        self._services.setdefault(name, []).extend(fakes)
        return fakes[0]

    def __getitem__(self, name: str) -> FakeService:
        return self._services[name][0]

    def instances(self, name: str) -> list[FakeService]:
        """Every fake instance of ``name``."""
        return list(self._services[name])

    @property
    def env(self) -> Mapping[str, str]:
        """The environment that sends meshlib's calls to the fakes (``MESH_STATIC_SERVICES``
        and the settings): set it before the code under test builds its client."""
        static = ";".join(
            f"{name}={','.join(f.address for f in fakes)}" for name, fakes in self._services.items()
        )
        return {**self.settings, "MESH_STATIC_SERVICES": static}

    def client(self, **kwargs: Any) -> Client:
        """A ``meshlib.Client`` sending to the fakes."""
        return Client(config=load_config(self.env), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        """A ``meshlib.AsyncClient`` sending to the fakes."""
        return AsyncClient(config=load_config(self.env), **kwargs)

    def close(self) -> None:
        """Stop every fake."""
        for fakes in self._services.values():
            for fake in fakes:
                fake.close()
        self._services.clear()

    def __enter__(self) -> FakeMesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pinned_peer(app: Any, service: str, trust_domain: str = "meshlib.test") -> Any:
    """``app`` (ASGI) with every request arriving from the mesh identity of ``service``.

    Wrap the app *outside* ``meshlib.ASGIMiddleware`` (whose authorization, rate limits
    and steering headers then treat the caller as that service). For tests only: a real
    server takes the identity from the caller's verified certificate.
    """
    peer = SpiffeId(trust_domain, service)

    async def pinned(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "meshlib.peer": peer}
        await app(scope, receive, send)

    return pinned
