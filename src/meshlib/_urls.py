"""Pointing a request's URL at one endpoint, cheaply.

Each attempt sends the caller's URL to a different ``host:port``. ``URL.copy_with`` does
that by re-parsing and re-validating every component (an IP host goes through
``ipaddress`` each time): measured at ~100 µs of the mesh's per-request cost under load, more
than all its policies together. The URL was already parsed and validated when the caller
built the request, and the endpoint's host and port came from validated discovery data, so
only those two components need replacing: that is ``_replace`` on the parsed components.

That touches httpx's private ``URL._uri_reference``. If a future httpx (or the httpx2 fork)
lays URLs out differently, ``with_endpoint`` falls back to ``copy_with``;
tests/test_urls.py proves both give the same URL.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["with_endpoint"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _fast(url: httpx.URL, host: str, port: int, scheme: str | None = None) -> httpx.URL:
    parsed: Any = url._uri_reference
    scheme = scheme or parsed.scheme
    port_value = None if port == _DEFAULT_PORTS.get(scheme) else port
    new = httpx.URL.__new__(httpx.URL)
    new._uri_reference = parsed._replace(scheme=scheme, host=host.lower(), port=port_value)
    return new


def _slow(url: httpx.URL, host: str, port: int, scheme: str | None = None) -> httpx.URL:
    return url.copy_with(scheme=scheme or url.scheme, host=host, port=port)


def _works() -> bool:
    try:
        probe = httpx.URL("http://service/p?q=1")
        return _fast(probe, "127.0.0.1", 8001) == _slow(probe, "127.0.0.1", 8001)
    except Exception:  # pragma: no cover - a different httpx URL layout
        return False


#: ``with_endpoint(url, host, port, scheme=None)``: ``url`` pointed at one endpoint (and,
#: for mesh TLS, switched to ``https``).
with_endpoint = _fast if _works() else _slow
