"""Traffic management: routes, splits, subsets and failover, from Consul's config entries
(its compiled discovery chain, ``CompiledChain`` in _consul.py) or the local config file
(``Chain``); ``Mesh.route`` asks the service's chain for a ``Decision`` per request."""

from __future__ import annotations

from ._chain import Chain, Decision, Target
from ._entries import compile_entries
from ._filter import compile_filter

__all__ = ["Chain", "Decision", "Target", "compile_entries", "compile_filter"]
