"""The demo's canary with Consul: forecast's subsets and split as Consul config entries.

The same three entries an operator would write (and `meshlib rollout` steps): a
``service-defaults`` saying forecast speaks HTTP (Consul refuses a splitter otherwise), a
``service-resolver`` with subsets v1 and v2 (v1 the default, so the canary gets nothing
until the split says so), and a ``service-splitter``. The gateway follows them through
Consul's discovery chain, as an Envoy sidecar would.

The demo borrows the agent at ``CONSUL_HTTP_ADDR``, so it writes only entries that are not
there yet and deletes exactly those when it stops: an operator's own entries for a service
called ``forecast`` are left alone (and the canary step is skipped, saying why).
"""

from __future__ import annotations

from typing import Any

from .._config import ConsulSettings
from ..rollout._consul import ConsulAPI
from ..rollout._consul_entries import write_split

__all__ = ["ConsulSplit"]

SERVICE = "forecast"
_DEMO = {"created-by": "meshlib-demo"}


class ConsulSplit:
    """forecast's v1/v2 routing in Consul, for the length of the demo."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.api = ConsulAPI(settings)
        #: the kinds of forecast's entries this demo wrote, to delete on close
        self.created: list[str] = []
        #: why the canary cannot run here ("" when it can)
        self.refusal = ""

    def prepare(self) -> None:
        """Write service-defaults and the resolver, unless the operator has their own."""
        entries: list[dict[str, Any]] = [
            {"Kind": "service-defaults", "Name": SERVICE, "Protocol": "http", "Meta": _DEMO},
            {
                "Kind": "service-resolver",
                "Name": SERVICE,
                "DefaultSubset": "v1",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2"},
                },
                "Meta": _DEMO,
            },
        ]
        for entry in entries:
            kind = entry["Kind"]
            found, _ = self.api.call("GET", f"/v1/config/{kind}/{SERVICE}", missing_ok=True)
            if found is not None and (found.get("Meta") or {}) != _DEMO:
                self.refusal = f"Consul already has a {kind} for {SERVICE}; leaving it alone"
                return
            self.api.call("PUT", "/v1/config", body=entry)  # new, or a crashed demo's
            self.created.append(kind)

    def split(self, v1: int, v2: int) -> None:
        """Send ``v2`` percent of forecast to the canary (a service-splitter)."""
        write_split(self.api, SERVICE, "v1", "v2", v2)
        if "service-splitter" not in self.created:
            self.created.append("service-splitter")

    def close(self) -> None:
        """Delete what the demo wrote (the splitter first: it names the resolver's subsets)."""
        try:
            for kind in ("service-splitter", "service-resolver", "service-defaults"):
                if kind in self.created:
                    self.api.call("DELETE", f"/v1/config/{kind}/{SERVICE}")
        finally:
            self.api.close()
