"""The py-consul client registration uses, reaching the agent as every feature does.

Imported only by a process that registers (``_registration``): py-consul brings requests,
urllib3 and charset-normalizer (some 6 MiB), which a client-only process never needs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import consul
from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter

from .._config import ConsulSettings

__all__ = ["agent_client"]


def agent_client(settings: ConsulSettings) -> Any:
    """A py-consul client speaking to the agent as ``meshlib.consul.client_options`` does:
    the same token, CA, client certificate and TLS server name."""
    parts = urlsplit(settings.address)
    verify: bool | str = (settings.cacert or True) if settings.verify else False
    cert = (settings.client_cert, settings.client_key) if settings.client_cert else None
    client = consul.Consul(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 8500,
        scheme=parts.scheme,
        token=settings.token,
        verify=verify,
        cert=cert,
    )
    # py-consul prefers the environment's CONSUL_HTTP_TOKEN to the token it is given, even
    # an empty one (set, with the token in CONSUL_HTTP_TOKEN_FILE): the settings decide.
    client.token = settings.token
    if parts.scheme == "https" and settings.tls_server_name:
        client.http.session.mount("https://", _ServerName(settings.tls_server_name))
    return client


class _ServerName(HTTPAdapter):
    """A requests adapter whose TLS connections send and verify ``server_name``.

    requests has no setting for the TLS server name (the agent's certificate names
    ``consul.example.internal`` while ``CONSUL_HTTP_ADDR`` is ``https://127.0.0.1:8501``),
    and py-consul passes none through; urllib3 2 takes it as pool keywords:
    ``server_hostname`` is sent as SNI, ``assert_hostname`` is the name the certificate
    must carry. The CA and client certificate still come per request (``verify``, ``cert``).
    """

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **pool_kwargs: Any
    ) -> None:
        """requests' pool manager, with the server name in every pool's keywords."""
        pool_kwargs.update(server_hostname=self.server_name, assert_hostname=self.server_name)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
