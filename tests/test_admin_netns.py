"""The admin listener from a non-loopback source, in a network namespace of the test's own.

``/mesh/status`` answers loopback peers only, decided from the TCP peer address. This test
makes a real remote-looking peer without touching the machine's network: ``unshare --net``
gives a private namespace whose ``lo`` gets two aliases, 10.253.0.1 (the admin listener of a
real ``meshlib serve``) and 10.253.0.2 (the caller's source address). Forwarded headers and
``Host`` tricks from 10.253.0.2 must never open the route; a 127.0.0.1 source must.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from served import APPS

PROBE = Path(__file__).with_name("admin_netns_probe.py")


def _namespace_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (unshare --net)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.mark.skipif(_namespace_possible() is not None, reason=str(_namespace_possible()))
@pytest.mark.parametrize("target", ["fastapi_app:app", "flask_app:app"])
def test_forged_headers_never_open_admin_routes_to_a_remote_source(target: str) -> None:
    script = (
        "ip link set lo up && ip addr add 10.253.0.1/32 dev lo && "
        'ip addr add 10.253.0.2/32 dev lo && exec "$0" "$@"'
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, sys.executable, str(PROBE), target],
        cwd=APPS,
        env={**os.environ, "PYTHONPATH": str(APPS)},
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    results = json.loads(done.stdout)
    assert results.pop("loopback-source") == 200  # the control: a loopback peer is let in
    assert results == {
        "remote-plain": 403,
        "remote-x-forwarded-for": 403,
        "remote-forwarded": 403,
        "remote-host-localhost": 403,
        "remote-host-loopback": 403,
        "remote-all": 403,
    }
