"""A ``service-resolver``'s ``LoadBalancer``: the policy and hash policies of its targets.

Consul puts the resolver's ``LoadBalancer`` on the resolver node of the compiled chain;
Envoy makes ``Policy`` the cluster's ``lb_policy`` and ``HashPolicies`` the route's
``hash_policy``. meshlib applies them to the instances of the resolver's targets, over
``MESH_LB`` / ``MESH_LB_HASH_ON``:

=====================  ==============================================================
``Policy``             ``round_robin``, ``least_request``, ``random`` as named;
                       ``ring_hash`` and ``maglev`` both become meshlib's consistent
                       hash ring (balance/_ring_hash.py; maglev's table is another way
                       to the same property: a key keeps its instance, and removing
                       one of N instances moves about 1/N of the keys); ``""`` keeps
                       meshlib's own
``HashPolicies``       in order, each ``Field`` (``header``, ``cookie``,
                       ``query_parameter``) with its ``FieldValue``, or ``SourceIP``;
                       the values found make the key (Envoy combines their hashes),
                       and a ``Terminal`` policy that found a value ends the list
``RingHashConfig``,    ignored: the ring's size is meshlib's (160 nodes per unit of
``LeastRequestConfig`` weight); least_request always compares two (P2C)
=====================  ==============================================================

``SourceIP``: in a sidecar mesh the source is the local application's address, the same
for every request of one host; in process, it is this host's name, so every request from
one host keeps to one instance, as behind Envoy. A request none of the policies finds a
value in has no key, and is balanced at random (Envoy does the same).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Literal

__all__ = ["HashPolicy", "LoadBalancer", "parse_load_balancer"]

#: Consul's policy -> meshlib's balancer
_POLICIES: Mapping[str, str] = {
    "round_robin": "round_robin",
    "least_request": "least_request",
    "random": "random",
    "ring_hash": "ring_hash",
    "maglev": "ring_hash",
}

_FIELDS = ("header", "cookie", "query_parameter")


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One of Consul's ``HashPolicies``."""

    field: Literal["header", "cookie", "query_parameter", "source_ip"]
    name: str = ""
    terminal: bool = False

    def value(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """This policy's part of the key, or None when the request has none."""
        if self.field == "header":
            return headers.get(self.name)
        if self.field == "query_parameter":
            return query.get(self.name)
        if self.field == "source_ip":
            return socket.gethostname()
        cookie_header = headers.get("cookie")
        if not cookie_header:
            return None
        try:
            morsel = SimpleCookie(cookie_header).get(self.name)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """How the instances of a resolver's targets are balanced."""

    #: a meshlib ``MESH_LB`` policy, or "" to keep meshlib's own
    policy: str = ""
    hash_policies: tuple[HashPolicy, ...] = ()

    def key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The hash key of a request (None: no policy found a value)."""
        parts: list[str] = []
        for policy in self.hash_policies:
            value = policy.value(headers, query)
            if value is None:
                continue
            parts.append(f"{policy.field}:{policy.name}={value}")
            if policy.terminal:
                break
        return "\x1f".join(parts) if parts else None


def parse_load_balancer(raw: Any, where: str) -> LoadBalancer | None:
    """A resolver's ``LoadBalancer`` (None when absent); ``ValueError`` naming the field."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} is not a JSON object")
    policy = raw.get("Policy") or ""
    if policy not in ("", *_POLICIES):
        raise ValueError(f"{where}.Policy {policy!r} is not one of {', '.join(_POLICIES)}")
    policies: list[HashPolicy] = []
    raw_policies = raw.get("HashPolicies") or []
    if not isinstance(raw_policies, list):
        raise ValueError(f"{where}.HashPolicies is not a list")
    for i, item in enumerate(raw_policies):
        at = f"{where}.HashPolicies[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{at} is not a JSON object")
        terminal = bool(item.get("Terminal"))
        if item.get("SourceIP"):
            policies.append(HashPolicy("source_ip", "", terminal))
            continue
        field, value = item.get("Field"), item.get("FieldValue")
        if field not in _FIELDS or not isinstance(value, str) or not value:
            raise ValueError(f"{at}: Field must be one of {', '.join(_FIELDS)} with a FieldValue")
        name = value.lower() if field == "header" else value
        policies.append(HashPolicy(field, name, terminal))
    if not policy and not policies:
        return None
    return LoadBalancer(_POLICIES.get(policy, ""), tuple(policies))
