"""Row 3: meshlib strict mTLS against a sidecar pair (HAProxy -> mTLS -> HAProxy).

Not measurable yet: meshlib's own mTLS (``MESH_TLS=strict``) arrives with issue 5. Until it
does, this row says so in the table instead of printing a figure.
"""

from __future__ import annotations

from typing import Any

from harness import Line

NOT_YET = "not yet measurable: needs MESH_TLS=strict (issue 5)"


def mtls_vs_sidecar(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 3: the placeholder line."""
    return [Line("3", "strict mTLS: p50 meshlib/sidecar pair", NOT_YET, "≤ 0.8x", None)], {
        "row3_mtls_vs_sidecar": NOT_YET
    }
