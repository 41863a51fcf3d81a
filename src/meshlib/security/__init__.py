"""Zero trust: identities, certificate authorities, rotating TLS contexts, authorization.

A ``Security`` holds a configuration's TLS contexts (when ``MESH_TLS`` is not ``off``), its
egress policy and its authorizer. The process's ``Mesh`` owns one (``mesh.security``),
shared by the clients and servers built from that configuration.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import MeshConfig
from .._exceptions import ConfigError
from ._authz import Authorizer, Decision, LocalAuthorizer
from ._contexts import TlsContexts
from ._egress import EgressPolicy
from ._intentions import ChainAuthorizer, ConsulAuthorizer
from ._material import LocalSource, MaterialSource, SignerSource, TlsMaterial
from ._spiffe import NoServiceIdentity, SpiffeId, from_peercert

if TYPE_CHECKING:
    from ._local_ca import LocalCA

__all__ = [
    "Authorizer",
    "Decision",
    "EgressPolicy",
    "LocalCA",
    "NoServiceIdentity",
    "Security",
    "SpiffeId",
    "TlsContexts",
    "TlsMaterial",
    "from_peercert",
]


def __getattr__(name: str) -> Any:
    """``LocalCA`` on first use: it imports ``cryptography`` (some 8 MiB), which a process
    without mesh TLS never needs (docs/performance.md, row 5)."""
    if name == "LocalCA":
        from ._local_ca import LocalCA

        return LocalCA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logger = logging.getLogger("meshlib.authz")
tls_logger = logging.getLogger("meshlib.tls")


class Security:
    """This process's TLS contexts, egress policy and authorizer."""

    def __init__(self, config: MeshConfig, source: MaterialSource | None = None) -> None:
        self.config = config
        self.egress = EgressPolicy(config.egress, config.egress_allow)
        self.tls: TlsContexts | None = None
        self.trust_domain: str | None = None
        if config.tls != "off":
            source = source or _source(config)
            self.tls = TlsContexts(source, config.tls)
            self.trust_domain = source.current().identity.trust_domain
        local = LocalAuthorizer(self.trust_domain, config.allowed_callers, config.denied_callers)
        self.authorizer: Authorizer = local
        self._consul_authz: ConsulAuthorizer | None = None
        if self.tls is not None and config.discovery == "consul" and config.consul is not None:
            assert config.service_name is not None
            assert self.trust_domain is not None
            allow = config.unidentified_callers == "allow"
            self._consul_authz = ConsulAuthorizer(
                config.consul,
                config.service_name,
                config.intentions_cache,
                trust_domain=self.trust_domain,
                datacenter=config.datacenter,
                allow_unidentified=allow,
            )
            if allow:
                logger.warning(
                    "MESH_UNIDENTIFIED_CALLERS=allow: callers without a client certificate "
                    "reach %s without an intentions check",
                    config.service_name,
                )
            self.authorizer = ChainAuthorizer(local, self._consul_authz)

    @property
    def identity(self) -> SpiffeId | None:
        """The identity this process proves, when TLS is on."""
        return self.tls.material.identity if self.tls is not None else None

    def expected(self, service: str) -> SpiffeId:
        """The identity a server of ``service`` must prove."""
        assert self.trust_domain is not None
        return SpiffeId(self.trust_domain, service, self.config.datacenter)

    def close(self) -> None:
        """Stop certificate renewal and release Consul clients."""
        if self.tls is not None:
            self.tls.source.close()
        if self._consul_authz is not None:
            self._consul_authz.close()


def _source(config: MeshConfig) -> MaterialSource:
    assert config.service_name is not None
    if config.tls_ca == "consul":
        from ._consul_ca import ConsulSource

        assert config.consul is not None
        return ConsulSource(config.consul, config.service_name)
    if config.tls_ca == "signer":
        from ._signer import SignerError

        try:
            return SignerSource(
                config.tls_signer, config.service_name, config.datacenter, config.tls_leaf_ttl
            )
        except SignerError as exc:
            raise ConfigError(
                f"MESH_TLS_SIGNER={config.tls_signer!r}: expected a `meshlib ca serve` signer "
                f"that gives this process a leaf for {config.service_name!r} ({exc})"
            ) from None
    tls_logger.warning(
        "MESH_TLS_CA=local: this process signs its own leaf with the CA's root key, so it "
        "could sign any identity (development only; use MESH_TLS_CA=signer)"
    )
    from ._local_ca import LocalCA, UnsafeCADirectory

    ca = LocalCA(Path(config.tls_dir).expanduser())
    try:
        info = ca.load_info()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"MESH_TLS={config.tls!r}: expected a CA in MESH_TLS_DIR={config.tls_dir!r} ({exc})"
        ) from None
    except UnsafeCADirectory as exc:
        raise ConfigError(f"MESH_TLS_DIR={config.tls_dir!r}: {exc}") from None
    identity = SpiffeId(info.trust_domain, config.service_name, config.datacenter)
    return LocalSource(ca, identity, config.tls_leaf_ttl)
