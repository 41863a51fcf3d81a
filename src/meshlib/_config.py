"""The environment, turned into frozen configuration objects.

Every variable meshlib reads is declared once in ``VARIABLES``: its name, default, an
example, what a valid value looks like, and a description. That one table drives the
parsing, the validation messages, the per-service overrides, the check for unknown
``MESH_*`` names, and the table in docs/configuration.md (a test keeps the two equal).

A bad value raises ``ConfigError`` with one line per bad variable naming the variable,
the value and what was expected, so a typo stops start-up instead of surfacing as a
mysterious timeout an hour later.

Per-service overrides put the service after a double underscore, upper-cased with ``-``
as ``_``: ``MESH_TIMEOUT__WEATHER=1s`` applies to the service ``weather`` only.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from ._exceptions import ConfigError

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

LB_POLICIES = ("round_robin", "least_request", "p2c_ewma", "random", "ring_hash")
LbPolicy = Literal["round_robin", "least_request", "p2c_ewma", "random", "ring_hash"]
TlsMode = Literal["off", "permissive", "strict"]
DiscoveryMode = Literal["consul", "static"]

_SERVICE_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)$")
_TAG = re.compile(r"^[A-Za-z0-9._:=-]{1,128}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# --------------------------------------------------------------------------- values


class _Invalid(ValueError):
    """A parser's explanation meant for the user; other ValueErrors only say 'invalid'."""


class HostPort(NamedTuple):
    """One statically configured endpoint: host, port and load-balancing weight."""

    host: str
    port: int
    weight: int = 1


class HashOn(NamedTuple):
    """What ``ring_hash`` hashes: a request header or a cookie, by name."""

    source: Literal["header", "cookie"]
    name: str


def parse_duration(text: str) -> float:
    """Parse ``250ms``, ``2s``, ``1m``, ``1h``, ``1m30s`` or bare seconds (``0.5``) to seconds.

    Raises ``ValueError`` for anything else, including zero, negatives, NaN and infinity.
    """
    value = text.strip().lower()
    seconds: float
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos == 0 or pos != len(value):
            raise ValueError(text) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(text)
    return seconds


def _duration(text: str) -> float:
    return parse_duration(text)


def _duration_or_off(text: str) -> float:
    """A duration, or ``off`` (``0.0``: the feature is disabled)."""
    if text.strip().lower() in ("off", "0"):
        return 0.0
    return parse_duration(text)


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text.strip(), 10)
        if not low <= number <= high:
            raise ValueError(text)
        return number

    return parse


def _ratio(low: float, high: float) -> Callable[[str], float]:
    """``20%`` or ``0.2``: a fraction between ``low`` and ``high``."""

    def parse(text: str) -> float:
        value = text.strip()
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(text)
        return number

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _service_name(text: str) -> str:
    if not _SERVICE_NAME.match(text):
        raise ValueError(text)
    return text


def _version(text: str) -> str:
    if not _VERSION.match(text):
        raise ValueError(text)
    return text


def _host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text.partition("]")
        host += "]"
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _Invalid(f"{text!r} is not host:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise _Invalid(f"{text!r} has no port")
        port = default_port
    else:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _Invalid(f"{text!r} has no valid port")
        port = int(port_text)
    if not _HOST.match(host):
        raise _Invalid(f"{text!r} has no valid host")
    return host.strip("[]"), port


def _static_services(text: str) -> Mapping[str, tuple[HostPort, ...]]:
    services: dict[str, tuple[HostPort, ...]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, endpoints_text = entry.partition("=")
        name = name.strip()
        if not sep or not _SERVICE_NAME.match(name):
            raise _Invalid(f"{entry!r} does not start with a service name and '='")
        if name in services:
            raise _Invalid(f"service {name!r} appears twice")
        endpoints: list[HostPort] = []
        for item in filter(None, (part.strip() for part in endpoints_text.split(","))):
            address, star, weight_text = item.partition("*")
            weight = 1
            if star:
                if not weight_text.isdigit() or not 1 <= int(weight_text) <= 1000:
                    raise _Invalid(f"weight in {item!r} is not a whole number from 1 to 1000")
                weight = int(weight_text)
            host, port = _host_port(address)
            endpoints.append(HostPort(host, port, weight))
        if not endpoints:
            raise _Invalid(f"service {name!r} has no endpoints")
        services[name] = tuple(endpoints)
    return MappingProxyType(services)


def _tags(text: str) -> tuple[str, ...]:
    tags = tuple(t.strip() for t in text.split(",") if t.strip())
    for tag in tags:
        if not _TAG.match(tag):
            raise _Invalid(
                f"tag {tag!r} has characters other than letters, digits, '.', '_', '-', ':', '='"
            )
    return tags


def _callers(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name != "*" and not _SERVICE_NAME.match(name):
            raise _Invalid(f"{name!r} is not a service name")
    return names


def _host_patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    for pattern in patterns:
        host = pattern[2:] if pattern.startswith("*.") else pattern
        if not _HOST.match(host) or host.startswith("["):
            raise _Invalid(f"{pattern!r} is not a host name or '*.domain'")
    return patterns


def _hash_on(text: str) -> HashOn:
    source, sep, name = text.strip().partition(":")
    if not sep or source not in ("header", "cookie") or not _HEADER_NAME.match(name):
        raise ValueError(text)
    return HashOn(source, name.lower() if source == "header" else name)  # type: ignore[arg-type]


def _consul_addr(text: str) -> str:
    """``host:port`` or ``http(s)://host[:port]`` -> base URL without a trailing slash."""
    value = text.strip()
    if "://" not in value:
        host, port = _host_port(value, default_port=8500)
        return f"http://{_bracket(host)}:{port}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(text)
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(text)
    port = parts.port or (443 if parts.scheme == "https" else 8500)
    return f"{parts.scheme}://{_bracket(parts.hostname)}:{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise _Invalid(f"no readable file at {text!r}")
    return text


def _log_destination(text: str) -> str:
    """``stderr``, ``stdout``, or a file to append to (its directory must exist)."""
    if text in ("stderr", "stdout"):
        return text
    directory = os.path.dirname(os.path.abspath(text))
    if not text.strip() or not os.path.isdir(directory) or os.path.isdir(text):
        raise ValueError(text)
    return text


def _host_name(text: str) -> str:
    if not _HOST.match(text.strip()) or text.strip().startswith("["):
        raise ValueError(text)
    return text.strip()


def _text(text: str) -> str:
    return text


def _token(text: str) -> str:
    """An ACL token: visible ASCII only (a UUID for Consul), so it is a valid header value
    and no HTTP library ever raises an error that quotes it."""
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("not visible ASCII")
    return text


def _exporters(text: str) -> tuple[str, ...]:
    """OpenTelemetry's exporter list: ``otlp``, ``console``, ``none``, comma-separated."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if not names or any(n not in ("otlp", "console", "none") for n in names):
        raise ValueError(text)
    return tuple(n for n in names if n != "none")


METRIC_LABEL_OPTIONS = ("endpoint", "path")


def _metric_labels(text: str) -> frozenset[str]:
    """Opt-in high-cardinality labels: ``endpoint``, ``path``, comma-separated (or none)."""
    names = frozenset(n.strip().lower() for n in text.split(",") if n.strip())
    if any(n not in (*METRIC_LABEL_OPTIONS, "none") for n in names):
        raise ValueError(text)
    return names - {"none"}


def _unidentified_deadline(text: str) -> float:
    """The shortest budget honoured from an unidentified caller: inf (``ignore``), 0
    (``honour``) or a duration."""
    word = text.strip().lower()
    if word == "ignore":
        return math.inf
    if word in ("honour", "honor"):
        return 0.0
    return parse_duration(text)


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


def _header_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    for name in names:
        if not _HEADER_NAME.match(name) or name in _HOP_BY_HOP:
            raise _Invalid(f"{name!r} is not a header name meshlib may carry")
    return names


def _listen_address(text: str) -> tuple[str, int]:
    return _host_port(text)


# ---- inbound traffic controls (rate and concurrency limits, fault injection)

_RATE = re.compile(r"^(\d+(?:\.\d+)?)/(s|m|h)(?::burst=(\d+))?$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class RateLimit(NamedTuple):
    """A token bucket's shape: ``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: int
    #: as written (``100/s:burst=20``), for messages and headers
    text: str


def parse_rate_limit(text: str) -> RateLimit:
    """``100/s``, ``6000/m``, ``10/h``, optionally ``:burst=N`` (default: one second's
    worth of tokens, at least 1). ``ValueError`` for anything else."""
    value = text.strip().lower().replace(" ", "")
    match = _RATE.match(value)
    if match is None:
        raise ValueError(text)
    count = float(match.group(1))
    rate = count / _RATE_UNITS[match.group(2)]
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(text)
    burst = int(match.group(3)) if match.group(3) else max(1, math.ceil(rate))
    if not 1 <= burst <= 10_000_000:
        raise _Invalid(f"burst in {text!r} is not a whole number from 1 to 10000000")
    return RateLimit(rate, burst, value)


def _percent(text: str) -> float:
    """``10``, ``10%`` or ``0.5`` (per cent, from 0 to 100) -> a fraction from 0 to 1."""
    value = text.strip().removesuffix("%")
    number = float(value)
    if not (math.isfinite(number) and 0 <= number <= 100):
        raise ValueError(text)
    return number / 100


class FaultHeader(NamedTuple):
    """Only requests with this header (and, when given, this value) get faults."""

    name: str
    value: str | None = None


def parse_fault_header(text: str) -> FaultHeader:
    """``x-mesh-fault`` (present with any value) or ``x-mesh-fault=on`` (that value)."""
    name, sep, wanted = text.strip().partition("=")
    name = name.strip().lower()
    if not _HEADER_NAME.match(name) or (sep and not wanted.strip()):
        raise ValueError(text)
    return FaultHeader(name, wanted.strip() if sep else None)


@dataclass(frozen=True, slots=True)
class Faults:
    """Faults injected into inbound requests, for resilience testing (off when empty)."""

    #: seconds to delay a chosen request; None: no delay
    delay: float | None = None
    #: share of eligible requests delayed (0 to 1)
    delay_percent: float = 1.0
    #: status of an aborted request; None: no abort
    abort_status: int | None = None
    #: share of eligible requests aborted (0 to 1)
    abort_percent: float = 1.0
    #: only requests carrying this header are eligible; None: every request
    header: FaultHeader | None = None

    @property
    def active(self) -> bool:
        """Whether any fault can be injected."""
        return (self.delay is not None and self.delay_percent > 0) or (
            self.abort_status is not None and self.abort_percent > 0
        )

    def describe(self) -> str:
        """Every setting, for the start-up warning."""
        parts = []
        if self.delay is not None:
            parts.append(f"delay {self.delay * 1000:g}ms for {self.delay_percent * 100:g}%")
        if self.abort_status is not None:
            parts.append(f"abort with {self.abort_status} for {self.abort_percent * 100:g}%")
        header = self.header
        if header is None:
            parts.append("of every request")
        elif header.value is None:
            parts.append(f"of requests with a {header.name} header")
        else:
            parts.append(f"of requests with {header.name}: {header.value}")
        return ", ".join(parts[:-1]) + " " + parts[-1]


def _http_url(text: str) -> str:
    """An ``http(s)://host[:port][/path]`` base URL, without a trailing slash."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(text)
    return text.strip().rstrip("/")


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Variable:
    """One environment variable meshlib reads."""

    name: str
    default: str
    example: str
    expected: str
    help: str
    parse: Callable[[str], Any] = field(repr=False, compare=False)
    #: May be overridden per service as ``<name>__<SERVICE>``.
    per_service: bool = False
    #: Whose variable it is: meshlib's own, or Consul's / OpenTelemetry's honoured as is.
    owner: Literal["meshlib", "consul", "otel"] = "meshlib"
    #: Never echo the value in an error message (tokens).
    secret: bool = False
    #: The ``MeshConfig`` field it sets (``ServicePolicy``'s, when ``per_service``), whose
    #: default is the typed default (``default`` says it for the docs; a test keeps the two
    #: in step); empty for a variable ``load_config`` reads by a rule of its own.
    field: str = ""


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "MESH_SERVICE_NAME",
        "`OTEL_SERVICE_NAME`, else unset",
        "forecast",
        "a service name: lowercase letters, digits and '-', starting with a letter, "
        "at most 63 characters",
        "The name this process serves as in the mesh (registration, identity, telemetry). "
        "A process that only calls other services may leave it unset.",
        _service_name,
    ),
    Variable(
        "MESH_SERVICE_VERSION",
        "unset",
        "v2",
        "a version label of letters, digits, '.', '_' or '-' (at most 63 characters)",
        "The version of this instance, registered in Consul's `Meta.version`; subsets and "
        "canaries select on it.",
        _version,
        field="service_version",
    ),
    Variable(
        "MESH_DISCOVERY",
        "`consul` if `CONSUL_HTTP_ADDR` is set, else `static`",
        "static",
        "one of consul, static",
        "Where endpoints come from: Consul's health API, or `MESH_STATIC_SERVICES`.",
        _choice("consul", "static"),
    ),
    Variable(
        "MESH_STATIC_SERVICES",
        "empty",
        "weather=127.0.0.1:8001,127.0.0.1:8002;geo=[::1]:9001*2",
        "'service=host:port,host:port;service=host:port' with an optional weight as 'host:port*3'",
        "Endpoints of each service for static discovery (the embedded default).",
        _static_services,
    ),
    Variable(
        "MESH_CONFIG_FILE",
        "unset",
        "/etc/meshlib/mesh.json",
        "the path of a readable JSON file",
        "The local config file (the embedded default's control plane): endpoints with "
        "metadata under `services`, and Consul-shaped `service-router`, `service-splitter` "
        "and `service-resolver` entries under `config_entries`. Re-read when it changes; a "
        "malformed version is refused and the last good one stays in force.",
        _existing_file,
        field="config_file",
    ),
    Variable(
        "MESH_DISCOVERY_TIMEOUT",
        "2s",
        "500ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long the first request to a service never seen before may wait for discovery "
        "to find it. Requests to known services never wait on discovery.",
        _duration,
        field="discovery_timeout",
    ),
    Variable(
        "MESH_DISCOVERY_RESET_GRACE",
        "30s",
        "2m",
        "a duration such as 30s or 2m, or off",
        "After Consul restarts or comes back (a dev agent comes back empty), how long a "
        "service that had instances and now has none keeps its last known ones, unless "
        "instances reappear sooner (as Eureka's self-preservation does).",
        _duration_or_off,
        field="discovery_reset_grace",
    ),
    Variable(
        "MESH_LB",
        "p2c_ewma",
        "round_robin",
        "one of " + ", ".join(LB_POLICIES),
        "Load-balancing policy: power of two choices over peak-EWMA latency (`p2c_ewma`), "
        "`least_request` (P2C on in-flight requests), `round_robin`, `random`, or "
        "`ring_hash` (sticky by `MESH_LB_HASH_ON`). All honour endpoint weights.",
        _choice(*LB_POLICIES),
        per_service=True,
        field="lb",
    ),
    Variable(
        "MESH_LB_HASH_ON",
        "unset (a random key per request)",
        "header:x-user-id",
        "'header:<name>' or 'cookie:<name>'",
        "What `ring_hash` hashes to pick an endpoint, so one user sticks to one instance.",
        _hash_on,
        per_service=True,
        field="hash_on",
    ),
    Variable(
        "MESH_SPLIT_HASH_ON",
        "unset (each request split at random)",
        "cookie:session",
        "'header:<name>' or 'cookie:<name>'",
        "Makes the service's splits sticky: a request carrying this header or cookie takes "
        "the split its value hashes to, the same in every process, so one user stays on one "
        "version while all users follow the weights. Requests without it split at random.",
        _hash_on,
        per_service=True,
        field="split_hash_on",
    ),
    Variable(
        "MESH_TIMEOUT",
        "5s",
        "800ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Timeout of one attempt (connect, write, and each read).",
        _duration,
        per_service=True,
        field="timeout",
    ),
    Variable(
        "MESH_DEADLINE",
        "15s",
        "3s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Budget of the whole request: every attempt and backoff. The remaining budget is sent "
        "downstream in `x-mesh-deadline-ms` so the callee can give up early.",
        _duration,
        per_service=True,
        field="deadline",
    ),
    Variable(
        "MESH_RETRIES",
        "2",
        "3",
        "a whole number from 0 to 10",
        "Retries after the first attempt, for retryable outcomes only (connect failures, "
        "resets before a response, 502/503/504); non-idempotent requests only by opt-in.",
        _int_between(0, 10),
        per_service=True,
        field="retries",
    ),
    Variable(
        "MESH_RETRY_BUDGET",
        "20%",
        "0.1",
        "a ratio from 0% to 1000%, as '20%' or '0.2'",
        "Retries allowed as a share of recent requests (over 10 s), on top of "
        "`MESH_RETRY_MIN_PER_SECOND`, so a dead service does not get a retry storm.",
        _ratio(0.0, 10.0),
        per_service=True,
        field="retry_budget",
    ),
    Variable(
        "MESH_RETRY_MIN_PER_SECOND",
        "10",
        "5",
        "a whole number from 0 to 100000",
        "Retries always allowed per second regardless of the ratio, so low-traffic services "
        "can still retry.",
        _int_between(0, 100_000),
        per_service=True,
        field="retry_min_per_second",
    ),
    Variable(
        "MESH_RETRY_BACKOFF",
        "25ms",
        "50ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Base of the exponential backoff between attempts (full jitter).",
        _duration,
        per_service=True,
        field="retry_backoff",
    ),
    Variable(
        "MESH_RETRY_BACKOFF_MAX",
        "250ms",
        "1s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Longest backoff between two attempts; a `Retry-After` longer than the remaining "
        "deadline is not waited for.",
        _duration,
        per_service=True,
        field="retry_backoff_max",
    ),
    Variable(
        "MESH_HEDGE_DELAY",
        "off",
        "50ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds, or 'off'",
        "Hedged requests: when an idempotent request with a replayable body has had no answer "
        "after this delay, send one more attempt to another endpoint and take whichever "
        "answers first (the other is cancelled). Each hedge spends the retry budget. Set it "
        "near the service's p95 latency; per request, the `hedge` option overrides it.",
        _duration_or_off,
        per_service=True,
        field="hedge_delay",
    ),
    Variable(
        "MESH_OUTLIER_CONSECUTIVE_ERRORS",
        "5",
        "3",
        "a whole number from 1 to 1000",
        "Consecutive gateway errors (502/503/504, connect failures, resets) or 5xx that eject "
        "an endpoint from load balancing.",
        _int_between(1, 1000),
        per_service=True,
        field="outlier_consecutive_errors",
    ),
    Variable(
        "MESH_OUTLIER_EJECTION_TIME",
        "30s",
        "5s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Base ejection time; an endpoint ejected again stays out that many times longer "
        "(capped at 10 times the base).",
        _duration,
        per_service=True,
        field="outlier_ejection_time",
    ),
    Variable(
        "MESH_OUTLIER_MAX_EJECTION",
        "50%",
        "34%",
        "a ratio from 0% to 100%, as '50%' or '0.5'",
        "Most of a service's endpoints that may be ejected at once (at least one always may).",
        _ratio(0.0, 1.0),
        per_service=True,
        field="outlier_max_ejection",
    ),
    Variable(
        "MESH_PANIC_THRESHOLD",
        "50%",
        "0",
        "a ratio from 0% to 100%, as '50%' or '0.5'",
        "When fewer than this share of endpoints are available, balance across all of them "
        "(ejected ones and those failing their health checks too) rather than overload the "
        "few left. `0` disables panic mode.",
        _ratio(0.0, 1.0),
        per_service=True,
        field="panic_threshold",
    ),
    Variable(
        "MESH_SLOW_START",
        "10s",
        "30s",
        "a duration such as 250ms, 2s, 1m or a number of seconds, or 'off'",
        "Slow start under `p2c_ewma` (Envoy's `slow_start_window`; Envoy has it off unless "
        "set): for this long after an endpoint joins (new, healthy again, or readmitted after "
        "an ejection) its slow answers are forgiven within about a tenth of it, so a cold "
        "start does not cost it tens of seconds of traffic, and a new one starts at its "
        "peers' typical latency and ramps from 10% of its share. `off` disables it.",
        _duration_or_off,
        per_service=True,
        field="slow_start",
    ),
    Variable(
        "MESH_BREAKER_FAILURES",
        "20",
        "10",
        "a whole number from 1 to 100000",
        "Consecutive failed requests to a service (after retries) that open its circuit "
        "breaker; while open, requests fail fast with `meshlib.CircuitOpen`.",
        _int_between(1, 100_000),
        per_service=True,
        field="breaker_failures",
    ),
    Variable(
        "MESH_BREAKER_RESET",
        "10s",
        "30s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long an open breaker stays open before letting probes through (half-open).",
        _duration,
        per_service=True,
        field="breaker_reset",
    ),
    Variable(
        "MESH_BREAKER_PROBES",
        "1",
        "3",
        "a whole number from 1 to 1000",
        "Requests let through at once while half-open; the rest fail fast until a probe "
        "succeeds (closing the breaker) or fails (re-opening it).",
        _int_between(1, 1000),
        per_service=True,
        field="breaker_probes",
    ),
    Variable(
        "MESH_SERVICE_ADDRESS",
        "the address served on (a wildcard: the Consul node's address)",
        "10.0.3.7",
        "an IP address or host name",
        "The address registered in Consul for this instance.",
        _host_name,
        field="service_address",
    ),
    Variable(
        "MESH_SERVICE_PORT",
        "the port `meshlib serve` listens on, else unset",
        "8001",
        "a port number from 1 to 65535",
        "The port registered in Consul when the app runs under a server other than "
        "`meshlib serve` (which sets it itself). Without it such an app is not registered.",
        _int_between(1, 65535),
        field="service_port",
    ),
    Variable(
        "MESH_SERVICE_TAGS",
        "none",
        "blue,eu-west",
        "tags separated by commas (letters, digits, '.', '_', '-', ':', '=')",
        "Tags registered in Consul for this instance.",
        _tags,
        field="service_tags",
    ),
    Variable(
        "MESH_HEALTH_INTERVAL",
        "2s",
        "5s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How often Consul checks `/mesh/health` of this instance.",
        _duration,
        field="health_interval",
    ),
    Variable(
        "MESH_DEREGISTER_AFTER",
        "1m",
        "10m",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Consul's `DeregisterCriticalServiceAfter`: an instance whose check stays critical "
        "this long (it crashed without deregistering) is removed.",
        _duration,
        field="deregister_after",
    ),
    Variable(
        "MESH_SHUTDOWN_DELAY",
        "1s",
        "3s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "On shutdown, how long to keep serving after deregistering, so callers' discovery "
        "drops this instance before it stops accepting connections.",
        _duration,
        field="shutdown_delay",
    ),
    Variable(
        "MESH_DRAIN_TIMEOUT",
        "20s",
        "60s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "On shutdown, the longest wait for in-flight requests to finish.",
        _duration,
        field="drain_timeout",
    ),
    Variable(
        "MESH_ACCESS_LOG",
        "off",
        "json",
        "one of off, json",
        "`json`: one JSON line per inbound and per outbound request on the loggers "
        "`meshlib.access.inbound` / `meshlib.access.outbound` (to stderr unless the app gave "
        "`meshlib.access` a handler).",
        _choice("off", "json"),
        field="access_log",
    ),
    Variable(
        "MESH_ACCESS_LOG_FILE",
        "stderr",
        "access.jsonl",
        "stderr, stdout, or the path of a file in an existing directory",
        "Where `MESH_ACCESS_LOG=json` lines go when the app gave `meshlib.access` no handler: "
        "`stdout` keeps them apart from server logs and tracebacks (on stderr); a path "
        "appends them to that file.",
        _log_destination,
        field="access_log_file",
    ),
    Variable(
        "MESH_ADMIN_ADDR",
        "a server: `127.0.0.1:0` (a free loopback port, printed by `meshlib serve` and given "
        "to Consul's check); a pure client: unset (none)",
        "127.0.0.1:9901",
        "host:port",
        "The admin listener (plaintext HTTP, one per process): `/mesh/health`, "
        "`/mesh/health/ready`, `/mesh/health/live`, `/mesh/metrics` (also `/metrics`) and "
        "`/mesh/status` (loopback peers only). The app's own port never serves them. Bind it "
        "beyond loopback only for a scraper or prober that cannot reach loopback.",
        _listen_address,
    ),
    Variable(
        "MESH_METRICS_ADDR",
        "unset",
        "127.0.0.1:9464",
        "host:port",
        "Deprecated alias of `MESH_ADMIN_ADDR` (its listener now serves every admin route).",
        _listen_address,
    ),
    Variable(
        "MESH_METRICS_LABELS",
        "none",
        "endpoint,path",
        "labels separated by commas: endpoint, path or none",
        "Opt in to metrics with unbounded labels, kept off by default so a scrape stays "
        "small: `endpoint` adds `meshlib_client_attempt_duration_seconds` per endpoint "
        "address; `path` adds `meshlib_client_path_duration_seconds` by URL path and "
        "`meshlib_server_route_duration_seconds` by route (the framework's route template, "
        "else the path; an unmatched 404 takes no slot). Each label keeps at most 500 "
        "distinct values per process; more become `_OTHER`.",
        _metric_labels,
        field="metrics_labels",
    ),
    Variable(
        "MESH_ROLLOUT_PROMETHEUS_URL",
        "`http://127.0.0.1:9090`; without Consul and with `MESH_CONFIG_FILE`: unset (the "
        "instances' own `/mesh/metrics`)",
        "http://prometheus.internal:9090",
        "an http:// or https:// URL",
        "The Prometheus whose HTTP API `meshlib rollout` reads the canary's success rate and "
        "p99 from (the `--prometheus` flag overrides it). A rollout of the local config file "
        "without it scrapes each instance's admin listener at each check instead.",
        _http_url,
        field="rollout_prometheus_url",
    ),
    Variable(
        "MESH_TLS",
        "off",
        "strict",
        "one of off, permissive, strict",
        "Mesh TLS: `off` is plain HTTP; `permissive` serves mTLS and plaintext (to migrate a "
        "fleet without downtime); `strict` requires mTLS both ways.",
        _choice("off", "permissive", "strict"),
        field="tls",
    ),
    Variable(
        "MESH_TLS_CA",
        "`consul` with Consul discovery, else `signer`",
        "signer",
        "one of signer, consul, local",
        "Where certificates come from: `signer` asks the local CA's signer (`meshlib ca serve`) "
        "at `MESH_TLS_SIGNER` for a leaf for this service only, so the process never holds a "
        "key that can sign; `consul` is Consul Connect's CA; `local` (development only) signs "
        "in process with the root key read from `MESH_TLS_DIR`, so every process could mint "
        "any identity.",
        _choice("signer", "consul", "local"),
    ),
    Variable(
        "MESH_TLS_DIR",
        "`~/.local/share/meshlib/ca`",
        "/etc/meshlib/ca",
        "a directory path",
        "The local CA's directory (`meshlib ca init` creates it; keys are mode 0600). Read by "
        "`meshlib ca serve`, and by services only with `MESH_TLS_CA=local`.",
        _text,
        field="tls_dir",
    ),
    Variable(
        "MESH_TLS_SIGNER",
        "`/run/meshlib/signer.sock`",
        "/run/meshlib/signer.sock",
        "a Unix socket path",
        "The Unix socket of the signer (`meshlib ca serve`) that issues this service's leaf "
        "with `MESH_TLS_CA=signer`; it gives a process only the service names its user is "
        "entitled to in the signer's policy file.",
        _text,
        field="tls_signer",
    ),
    Variable(
        "MESH_TLS_LEAF_TTL",
        "8h",
        "1h",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Lifetime of the leaf certificate the process asks the local CA's signer for (at most "
        "the signer's `--leaf-ttl`); it is renewed after two thirds of it.",
        _duration,
        field="tls_leaf_ttl",
    ),
    Variable(
        "MESH_DATACENTER",
        "dc1",
        "eu-west-1",
        "a datacenter name of letters, digits, '.', '_' or '-'",
        "The datacenter in this process's SPIFFE ID with the local CA (Consul's CA says its own).",
        _version,
        field="datacenter",
    ),
    Variable(
        "MESH_ALLOWED_CALLERS",
        "any caller",
        "gateway,web",
        "service names separated by commas, or '*'",
        "Without Consul: the only services allowed to call this one (by their verified "
        "identity). With Consul, its intentions decide, and this list applies as well.",
        _callers,
        field="allowed_callers",
    ),
    Variable(
        "MESH_DENIED_CALLERS",
        "none",
        "batch",
        "service names separated by commas, or '*'",
        "Services never allowed to call this one; wins over `MESH_ALLOWED_CALLERS`.",
        _callers,
        field="denied_callers",
    ),
    Variable(
        "MESH_INTENTIONS_CACHE",
        "2s",
        "10s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long a Consul intention decision for one caller is reused.",
        _duration,
        field="intentions_cache",
    ),
    Variable(
        "MESH_UNIDENTIFIED_CALLERS",
        "intentions",
        "allow",
        "one of intentions, allow",
        "With Consul intentions: how a caller without a client certificate (plaintext, "
        "`MESH_TLS=permissive`) is judged. `intentions`: like the `*` source of the "
        "intentions, so Consul's default intention policy holds; `allow`: let it through "
        "unchecked, as meshlib did before (a warning is logged at start).",
        _choice("intentions", "allow"),
        field="unidentified_callers",
    ),
    Variable(
        "MESH_EGRESS",
        "allow",
        "deny",
        "one of allow, deny",
        "Calls to hosts outside the mesh: `allow` all, or `deny` all but "
        "`MESH_EGRESS_ALLOW` (refused before any connection opens).",
        _choice("allow", "deny"),
        field="egress",
    ),
    Variable(
        "MESH_EGRESS_ALLOW",
        "none",
        "api.github.com,*.example.com",
        "host names separated by commas, each exact or '*.' and a domain",
        "External hosts allowed when `MESH_EGRESS=deny`.",
        _host_patterns,
        field="egress_allow",
    ),
    # ---- inbound traffic controls (server/_limits.py, server/_faults.py)
    Variable(
        "MESH_RATE_LIMIT",
        "unset (no limit)",
        "100/s:burst=200",
        "a rate as '<count>/s', '<count>/m' or '<count>/h', optionally with ':burst=<count>'",
        "Requests this process serves, in all (a token bucket; the burst defaults to one "
        "second's worth, at least 1). Beyond it: 429 with `Retry-After`, before the handler.",
        parse_rate_limit,
        field="rate_limit",
    ),
    Variable(
        "MESH_RATE_LIMIT_PER_SOURCE",
        "unset (no limit)",
        "20/s",
        "a rate as '<count>/s', '<count>/m' or '<count>/h', optionally with ':burst=<count>'",
        "Requests this process serves per calling service (its verified mTLS identity; "
        "callers without one share a single bucket). Beyond it: 429 with `Retry-After`.",
        parse_rate_limit,
        field="rate_limit_per_source",
    ),
    Variable(
        "MESH_MAX_CONCURRENT_REQUESTS",
        "unset (no limit)",
        "64",
        "a whole number from 1 to 1000000",
        "Requests this process handles at once; beyond it a request is shed with 503 and "
        "`Retry-After: 1` before the handler runs. `/mesh/health` is never limited.",
        _int_between(1, 1_000_000),
        field="max_concurrent_requests",
    ),
    Variable(
        "MESH_PROPAGATE_HEADERS",
        "none",
        "x-debug,baggage",
        "header names separated by commas",
        "Headers carried from the request a process is serving onto every mesh call it makes "
        "while serving it (unless the call sets them itself), so a router rule on them (a "
        "debug or canary pin) holds on every hop. Taken only from an identified mesh caller "
        "unless `MESH_PROPAGATE_UNIDENTIFIED=honour`; never sent to hosts outside the mesh.",
        _header_names,
        field="propagate_headers",
    ),
    Variable(
        "MESH_PROPAGATE_UNIDENTIFIED",
        "ignore",
        "honour",
        "one of ignore, honour",
        "Whether `MESH_PROPAGATE_HEADERS` are carried on from a caller without a verified "
        "mesh identity. `ignore`: an edge's own code sets them on its outbound calls; "
        "`honour`: for plaintext meshes (`MESH_TLS=off`) behind an edge that strips them.",
        _choice("ignore", "honour"),
        field="propagate_unidentified",
    ),
    Variable(
        "MESH_UNIDENTIFIED_DEADLINE",
        "ignore",
        "1s",
        "ignore, honour, or a duration such as 250ms, 2s, 1m (the shortest budget honoured)",
        "What a server does with the `x-mesh-deadline-ms` of a caller without a verified mesh "
        "identity (plaintext, or mTLS without a service identity): `ignore` it, `honour` it "
        "as from a mesh caller, or honour it but never below this duration. With "
        "`MESH_TLS=off` every caller is unidentified: set `honour` there to keep deadlines "
        "propagating between plaintext services.",
        _unidentified_deadline,
        field="unidentified_deadline",
    ),
    Variable(
        "MESH_FAULT_DELAY",
        "unset (no delay)",
        "200ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Fault injection: delay chosen requests this long before the handler (counts "
        "against the caller's deadline). For resilience tests only; logged loudly.",
        _duration,
    ),
    Variable(
        "MESH_FAULT_DELAY_PERCENT",
        "100 (when `MESH_FAULT_DELAY` is set)",
        "10",
        "a percentage from 0 to 100, as '10' or '10%'",
        "Share of eligible requests that `MESH_FAULT_DELAY` delays.",
        _percent,
    ),
    Variable(
        "MESH_FAULT_ABORT_STATUS",
        "503 (when `MESH_FAULT_ABORT_PERCENT` is set)",
        "500",
        "an HTTP status from 400 to 599",
        "Fault injection: answer chosen requests with this status instead of running the "
        "handler. For resilience tests only; logged loudly.",
        _int_between(400, 599),
    ),
    Variable(
        "MESH_FAULT_ABORT_PERCENT",
        "100 (when `MESH_FAULT_ABORT_STATUS` is set)",
        "5",
        "a percentage from 0 to 100, as '5' or '5%'",
        "Share of eligible requests aborted with `MESH_FAULT_ABORT_STATUS`.",
        _percent,
    ),
    Variable(
        "MESH_FAULT_HEADER",
        "unset (every request is eligible)",
        "x-mesh-fault=on",
        "a header name, or 'name=value'",
        "Only requests carrying this header (with this value, when given) are eligible "
        "for the faults above; others are never touched.",
        parse_fault_header,
    ),
    # ---- Consul's own variables, honoured as the consul CLI reads them
    Variable(
        "CONSUL_HTTP_ADDR",
        "unset (no Consul)",
        "127.0.0.1:8500",
        "host:port or http(s)://host[:port]",
        "Address of the local Consul agent. Setting it makes Consul the default discovery.",
        _consul_addr,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_TOKEN",
        "unset",
        "(an ACL token)",
        "an ACL token of visible ASCII characters (no spaces)",
        "ACL token sent to Consul as `X-Consul-Token`. Never logged, never shown in an "
        "error message.",
        _token,
        owner="consul",
        secret=True,
    ),
    Variable(
        "CONSUL_HTTP_TOKEN_FILE",
        "unset",
        "/run/secrets/consul-token",
        "the path of a readable file",
        "File holding the ACL token (used when `CONSUL_HTTP_TOKEN` is unset).",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_SSL",
        "false",
        "true",
        "true or false",
        "Talk to Consul over HTTPS when `CONSUL_HTTP_ADDR` has no scheme.",
        _bool,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_SSL_VERIFY",
        "true",
        "false",
        "true or false",
        "Verify Consul's HTTPS certificate.",
        _bool,
        owner="consul",
    ),
    Variable(
        "CONSUL_CACERT",
        "unset (system trust)",
        "/etc/consul.d/ca.pem",
        "the path of a readable file",
        "CA bundle that signs Consul's HTTPS certificate.",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_CLIENT_CERT",
        "unset",
        "/etc/consul.d/client.pem",
        "the path of a readable file",
        "Client certificate for Consul's HTTPS API (with `CONSUL_CLIENT_KEY`).",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_CLIENT_KEY",
        "unset",
        "/etc/consul.d/client-key.pem",
        "the path of a readable file",
        "Key of `CONSUL_CLIENT_CERT`.",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_TLS_SERVER_NAME",
        "unset",
        "consul.example.internal",
        "a host name",
        "Server name to verify Consul's certificate against.",
        _host_name,
        owner="consul",
    ),
    # ---- OpenTelemetry's: the SDK reads all OTEL_*; meshlib itself reads this one
    Variable(
        "OTEL_SERVICE_NAME",
        "unset",
        "forecast",
        "a service name",
        "Used as `MESH_SERVICE_NAME` when that is unset. All other `OTEL_*` variables are "
        "honoured by the OpenTelemetry SDK as documented there.",
        _text,
        owner="otel",
    ),
    Variable(
        "OTEL_TRACES_EXPORTER",
        "`otlp` if an OTLP endpoint is set, else none",
        "console",
        "exporters separated by commas: otlp, console or none",
        "Where spans go when the application has not installed a tracer provider itself.",
        _exporters,
        owner="otel",
        field="traces_exporter",
    ),
    Variable(
        "OTEL_METRICS_EXPORTER",
        "`otlp` if an OTLP endpoint is set, else none",
        "none",
        "exporters separated by commas: otlp, console or none",
        "Where metrics are pushed (every `OTEL_METRIC_EXPORT_INTERVAL`) besides the "
        "Prometheus text on `/mesh/metrics`, which is always there.",
        _exporters,
        owner="otel",
        field="metrics_exporter",
    ),
)

_BY_NAME: Mapping[str, Variable] = MappingProxyType({v.name: v for v in VARIABLES})


def override_key(service: str) -> str:
    """The suffix of a per-service override: ``forecast-v2`` -> ``FORECAST_V2``."""
    return service.upper().replace("-", "_").replace(".", "_")


# --------------------------------------------------------------------------- config objects


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """How calls to one service behave. Swapping one for another is a pointer swap."""

    lb: LbPolicy = "p2c_ewma"
    hash_on: HashOn | None = None
    #: what a split hashes to stay sticky per user (None: random per request)
    split_hash_on: HashOn | None = None
    timeout: float = 5.0
    deadline: float = 15.0
    retries: int = 2
    retry_budget: float = 0.2
    retry_min_per_second: int = 10
    retry_backoff: float = 0.025
    retry_backoff_max: float = 0.25
    #: seconds before a hedged attempt; 0: no hedging
    hedge_delay: float = 0.0
    outlier_consecutive_errors: int = 5
    outlier_ejection_time: float = 30.0
    outlier_max_ejection: float = 0.5
    panic_threshold: float = 0.5
    #: seconds of slow start for a joining or readmitted endpoint; 0: none
    slow_start: float = 10.0
    breaker_failures: int = 20
    breaker_reset: float = 10.0
    breaker_probes: int = 1


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
    service_version: str | None = None
    discovery: DiscoveryMode = "static"
    static_services: Mapping[str, tuple[HostPort, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    discovery_timeout: float = 2.0
    discovery_reset_grace: float = 30.0
    config_file: str | None = None
    tls: TlsMode = "off"
    service_address: str | None = None
    service_port: int | None = None
    service_tags: tuple[str, ...] = ()
    health_interval: float = 2.0
    deregister_after: float = 60.0
    shutdown_delay: float = 1.0
    drain_timeout: float = 20.0
    tls_ca: Literal["signer", "consul", "local"] = "signer"
    tls_dir: str = "~/.local/share/meshlib/ca"
    tls_signer: str = "/run/meshlib/signer.sock"
    tls_leaf_ttl: float = 8 * 3600.0
    datacenter: str = "dc1"
    allowed_callers: frozenset[str] | None = None
    denied_callers: frozenset[str] = frozenset()
    intentions_cache: float = 2.0
    unidentified_callers: Literal["intentions", "allow"] = "intentions"
    egress: Literal["allow", "deny"] = "allow"
    egress_allow: tuple[str, ...] = ()
    access_log: Literal["off", "json"] = "off"
    access_log_file: str = "stderr"
    #: the admin listener's address (None: unset, a server then takes 127.0.0.1:0)
    admin_addr: tuple[str, int] | None = None
    metrics_labels: frozenset[str] = frozenset()
    #: None: not given (Prometheus on 127.0.0.1:9090 with Consul; scrapes without)
    rollout_prometheus_url: str | None = None
    #: None: unset (OpenTelemetry's default applies); () : none
    traces_exporter: tuple[str, ...] | None = None
    metrics_exporter: tuple[str, ...] | None = None
    consul: ConsulSettings | None = None
    rate_limit: RateLimit | None = None
    rate_limit_per_source: RateLimit | None = None
    max_concurrent_requests: int | None = None
    #: the shortest deadline budget honoured from an unidentified caller (inf: ignored)
    unidentified_deadline: float = math.inf
    #: headers carried from the inbound request onto its outbound mesh calls
    propagate_headers: tuple[str, ...] = ()
    propagate_unidentified: Literal["ignore", "honour"] = "ignore"
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


def markdown_table(owner: Literal["meshlib", "consul", "otel"]) -> str:
    """The docs table of one owner's variables, as docs/configuration.md shows it."""
    lines = [
        "| Variable | Default | Example | Per service | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for var in VARIABLES:
        if var.owner != owner:
            continue
        per_service = "yes" if var.per_service else ""
        text = f"{var.help} Expected: {var.expected}.".replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{var.name}` | {var.default} | `{var.example}` | {per_service} | {text} |")
    return "\n".join(lines) + "\n"
