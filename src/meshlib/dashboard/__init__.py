"""``meshlib dashboard``: the mesh as a live web page, served by the library itself.

The page shows the service graph (services as nodes, calls as edges with request rate,
error rate and p99; a failing edge drawn red and thick), each service's instances as their
callers' balancers see them (health, ejection, in-flight requests, latency estimate,
breaker), its TLS mode and certificate expiry, and the rollouts in progress. It refreshes
itself every few seconds from ``/api/mesh``, a JSON view anything else can read too.

Modules, one concept each:

* ``_targets``: where the admin listeners are (a static list, Consul, Prometheus);
* ``_edges``: edges from two scrapes (rates and p99 without Prometheus), parsed by
  ``telemetry._exposition``;
* ``_collector``: one poll of the mesh, assembled into the JSON view;
* ``_server``: the HTTP server and the poller; ``assets/``: the page, hand-written.
"""

from __future__ import annotations

from ._collector import Collector
from ._server import DashboardServer
from ._targets import TargetSource, consul_targets, prometheus_targets, static_targets

__all__ = [
    "Collector",
    "DashboardServer",
    "TargetSource",
    "consul_targets",
    "prometheus_targets",
    "static_targets",
]
