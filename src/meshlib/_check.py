"""``meshlib config --check``: does this environment work, not only parse?

Parsing says a value is well formed; these checks say whether the things it names are
there: the TLS material (the CA in ``MESH_TLS_DIR``, or a leaf from Consul's Connect CA),
Consul's HTTP API, and the ACL token (``CONSUL_HTTP_TOKEN``). Each check is one line,
``ok`` or ``FAIL`` with what to do. ``settings_table`` prints the effective per-service
settings as a table, a column per override, instead of a dataclass repr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx

from ._config import ConsulSettings, MeshConfig, ServicePolicy
from ._exceptions import ConfigError
from .consul import client_options, request_extensions
from .security import Security

__all__ = ["Check", "run_checks", "settings_table"]


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<14} {self.detail}"


def run_checks(config: MeshConfig, timeout: float = 3.0) -> list[Check]:
    """Every check that applies to ``config``."""
    checks = [_tls(config)]
    if config.consul is not None:
        checks.extend(_consul(config.consul, timeout))
    return checks


def _tls(config: MeshConfig) -> Check:
    if config.tls == "off":
        return Check("tls", True, "MESH_TLS=off: plaintext, nothing to load")
    try:
        security = Security(config)
    except ConfigError as exc:
        return Check("tls", False, " / ".join(exc.errors))
    security.close()  # loaded to be checked, not to be renewed
    tls = security.tls
    assert tls is not None
    material = tls.material
    source = "Consul's Connect CA" if config.tls_ca == "consul" else f"CA in {config.tls_dir}"
    return Check(
        "tls",
        True,
        f"{material.identity} from the {source}, valid until {material.not_after:%Y-%m-%d %H:%M}Z",
    )


def _consul(settings: ConsulSettings, timeout: float) -> Iterator[Check]:
    # the client every feature uses: the same token, CA, client certificate and server name
    options = client_options(settings, timeout=httpx.Timeout(timeout))
    extensions = request_extensions(settings)
    try:
        with httpx.Client(**options) as client:
            leader = client.get("/v1/status/leader", extensions=extensions)
            token = client.get("/v1/acl/token/self", extensions=extensions)
    except httpx.HTTPError as exc:
        yield Check(
            "consul", False, f"cannot reach {settings.address} ({exc}): check CONSUL_HTTP_ADDR"
        )
        return
    if leader.status_code != 200 or leader.json() in ("", None):
        yield Check("consul", False, f"{settings.address} answers but has no leader yet")
    else:
        yield Check("consul", True, f"{settings.address}, leader {leader.json()}")
    text = token.text.strip()
    if token.status_code == 200:
        description = token.json().get("Description") or token.json().get("AccessorID", "")
        yield Check("consul token", True, f"valid ({description})")
    elif "ACL support disabled" in text or "ACLs are disabled" in text:
        yield Check("consul token", True, "ACLs are disabled on this agent: no token needed")
    elif not settings.token:
        yield Check("consul token", False, f"ACLs are on and no CONSUL_HTTP_TOKEN is set ({text})")
    else:
        yield Check(
            "consul token", False, f"Consul refused CONSUL_HTTP_TOKEN: {text}; set a valid token"
        )


def settings_table(config: MeshConfig) -> str:
    """The per-service settings: a row per setting, a column for the defaults and one per
    override (``MESH_<SERVICE>_*`` or the config file), the overridden cells only."""
    columns: list[tuple[str, ServicePolicy]] = [("default", config.defaults)]
    columns.extend(sorted(config.overrides.items()))
    rows = [["setting", *(name for name, _ in columns)]]
    for field in dataclasses.fields(ServicePolicy):
        default = getattr(config.defaults, field.name)
        cells = [_shown(default)]
        for _, policy in columns[1:]:
            value = getattr(policy, field.name)
            cells.append(_shown(value) if value != default else "")
        rows.append([field.name, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
