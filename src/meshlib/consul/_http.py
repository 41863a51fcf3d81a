"""``ConsulSettings`` as ``httpx`` client options: built here once, used by every feature."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from .._config import ConsulSettings

__all__ = ["client_options", "request_extensions", "ssl_context"]


def client_options(settings: ConsulSettings, *, timeout: httpx.Timeout) -> dict[str, Any]:
    """Keyword arguments for an ``httpx.Client``/``AsyncClient`` speaking to the agent.

    The token travels as ``X-Consul-Token`` (never in a URL, so never in a log line); an
    https address gets a context with ``CONSUL_CACERT`` and the client certificate. Pass
    ``request_extensions(settings)`` with each request for ``CONSUL_TLS_SERVER_NAME``.
    """
    return {
        "base_url": settings.address,
        "headers": {"X-Consul-Token": settings.token} if settings.token else {},
        # plain http never uses it; a context is built once and shared (FINDINGS: verify=ctx)
        "verify": ssl_context(settings) if _tls(settings) else _UNUSED_TLS,
        "timeout": timeout,
    }


def request_extensions(settings: ConsulSettings) -> dict[str, Any]:
    """Per-request extensions: the TLS server name to verify, if it is not the address's."""
    if _tls(settings) and settings.tls_server_name:
        return {"sni_hostname": settings.tls_server_name}
    return {}


def ssl_context(settings: ConsulSettings) -> ssl.SSLContext:
    """The TLS context for an https agent address (CONSUL_CACERT, client certificate)."""
    context = ssl.create_default_context(cafile=settings.cacert)
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert, settings.client_key)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _tls(settings: ConsulSettings) -> bool:
    return settings.address.startswith("https://")


_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
