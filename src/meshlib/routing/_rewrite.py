"""A route's edits: ``PrefixRewrite``, ``RequestHeaders`` and ``ResponseHeaders``.

A ``service-router`` route's ``Destination`` may rewrite the path and edit headers, as
Envoy does for the route Consul generates:

- ``PrefixRewrite`` replaces the part of the path the route matched: its ``PathPrefix``
  (Envoy's ``prefix_rewrite``) or its whole ``PathExact``. Consul requires one of them.
- ``RequestHeaders`` / ``ResponseHeaders`` each have ``Add`` (a value appended to what is
  there, Envoy's ``append: true``), ``Set`` (the value replaces what is there) and
  ``Remove`` (names removed), applied in that order: Remove, then Set, then Add (Envoy
  removes first, then appends or overwrites).

Request edits are made as the request is routed, before the first attempt, so every
attempt sends the edited request; response edits are made on the response the caller gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["HeaderEdits", "RouteEdits", "parse_header_edits"]


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Consul's ``HTTPHeaderModifiers``."""

    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: httpx.Headers) -> None:
        """Edit ``headers`` in place: Remove, Set, then Add."""
        for name in self.remove:
            headers.pop(name, None)
        for name, value in self.set:
            headers[name] = value
        for name, value in self.add:
            if name in headers:  # one more value of the header, as Envoy appends
                headers[name] = f"{headers[name]},{value}"
            else:
                headers[name] = value


@dataclass(frozen=True, slots=True)
class RouteEdits:
    """What a route changes in the request and response."""

    #: the path the route matched (its prefix or exact path) and what replaces it
    rewrite: tuple[str, str] | None = None
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None

    def apply_request(self, request: httpx.Request) -> None:
        """Rewrite the path and edit the headers of ``request`` in place."""
        if self.rewrite is not None:
            matched, replacement = self.rewrite
            path = request.url.path
            if path.startswith(matched):
                new_path = replacement + path[len(matched) :]
                request.url = request.url.copy_with(path=new_path or "/")
        if self.request_headers is not None:
            self.request_headers.apply(request.headers)

    def apply_response(self, response: httpx.Response) -> None:
        """Edit the headers of ``response`` in place."""
        if self.response_headers is not None:
            self.response_headers.apply(response.headers)


def parse_header_edits(raw: Any, where: str) -> HeaderEdits | None:
    """A ``RequestHeaders`` / ``ResponseHeaders`` object (None when absent or empty)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} is not a JSON object")

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        table = raw.get(key) or {}
        if not isinstance(table, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in table.items()
        ):
            raise ValueError(f"{where}.{key} is not an object of header names to text")
        return tuple((k.lower(), v) for k, v in table.items())

    remove = raw.get("Remove") or []
    if not isinstance(remove, list) or not all(isinstance(n, str) and n for n in remove):
        raise ValueError(f"{where}.Remove is not a list of header names")
    edits = HeaderEdits(pairs("Add"), pairs("Set"), tuple(n.lower() for n in remove))
    return edits if edits != HeaderEdits() else None
