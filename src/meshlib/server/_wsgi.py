"""WSGI middleware (foundation stage: validates configuration, passes requests through)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._config import MeshConfig, load_config

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class WSGIMiddleware:
    """Join the mesh on the server side of a WSGI app (Flask)."""

    def __init__(self, app: WSGIApplication, *, config: MeshConfig | None = None) -> None:
        self.app = app
        self.config = load_config() if config is None else config

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return self.app(environ, start_response)

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - convenience passthrough
        return getattr(self.app, name)
