"""The environment, turned into frozen configuration objects.

Every variable meshlib reads is declared once in ``VARIABLES``: its name, default, an
example, what a valid value looks like, a description, its parser and the field it sets.
That one table drives the parsing, the configuration objects (``load_config`` fills
``MeshConfig`` and ``ServicePolicy`` from the rows' fields; an unset variable leaves the
field's typed default), the validation messages, the per-service overrides, the check for
unknown ``MESH_*`` names, and the table in docs/configuration.md (tests keep the docs, the
rows' stated defaults and the fields' defaults equal).

The package is split by concern: ``_parsers`` (a value's text to its type), ``_table``
(the rows), and here the configuration objects and ``load_config``.

A bad value raises ``ConfigError`` with one line per bad variable naming the variable,
the value and what was expected, so a typo stops start-up instead of surfacing as a
mysterious timeout an hour later.

Per-service overrides put the service after a double underscore, upper-cased with ``-``
as ``_``: ``MESH_TIMEOUT__WEATHER=1s`` applies to the service ``weather`` only.
"""

from __future__ import annotations

import difflib
import logging
import os
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from .._exceptions import ConfigError
from ._parsers import (
    _SERVICE_NAME,
    DiscoveryMode,
    FaultHeader,
    Faults,
    HashOn,
    HostPort,
    RateLimit,
    TlsMode,
    _Invalid,
    _token,
    parse_duration,
    parse_fault_header,
    parse_rate_limit,
)
from ._parsers import (
    LB_POLICIES as LB_POLICIES,
)
from ._parsers import (
    LbPolicy as LbPolicy,
)
from ._parsers import (
    _host_port as _host_port,  # the local config file's reader parses addresses alike
)
from ._table import (
    _BY_NAME,
    VARIABLES,
    Variable,
    default_of,
    markdown_table,
    override_key,
)

__all__ = [
    "VARIABLES",
    "ConsulSettings",
    "FaultHeader",
    "Faults",
    "HashOn",
    "HostPort",
    "MeshConfig",
    "RateLimit",
    "ServicePolicy",
    "Variable",
    "load_config",
    "markdown_table",
    "override_key",
    "parse_duration",
    "parse_fault_header",
    "parse_rate_limit",
]

logger = logging.getLogger("meshlib.config")

# --------------------------------------------------------------------------- config objects


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """How calls to one service behave. Swapping one for another is a pointer swap."""

    lb: LbPolicy = default_of("MESH_LB")
    hash_on: HashOn | None = default_of("MESH_LB_HASH_ON")
    #: what a split hashes to stay sticky per user (None: random per request)
    split_hash_on: HashOn | None = default_of("MESH_SPLIT_HASH_ON")
    timeout: float = default_of("MESH_TIMEOUT")
    deadline: float = default_of("MESH_DEADLINE")
    retries: int = default_of("MESH_RETRIES")
    retry_budget: float = default_of("MESH_RETRY_BUDGET")
    retry_min_per_second: int = default_of("MESH_RETRY_MIN_PER_SECOND")
    retry_backoff: float = default_of("MESH_RETRY_BACKOFF")
    retry_backoff_max: float = default_of("MESH_RETRY_BACKOFF_MAX")
    #: seconds before a hedged attempt; 0: no hedging
    hedge_delay: float = default_of("MESH_HEDGE_DELAY")
    outlier_consecutive_errors: int = default_of("MESH_OUTLIER_CONSECUTIVE_ERRORS")
    outlier_ejection_time: float = default_of("MESH_OUTLIER_EJECTION_TIME")
    outlier_max_ejection: float = default_of("MESH_OUTLIER_MAX_EJECTION")
    panic_threshold: float = default_of("MESH_PANIC_THRESHOLD")
    #: seconds of slow start for a joining or readmitted endpoint; 0: none
    slow_start: float = default_of("MESH_SLOW_START")
    breaker_failures: int = default_of("MESH_BREAKER_FAILURES")
    breaker_reset: float = default_of("MESH_BREAKER_RESET")
    breaker_probes: int = default_of("MESH_BREAKER_PROBES")


#: ServicePolicy field <- variable name: the rows that may be set per service
_POLICY_FIELDS: Mapping[str, str] = MappingProxyType(
    {v.name: v.field for v in VARIABLES if v.per_service}
)
#: MeshConfig field <- variable name: the rows ``load_config`` reads as they are
_CONFIG_FIELDS: Mapping[str, str] = MappingProxyType(
    {v.name: v.field for v in VARIABLES if v.field and not v.per_service}
)


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    """How to reach the Consul agent (from Consul's own ``CONSUL_*`` variables)."""

    address: str
    token: str | None = field(default=None, repr=False)
    verify: bool = True
    cacert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_server_name: str | None = None


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The whole validated configuration of a process."""

    service_name: str | None = None
    service_version: str | None = default_of("MESH_SERVICE_VERSION")
    discovery: DiscoveryMode = "static"
    static_services: Mapping[str, tuple[HostPort, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    discovery_timeout: float = default_of("MESH_DISCOVERY_TIMEOUT")
    discovery_reset_grace: float = default_of("MESH_DISCOVERY_RESET_GRACE")
    config_file: str | None = default_of("MESH_CONFIG_FILE")
    tls: TlsMode = default_of("MESH_TLS")
    service_address: str | None = default_of("MESH_SERVICE_ADDRESS")
    service_port: int | None = default_of("MESH_SERVICE_PORT")
    service_tags: tuple[str, ...] = default_of("MESH_SERVICE_TAGS")
    health_interval: float = default_of("MESH_HEALTH_INTERVAL")
    deregister_after: float = default_of("MESH_DEREGISTER_AFTER")
    shutdown_delay: float = default_of("MESH_SHUTDOWN_DELAY")
    drain_timeout: float = default_of("MESH_DRAIN_TIMEOUT")
    tls_ca: Literal["signer", "consul", "local"] = "signer"
    tls_dir: str = default_of("MESH_TLS_DIR")
    tls_signer: str = default_of("MESH_TLS_SIGNER")
    tls_leaf_ttl: float = default_of("MESH_TLS_LEAF_TTL")
    datacenter: str = default_of("MESH_DATACENTER")
    allowed_callers: frozenset[str] | None = default_of("MESH_ALLOWED_CALLERS")
    denied_callers: frozenset[str] = default_of("MESH_DENIED_CALLERS")
    intentions_cache: float = default_of("MESH_INTENTIONS_CACHE")
    unidentified_callers: Literal["intentions", "allow"] = default_of("MESH_UNIDENTIFIED_CALLERS")
    egress: Literal["allow", "deny"] = default_of("MESH_EGRESS")
    egress_allow: tuple[str, ...] = default_of("MESH_EGRESS_ALLOW")
    access_log: Literal["off", "json"] = default_of("MESH_ACCESS_LOG")
    access_log_file: str = default_of("MESH_ACCESS_LOG_FILE")
    #: the admin listener's address (None: unset, a server then takes 127.0.0.1:0)
    admin_addr: tuple[str, int] | None = None
    metrics_labels: frozenset[str] = default_of("MESH_METRICS_LABELS")
    #: None: not given (Prometheus on 127.0.0.1:9090 with Consul; scrapes without)
    rollout_prometheus_url: str | None = default_of("MESH_ROLLOUT_PROMETHEUS_URL")
    #: None: unset (OpenTelemetry's default applies); () : none
    traces_exporter: tuple[str, ...] | None = default_of("OTEL_TRACES_EXPORTER")
    metrics_exporter: tuple[str, ...] | None = default_of("OTEL_METRICS_EXPORTER")
    consul: ConsulSettings | None = None
    rate_limit: RateLimit | None = default_of("MESH_RATE_LIMIT")
    rate_limit_per_source: RateLimit | None = default_of("MESH_RATE_LIMIT_PER_SOURCE")
    max_concurrent_requests: int | None = default_of("MESH_MAX_CONCURRENT_REQUESTS")
    #: the shortest deadline budget honoured from an unidentified caller (inf: ignored)
    unidentified_deadline: float = default_of("MESH_UNIDENTIFIED_DEADLINE")
    #: headers carried from the inbound request onto its outbound mesh calls
    propagate_headers: tuple[str, ...] = default_of("MESH_PROPAGATE_HEADERS")
    propagate_unidentified: Literal["ignore", "honour"] = default_of("MESH_PROPAGATE_UNIDENTIFIED")
    faults: Faults = field(default_factory=Faults)
    defaults: ServicePolicy = field(default_factory=ServicePolicy)
    #: override_key(service) -> that service's policy
    overrides: Mapping[str, ServicePolicy] = field(default_factory=lambda: MappingProxyType({}))

    def policy(self, service: str) -> ServicePolicy:
        """The policy for calls to ``service``: the defaults with its overrides applied."""
        return self.overrides.get(override_key(service), self.defaults)

    def __hash__(self) -> int:
        # The mapping fields are not hashable; equal configs agree on these fields, so the
        # hash stays consistent with ==, which compares everything.
        return hash((self.service_name, self.discovery, self.tls, self.defaults, self.consul))


# --------------------------------------------------------------------------- loading

_reported_unknown: set[str] = set()


def load_config(environ: Mapping[str, str] | None = None) -> MeshConfig:
    """Read and validate the configuration from ``environ`` (default: ``os.environ``).

    Raises ``ConfigError`` listing every bad value, one line each.
    """
    env = os.environ if environ is None else environ
    errors: list[str] = []

    def get(name: str) -> Any:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return None
        return _parse(_BY_NAME[name], name, raw, errors)

    consul_addr = get("CONSUL_HTTP_ADDR")
    discovery: DiscoveryMode = get("MESH_DISCOVERY") or ("consul" if consul_addr else "static")
    consul: ConsulSettings | None = None
    if discovery == "consul" and consul_addr is None:
        errors.append(
            f"MESH_DISCOVERY={env.get('MESH_DISCOVERY')!r}: expected CONSUL_HTTP_ADDR to be set "
            "as well (the address of the local Consul agent), or MESH_DISCOVERY=static"
        )
    if consul_addr is not None:
        if (
            get("CONSUL_HTTP_SSL")
            and consul_addr.startswith("http://")
            and "://" not in env.get("CONSUL_HTTP_ADDR", "")
        ):
            consul_addr = "https://" + consul_addr.removeprefix("http://")
        token = get("CONSUL_HTTP_TOKEN")
        token_file = get("CONSUL_HTTP_TOKEN_FILE")
        if token is None and token_file is not None:
            try:
                with open(token_file, encoding="utf-8") as fh:
                    token = fh.read().strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(
                    f"CONSUL_HTTP_TOKEN_FILE={token_file!r}: expected a readable file ({exc})"
                )
            if token is not None and not _valid_token(token):
                errors.append(
                    f"CONSUL_HTTP_TOKEN_FILE={token_file!r}: expected the file to hold "
                    f"{_BY_NAME['CONSUL_HTTP_TOKEN'].expected} (surrounding whitespace is "
                    "ignored)"
                )
                token = None
        verify = get("CONSUL_HTTP_SSL_VERIFY")
        consul = ConsulSettings(
            address=consul_addr,
            token=token,
            verify=True if verify is None else verify,
            cacert=get("CONSUL_CACERT"),
            client_cert=get("CONSUL_CLIENT_CERT"),
            client_key=get("CONSUL_CLIENT_KEY"),
            tls_server_name=get("CONSUL_TLS_SERVER_NAME"),
        )

    defaults = _policy(env, "", ServicePolicy(), errors)
    overrides: dict[str, ServicePolicy] = {}
    suffixes = {
        name.partition("__")[2]
        for name in env
        if "__" in name and name.partition("__")[0] in _POLICY_FIELDS
    }
    for suffix in sorted(suffixes):
        if suffix:
            overrides[suffix] = _policy(env, "__" + suffix, defaults, errors)

    service_name = get("MESH_SERVICE_NAME")
    if service_name is None and env.get("OTEL_SERVICE_NAME"):
        otel_name = env["OTEL_SERVICE_NAME"]
        if _control_character(otel_name) is not None:
            _parse(_BY_NAME["OTEL_SERVICE_NAME"], "OTEL_SERVICE_NAME", otel_name, errors)
        elif _SERVICE_NAME.match(otel_name):
            service_name = otel_name
        else:
            errors.append(
                f"OTEL_SERVICE_NAME={otel_name!r} (used because MESH_SERVICE_NAME is unset): "
                f"expected {_BY_NAME['MESH_SERVICE_NAME'].expected}"
            )
    static = get("MESH_STATIC_SERVICES")
    # every row with a field, as parsed; an unset one keeps the field's own default
    given = {field: get(name) for name, field in _CONFIG_FIELDS.items()}
    config = MeshConfig(
        **{field: value for field, value in given.items() if value is not None},
        service_name=service_name,
        discovery=discovery,
        static_services=static if static is not None else MappingProxyType({}),
        tls_ca=get("MESH_TLS_CA") or ("consul" if discovery == "consul" else "signer"),
        admin_addr=_admin_addr(get, errors),
        consul=consul,
        faults=_faults(env, get, errors),
        defaults=defaults,
        overrides=MappingProxyType(overrides),
    )
    if not errors and config.tls != "off" and not config.service_name:
        errors.append(
            f"MESH_TLS={env.get('MESH_TLS')!r}: expected MESH_SERVICE_NAME to be set as well "
            "(mesh TLS needs the identity this process proves)"
        )
    if not errors and config.tls_ca == "consul" and config.consul is None:
        errors.append(
            f"MESH_TLS_CA={env.get('MESH_TLS_CA')!r}: expected CONSUL_HTTP_ADDR to be set as "
            "well (Consul's CA is reached through the local agent), or MESH_TLS_CA=signer"
        )
    if errors:
        raise ConfigError(errors)
    _report_unknown(env)
    return config


def _admin_addr(get: Callable[[str], Any], errors: list[str]) -> tuple[str, int] | None:
    """``MESH_ADMIN_ADDR``, or its deprecated alias ``MESH_METRICS_ADDR``."""
    admin, metrics = get("MESH_ADMIN_ADDR"), get("MESH_METRICS_ADDR")
    if admin is not None and metrics is not None and admin != metrics:
        errors.append(
            f"MESH_METRICS_ADDR={':'.join(map(str, metrics))!r}: expected it unset or equal to "
            "MESH_ADMIN_ADDR (it is that variable's old name: one admin listener serves both)"
        )
    return admin if admin is not None else metrics  # type: ignore[no-any-return]


def _or(value: Any, default: Any) -> Any:
    """``value`` unless unset (None): for settings whose valid values include 0."""
    return default if value is None else value


def _faults(env: Mapping[str, str], get: Callable[[str], Any], errors: list[str]) -> Faults:
    """The ``MESH_FAULT_*`` variables: a percentage alone aborts with 503, but a delay
    percentage needs a delay."""
    delay = get("MESH_FAULT_DELAY")
    delay_percent = get("MESH_FAULT_DELAY_PERCENT")
    abort_status = get("MESH_FAULT_ABORT_STATUS")
    abort_percent = get("MESH_FAULT_ABORT_PERCENT")
    if delay is None and delay_percent is not None:
        errors.append(
            f"MESH_FAULT_DELAY_PERCENT={env.get('MESH_FAULT_DELAY_PERCENT')!r}: expected "
            "MESH_FAULT_DELAY to be set as well (how long to delay)"
        )
    if abort_status is None and abort_percent is not None:
        abort_status = 503
    return Faults(
        delay=delay,
        delay_percent=1.0 if delay_percent is None else delay_percent,
        abort_status=abort_status,
        abort_percent=1.0 if abort_percent is None else abort_percent,
        header=get("MESH_FAULT_HEADER"),
    )


def _parse(var: Variable, name: str, raw: str, errors: list[str]) -> Any:
    control = _control_character(raw)
    if control is not None:
        # never the value: a control character is most often a secret's trailing newline
        hint = " (a newline, as read from a file?)" if control in ("U+000A", "U+000D") else ""
        errors.append(
            f"{name}: contains the control character {control}{hint}; expected {var.expected}"
        )
        return None
    try:
        return var.parse(raw)
    except ValueError as exc:
        shown = "<redacted>" if var.secret else repr(raw)
        extra = f" ({exc})" if isinstance(exc, _Invalid) else ""
        errors.append(f"{name}={shown}: expected {var.expected}{extra}")
        return None


def _control_character(text: str) -> str | None:
    """The first control character of ``text`` as ``U+000A``, or None."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return None


def _valid_token(text: str) -> bool:
    try:
        _token(text)
    except ValueError:
        return False
    return True


def _policy(
    env: Mapping[str, str], suffix: str, base: ServicePolicy, errors: list[str]
) -> ServicePolicy:
    changes: dict[str, Any] = {}
    for var_name, attr in _POLICY_FIELDS.items():
        name = var_name + suffix
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        value = _parse(_BY_NAME[var_name], name, raw, errors)
        if value is not None:
            changes[attr] = value
    policy = ServicePolicy(**{**_as_dict(base), **changes})
    if policy.retry_backoff_max < policy.retry_backoff:
        errors.append(
            f"MESH_RETRY_BACKOFF_MAX{suffix}="
            f"{env.get('MESH_RETRY_BACKOFF_MAX' + suffix, '250ms')!r}:"
            f" expected at least MESH_RETRY_BACKOFF{suffix} ({policy.retry_backoff:g}s)"
        )
    return policy


def _as_dict(policy: ServicePolicy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in ServicePolicy.__slots__}


def _report_unknown(env: Mapping[str, str]) -> None:
    """Log each unknown ``MESH_*`` variable once per process, with a likely correction."""
    known = [v.name for v in VARIABLES if v.owner == "meshlib"]
    for name in sorted(env):
        if not name.startswith("MESH_") or name in _reported_unknown:
            continue
        base, sep, suffix = name.partition("__")
        if name in _BY_NAME or (sep and suffix and base in _POLICY_FIELDS):
            continue
        if name.startswith("MESH_TEST_"):  # the test suite's own knobs
            continue
        _reported_unknown.add(name)
        guess = difflib.get_close_matches(base, known, n=1)
        hint = f"; did you mean {guess[0]}{sep}{suffix}?" if guess else ""
        if sep and base in _BY_NAME:
            hint = f"; {base} cannot be set per service"
        logger.warning("unknown environment variable %s is ignored%s", name, hint)
