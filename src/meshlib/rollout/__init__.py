"""``meshlib rollout``: progressive delivery driven by Consul's own routing entries, or by the
same entries in the embedded default's local config file.

Modules, one concept each:

* ``_plane``: ``ControlPlane``, where the routing, state and lock live, and ``ConsulPlane``;
* ``_file``: ``FilePlane``, the local config file (``MESH_CONFIG_FILE``) as that place;
* ``_consul``: the Consul HTTP API, errors as one line (``RolloutError``);
* ``_consul_entries``: the resolver read, the splitter and router written (check-and-set);
* ``_state``: the rollout's record and its KV store (``meshlib/rollouts/<service>/state``);
* ``_lock``: one controller per service (a Consul session and a KV lock);
* ``_metrics``: ``MetricSource`` and the default ``PrometheusSource`` (a ``ScrapedSource``);
* ``_scrape``: ``AdminScrapeSource``, the instances' own ``/mesh/metrics`` without Prometheus;
* ``_controller``: the decisions, without I/O (begin, judge a check, operator commands);
* ``_view``: a rich panel on a terminal, plain lines in a pipe, JSON lines for machines;
* ``_run``: the controller loop and the commands, as the CLI calls them.
"""

from __future__ import annotations

from ._consul import ConsulAPI, ConsulUnavailable, MetricsUnavailable, RolloutError
from ._consul_entries import Match
from ._file import FilePlane
from ._metrics import MetricSource, PrometheusSource, ScrapedSource
from ._plane import ConsulPlane, ControlPlane
from ._run import Options, run_command, start, status
from ._scrape import AdminScrapeSource
from ._state import Measurement, RolloutState, Settings
from ._view import make_view

__all__ = [
    "AdminScrapeSource",
    "ConsulAPI",
    "ConsulPlane",
    "ConsulUnavailable",
    "ControlPlane",
    "FilePlane",
    "Match",
    "Measurement",
    "MetricSource",
    "MetricsUnavailable",
    "Options",
    "PrometheusSource",
    "RolloutError",
    "RolloutState",
    "ScrapedSource",
    "Settings",
    "make_view",
    "run_command",
    "start",
    "status",
]
