"""Sticky keys: the part of a request that pins one user to one split and one instance.

An operator names a request header or a cookie (``HashOn``). For ``ring_hash`` the key
picks an instance (``MESH_LB_HASH_ON``); for a splitter it picks the split
(``MESH_SPLIT_HASH_ON``): the key is hashed to a point in [0, 100) and the splits are laid
out on that line by weight, so one key always lands on one split while the population of
keys still follows the weights (a 20% split takes the keys whose point is below 20).

The hash is BLAKE2b, not Python's ``hash()`` (salted per process), so every process of
every service places a key at the same point: a user stays on one version however many
client processes its requests pass through. The point is salted with the split's service
name, so the keys of a 20% split of ``forecast`` are not the same users as those of a 20%
split of ``geo``.

Why not Consul's field: Consul has no splitter field for this. A ``service-resolver``'s
``LoadBalancer.HashPolicies`` become the Envoy *route*'s ``hash_policy``, which feeds only
the ring-hash/maglev load balancer of the cluster already chosen; Envoy picks among a
splitter's weighted clusters at random per request (its ``WeightedCluster.header_name``,
a numeric header, is not exposed by Consul). So a sticky split is a meshlib setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie

from .._config import HashOn

__all__ = ["key_point", "request_key"]


def request_key(hash_on: HashOn | None, headers: Mapping[str, str]) -> str | None:
    """The value of the header or cookie ``hash_on`` names (None: absent or unset)."""
    if hash_on is None:
        return None
    if hash_on.source == "header":
        return headers.get(hash_on.name)
    cookie_header = headers.get("cookie")
    if not cookie_header:
        return None
    try:
        morsel = SimpleCookie(cookie_header).get(hash_on.name)
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def key_point(salt: str, key: str) -> float:
    """``key``'s point in [0, 100), the same in every process."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100
