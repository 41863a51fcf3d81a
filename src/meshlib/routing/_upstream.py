"""``service-defaults`` ``UpstreamConfig``: how this process treats the services it calls.

In Consul the settings for calls *from* a service live in that (downstream) service's
``service-defaults`` entry: ``UpstreamConfig.Defaults`` for every upstream, and
``UpstreamConfig.Overrides`` (a list with a ``Name`` each) for one upstream. Envoy turns
``PassiveHealthCheck`` into outlier detection; meshlib maps it onto its own ejection
settings for that destination:

==========================  ===================================================
``MaxFailures``             ``outlier_consecutive_errors`` (Envoy consecutive_5xx)
``BaseEjectionTime``        ``outlier_ejection_time``
``MaxEjectionPercent``      ``outlier_max_ejection`` (as a fraction)
``EnforcingConsecutive5xx`` ``0`` turns ejection off; any other value enforces it
                            always (meshlib does not eject by chance)
``Interval``                ignored: meshlib ejects the moment the count is reached
                            instead of at Envoy's periodic sweep
==========================  ===================================================

``Limits.MaxConcurrentRequests`` caps the requests in flight to that destination (every
attempt counts, as in Envoy's ``max_requests`` circuit breaker): a request beyond it fails
at once with ``CircuitOpen`` instead of queueing.

``Limits.MaxConnections`` and ``MaxPendingRequests`` are Envoy's ``max_connections`` and
``max_pending_requests`` circuit breakers, which Consul writes only when set. meshlib
speaks HTTP/1.1, one request per connection at a time, so the connections in use to a
destination are its attempts in flight: a request that finds ``MaxConnections`` of them
waits for one to end (it is *pending*), and one that finds ``MaxPendingRequests`` already
waiting fails at once with ``CircuitOpen`` (Envoy's 503 "pending overflow"). When only one
of the two is set, the other is Envoy's default, 1024 (``ConnectionLimits``).

Settings Consul leaves out keep meshlib's own (``MESH_OUTLIER_*``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .._config import ServicePolicy
from ._consul import _obj
from ._entries import _seconds

__all__ = ["ENVOY_DEFAULT_LIMIT", "ConnectionLimits", "UpstreamConfig", "parse_upstream_config"]

#: Envoy's default for a circuit-breaker threshold Consul leaves unset
ENVOY_DEFAULT_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """``MaxConnections`` and ``MaxPendingRequests`` for one destination."""

    max_connections: int
    max_pending: int


@dataclass(frozen=True, slots=True)
class Upstream:
    """The settings Consul gives for calls to one destination (None = not set)."""

    consecutive_errors: int | None = None
    ejection_time: float | None = None
    max_ejection: float | None = None
    max_concurrent: int | None = None
    max_connections: int | None = None
    max_pending: int | None = None

    def connection_limits(self) -> ConnectionLimits | None:
        """The connection and pending limits, when Consul sets either (None: neither)."""
        if self.max_connections is None and self.max_pending is None:
            return None
        return ConnectionLimits(
            ENVOY_DEFAULT_LIMIT if self.max_connections is None else self.max_connections,
            ENVOY_DEFAULT_LIMIT if self.max_pending is None else self.max_pending,
        )

    def apply(self, policy: ServicePolicy) -> ServicePolicy:
        """``policy`` with the settings Consul sets."""
        changes: dict[str, Any] = {}
        if self.consecutive_errors is not None:
            changes["outlier_consecutive_errors"] = self.consecutive_errors
        if self.ejection_time is not None:
            changes["outlier_ejection_time"] = self.ejection_time
        if self.max_ejection is not None:
            changes["outlier_max_ejection"] = self.max_ejection
        return dataclasses.replace(policy, **changes) if changes else policy


@dataclass(frozen=True)
class UpstreamConfig:
    """One version of the ``UpstreamConfig`` of this process's ``service-defaults``."""

    defaults: Upstream = Upstream()
    overrides: Mapping[str, Upstream] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )

    def policy(self, service: str, base: ServicePolicy) -> ServicePolicy:
        """The policy for calls to ``service``: its override, else the defaults, on ``base``."""
        return self.overrides.get(service, self.defaults).apply(base)

    def max_concurrent(self, service: str) -> int | None:
        """The most requests in flight to ``service`` Consul allows (None: no cap)."""
        return self.overrides.get(service, self.defaults).max_concurrent

    def connection_limits(self, service: str) -> ConnectionLimits | None:
        """``MaxConnections`` / ``MaxPendingRequests`` for ``service`` (None: not set)."""
        return self.overrides.get(service, self.defaults).connection_limits()

    def limits_anything(self) -> bool:
        """Whether any destination has a limit (so the request path checks them)."""
        return any(
            u.max_concurrent is not None or u.connection_limits() is not None
            for u in (self.defaults, *self.overrides.values())
        )


def parse_upstream_config(body: Any) -> UpstreamConfig:
    """The ``UpstreamConfig`` of a ``service-defaults`` entry (None: no entry).

    ``ValueError`` naming the field when the entry is malformed.
    """
    if body is None:
        return UpstreamConfig()
    entry = _obj(body, "the service-defaults entry")
    upstream = _obj(entry.get("UpstreamConfig"), "UpstreamConfig")
    defaults = _upstream(upstream.get("Defaults"), "UpstreamConfig.Defaults")
    overrides: dict[str, Upstream] = {}
    raw_overrides = upstream.get("Overrides") or []
    if not isinstance(raw_overrides, list):
        raise ValueError("UpstreamConfig.Overrides is not a list")
    for i, raw in enumerate(raw_overrides):
        where = f"UpstreamConfig.Overrides[{i}]"
        name = _obj(raw, where).get("Name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.Name is not a service name")
        overrides[name] = _upstream(raw, where)
    return UpstreamConfig(defaults, MappingProxyType(overrides))


def _upstream(raw: Any, where: str) -> Upstream:
    settings = _obj(raw, where)
    limits = _obj(settings.get("Limits"), f"{where}.Limits")
    cap = _count(limits.get("MaxConcurrentRequests"), f"{where}.Limits.MaxConcurrentRequests")
    connections = _count(limits.get("MaxConnections"), f"{where}.Limits.MaxConnections")
    pending = _count(limits.get("MaxPendingRequests"), f"{where}.Limits.MaxPendingRequests")
    check = _obj(settings.get("PassiveHealthCheck"), f"{where}.PassiveHealthCheck")
    where = f"{where}.PassiveHealthCheck"
    failures = _count(check.get("MaxFailures"), f"{where}.MaxFailures")
    enforcing = _count(check.get("EnforcingConsecutive5xx"), f"{where}.EnforcingConsecutive5xx")
    percent = _count(check.get("MaxEjectionPercent"), f"{where}.MaxEjectionPercent")
    if percent is not None and percent > 100:
        raise ValueError(f"{where}.MaxEjectionPercent {percent} is above 100")
    if enforcing == 0:
        failures = sys.maxsize  # never enforced: no ejection
    return Upstream(
        consecutive_errors=failures or None,
        ejection_time=_duration(check.get("BaseEjectionTime"), f"{where}.BaseEjectionTime"),
        max_ejection=None if percent is None else percent / 100,
        max_concurrent=cap or None,  # Consul's 0 means "not set"
        max_connections=connections or None,
        max_pending=pending or None,
    )


def _duration(value: Any, where: str) -> float | None:
    # The config-entry API answers Go durations as nanoseconds; written entries may say "30s".
    if isinstance(value, int) and not isinstance(value, bool):
        return value / 1e9 if value > 0 else None
    return _seconds(value, where)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} {value!r} is not a whole number >= 0")
    return value
