"""The admin listener from a remote peer: forwarded headers never make it look local.

The admin listener is opened to the network here (``MESH_ADMIN_ADDR=0.0.0.0:<port>``, as for a
Prometheus scrape) and asked from the machine's own non-loopback address, so the server sees
a real remote peer on a real socket, with every header trick that claims loopback.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from backends import free_port
from served import ServedFactory

TARGETS = ["fastapi_app:app", "flask_app:app"]  # uvicorn and gunicorn

FORGED = {
    "x-forwarded-for": "127.0.0.1",
    "x-real-ip": "127.0.0.1",
    "forwarded": "for=127.0.0.1;host=localhost;proto=http",
    "x-forwarded-host": "localhost",
    "x-client-ip": "::1",
    "host": "localhost",
}


def own_address() -> str | None:
    """An address of this machine that is not loopback, if there is one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize("target", TARGETS)
def test_forwarded_headers_never_open_status_to_a_remote_peer_on_the_admin_listener(
    serve: ServedFactory, target: str
) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    admin = f"0.0.0.0:{free_port()}"
    served = serve(target, {"MESH_SERVICE_NAME": "hello", "MESH_ADMIN_ADDR": admin})
    remote = httpx.HTTPTransport(local_address=address)
    url = f"http://{address}:{served.admin_port}"
    with httpx.Client(transport=remote, timeout=10) as client:
        assert client.get(f"{url}/mesh/status").status_code == 403
        for name, value in FORGED.items():
            answer = client.get(f"{url}/mesh/status", headers={name: value})
            assert answer.status_code == 403, (name, value)
        answer = client.get(f"{url}/mesh/status", headers=FORGED)
        assert answer.status_code == 403
        assert "services" not in answer.text
        # a URL that names loopback in its authority changes nothing either
        answer = client.get(f"{url}/mesh/status", headers={"host": "127.0.0.1"})
        assert answer.status_code == 403
    # The same listener still answers a loopback peer.
    local = httpx.get(f"http://127.0.0.1:{served.admin_port}/mesh/status", timeout=10)
    assert local.status_code == 200
