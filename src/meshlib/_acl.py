"""Consul's ACL refusals as one line that names the missing permission.

With ACLs on, Consul answers a request its token may not make with ``403`` and a body that
already says what is missing: ``Permission denied: token with AccessorID '…' lacks
permission 'key:read' on "meshlib/faults/web"`` (or ``ACL not found`` for a token it does
not know). Every place that speaks to Consul turns such an answer into one log line or error
with that text, said once rather than per retry, and never as "Consul unreachable": a
refusal is the token's policy, which only the operator can change (docs/security.md gives
the least-privilege policies). The body names the token by its accessor ID, never by its
secret; and reads that Consul filters instead of refusing (the health and catalog lists
answer ``X-Consul-Results-Filtered-By-ACLs: true``) are reported where the missing entry
is noticed.
"""

from __future__ import annotations

from ._logsafe import escaped

__all__ = ["FILTERED_HEADER", "Refused", "refusal"]

#: Consul's header on a list answer from which the token's ACLs removed entries.
FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"

_LONGEST = 300


class Refused(Exception):
    """Consul's ACLs refused a request; the message is ``refusal``'s one line."""


def refusal(status: int, body: str) -> str | None:
    """The one line for Consul's answer ``status``/``body``, or None when it is no refusal."""
    if status != 403:
        return None
    text = escaped(" ".join(body.split()))[:_LONGEST] or "403 Forbidden"
    if "ACL not found" in text:
        return f"Consul does not know the token in CONSUL_HTTP_TOKEN ({text})"
    return f"Consul's ACLs refused the token in CONSUL_HTTP_TOKEN: {text}"
