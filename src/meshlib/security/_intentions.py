"""Consul intentions as an authorizer.

L4: ``POST /v1/agent/connect/authorize`` (Consul registers it as POST only, so py-consul's
PUT cannot be used; plain httpx instead) answers for one caller and destination; answers are
cached for ``MESH_INTENTIONS_CACHE`` per caller. When the answer is "Matched L7 intention",
the intention's HTTP permissions decide per request: they come from
``/v1/connect/intentions/match`` (cached likewise) and are evaluated in order, first match
wins, no match denies -- as Envoy does for a Consul service with L7 intentions.

A caller without a client certificate (plaintext, permissive mode) is judged like the ``*``
source: Consul is asked about a source no intention can name (``UNIDENTIFIED``, a name no
service can have), so a ``*`` intention, or else Consul's default intention policy (deny
when ACLs default to deny), decides -- L7 permissions of ``*`` included. An identified
caller that no intention names is judged the same way, so having no certificate never
earns more than having one. ``MESH_UNIDENTIFIED_CALLERS=allow`` restores the old rule
(unidentified callers pass unchecked) and is warned about at start.

When Consul cannot be asked, the last answer for that caller is used, however old; with no
answer at all the request is denied (fail closed).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx

from .._acl import refusal
from .._config import ConsulSettings
from ..consul import client_options, request_extensions
from ._authz import Authorizer, Decision
from ._spiffe import SpiffeId

__all__ = ["UNIDENTIFIED", "ChainAuthorizer", "ConsulAuthorizer"]

logger = logging.getLogger("meshlib.authz")

#: The source name an unidentified caller is asked about: ``~`` is in no service name
#: (Consul's or a SPIFFE ID meshlib accepts), so only ``*`` intentions can match it.
UNIDENTIFIED = "~unidentified"


class ConsulAuthorizer:
    """Asks Consul whether a caller may call ``service``."""

    def __init__(
        self,
        settings: ConsulSettings,
        service: str,
        ttl: float,
        *,
        trust_domain: str,
        datacenter: str = "dc1",
        allow_unidentified: bool = False,
    ) -> None:
        self.service = service
        self.ttl = ttl
        self.allow_unidentified = allow_unidentified
        #: whom Consul is asked about for a caller without a certificate
        self.unidentified = SpiffeId(trust_domain, UNIDENTIFIED, datacenter)
        self._extensions = request_extensions(settings)
        self._client = httpx.Client(**client_options(settings, timeout=httpx.Timeout(2.0)))
        self._l4: dict[str, tuple[float, bool, str]] = {}
        self._l7: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()
        self._refusals_said: set[str] = set()

    def decide(
        self, caller: SpiffeId | None, method: str, path: str, headers: dict[str, str]
    ) -> Decision:
        """Consul's verdict for ``caller`` (its L7 permissions for this request if any)."""
        if caller is None:
            if self.allow_unidentified:
                return Decision(True, "unidentified caller allowed (MESH_UNIDENTIFIED_CALLERS)")
            caller = self.unidentified
        authorized, reason = self._authorize(str(caller))
        if authorized:
            return Decision(True, reason)
        if "L7 intention" not in reason:
            return Decision(False, reason)
        for permission in self._permissions(caller.service):
            if _matches(permission.get("HTTP") or {}, method, path, headers):
                action = str(permission.get("Action", "deny"))
                return Decision(action == "allow", f"L7 permission: {action} ({reason})")
        return Decision(False, f"no L7 permission matches {method} {path} ({reason})")

    def _authorize(self, uri: str) -> tuple[bool, str]:
        now = time.monotonic()
        cached = self._l4.get(uri)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1], cached[2]
        try:
            response = self._client.post(
                "/v1/agent/connect/authorize",
                json={"Target": self.service, "ClientCertURI": uri},
                extensions=self._extensions,
            )
            refused = refusal(response.status_code, response.text)
            if refused is not None:
                self._say_refused("authorize callers", refused)
                # the reason reaches the caller (403 detail): the server's log has the rest
                return (
                    False,
                    "Consul refused to authorize (this service's token lacks a permission)",
                )
            response.raise_for_status()
            body = response.json()
            answer = (bool(body["Authorized"]), str(body.get("Reason", "")))
        except Exception as exc:
            if cached is not None:
                logger.warning("Consul could not authorize (%s); using its last answer", exc)
                return cached[1], cached[2]
            return False, f"Consul could not be asked ({type(exc).__name__}); denied"
        with self._lock:
            self._l4[uri] = (now, *answer)
        return answer

    def _permissions(self, source: str) -> list[dict[str, Any]]:
        now = time.monotonic()
        cached = self._l7
        if cached is None or now - cached[0] >= self.ttl:
            try:
                response = self._client.get(
                    "/v1/connect/intentions/match",
                    params={"by": "destination", "name": self.service},
                    extensions=self._extensions,
                )
                refused = refusal(response.status_code, response.text)
                if refused is not None and cached is None:
                    self._say_refused("read L7 intentions", refused)
                    return []  # no permission is known to allow: the request is denied
                response.raise_for_status()
                intentions = response.json().get(self.service) or []
                cached = (now, list(intentions))
                self._l7 = cached
            except Exception as exc:
                if cached is None:
                    logger.warning("could not read L7 intentions from Consul: %s", exc)
                    return []
        for intention in cached[1]:  # sorted by precedence, most specific first
            if intention.get("SourceName") in (source, "*"):
                return list(intention.get("Permissions") or [])
        return []

    def _say_refused(self, what: str, line: str) -> None:
        """Log an ACL refusal once per distinct text (it recurs per request until fixed)."""
        if line not in self._refusals_said:
            self._refusals_said.add(line)
            logger.error("cannot %s for %s: %s", what, self.service, line)

    def close(self) -> None:
        """Release the HTTP client."""
        self._client.close()


def _matches(rule: Mapping[str, Any], method: str, path: str, headers: dict[str, str]) -> bool:
    if "PathExact" in rule and path != rule["PathExact"]:
        return False
    if "PathPrefix" in rule and not path.startswith(str(rule["PathPrefix"])):
        return False
    if "PathRegex" in rule and not re.fullmatch(str(rule["PathRegex"]), path):
        return False
    methods = rule.get("Methods")
    if methods and method.upper() not in {str(m).upper() for m in methods}:
        return False
    for header in rule.get("Header") or ():
        value = headers.get(str(header.get("Name", "")).lower())
        if header.get("Present"):
            ok = value is not None
        elif "Exact" in header:
            ok = value == header["Exact"]
        elif "Prefix" in header:
            ok = value is not None and value.startswith(str(header["Prefix"]))
        elif "Suffix" in header:
            ok = value is not None and value.endswith(str(header["Suffix"]))
        elif "Regex" in header:
            ok = value is not None and re.fullmatch(str(header["Regex"]), value) is not None
        else:
            ok = value is not None
        if bool(header.get("Invert")) == ok:
            return False
    return True


class ChainAuthorizer:
    """Every authorizer must allow; the first refusal is the answer."""

    def __init__(self, *authorizers: Authorizer) -> None:
        self.authorizers = authorizers

    def decide(
        self, caller: SpiffeId | None, method: str, path: str, headers: dict[str, str]
    ) -> Decision:
        """The first refusal, or the last approval."""
        decision = Decision(True, "no authorizer")
        for authorizer in self.authorizers:
            decision = authorizer.decide(caller, method, path, headers)
            if not decision.allowed:
                return decision
        return decision
