"""This process as a server of the mesh: its lifecycle and its registration in Consul.

An ``Instance`` is owned by the process's ``Mesh`` (``mesh.instance``), which every
middleware and ``meshlib serve`` built from one configuration share.
"""

from __future__ import annotations

from ._instance import Instance, share_drain_with_workers
from ._registration import Registration

__all__ = ["Instance", "Registration", "share_drain_with_workers"]
