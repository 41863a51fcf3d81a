"""Traffic management: routes, splits, subsets and failover, from Consul's config entries
or the local config file, compiled into one ``Chain`` per service (groundwork: the outbound
pipeline does not consult chains yet)."""

from __future__ import annotations

from ._chain import Chain, Decision, Target
from ._entries import compile_entries
from ._filter import compile_filter

__all__ = ["Chain", "Decision", "Target", "compile_entries", "compile_filter"]
