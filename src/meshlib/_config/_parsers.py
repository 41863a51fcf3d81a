"""Parsers of the environment's values, and the value types they make.

Each parser takes the text of one variable and returns its typed value, or raises
``ValueError`` (``_Invalid`` when the message should say more than the row's ``expected``
text). The table (``_table``) names a parser per row; loading (``__init__``) calls them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

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
