"""The control plane's client: the one place meshlib speaks Consul's HTTP API from.

``client_options`` turns ``ConsulSettings`` (address, token, TLS files, server name) into
the options of an ``httpx`` client once, for every Consul-speaking feature. ``Engine`` is
the watcher: one thread, one event loop, every blocking query of the process on it, the
blocking-query etiquette in one place, and the "no blind spot" rule: when one watch sees
Consul restart (its index goes backwards, or an outage ends), every other watch re-asks
from index 0. ``Engine.shared(settings)`` is the one engine per process and address.
"""

from __future__ import annotations

from ._engine import BadAnswer, Engine, reason
from ._http import client_options, request_extensions, ssl_context

__all__ = [
    "BadAnswer",
    "Engine",
    "client_options",
    "reason",
    "request_extensions",
    "ssl_context",
]
