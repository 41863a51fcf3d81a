"""A Connect leaf that expires while Consul cannot renew it: one clear error, no silence.

Consul's agent renews a service's leaf from half its life on, and meshlib's watch brings
the new one; while Consul is down the leaf in hand goes on serving. Consul will not issue a
leaf shorter than an hour (``LeafCertTTL``), so the expiry itself is a case a real agent
cannot produce in a test: these tests serve the leaf from the fake agent of
test_discovery_consul (a real certificate, with ``ValidBefore`` seconds away).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from certs import odd_leaf, self_signed_ca
from meshlib._config import ConsulSettings
from meshlib.security._consul_ca import ConsulSource
from polling import wait_until
from test_discovery_consul import FakeConsul

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
URI = f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/web"
LEAF = "/v1/agent/connect/ca/leaf/web"


@pytest.fixture
def agent() -> Iterator[FakeConsul]:
    fake = FakeConsul()
    ca, key, ca_pem = self_signed_ca("consul test CA")
    fake.set_json(
        "/v1/agent/connect/ca/roots",
        {"TrustDomain": TRUST_DOMAIN, "Roots": [{"RootCert": ca_pem}]},
        index=5,
    )
    fake.leaf = lambda serial, seconds: leaf(ca, key, serial, seconds)  # type: ignore[attr-defined]
    yield fake
    fake.close()


def leaf(ca: Any, key: Any, serial: str, seconds: float) -> dict[str, Any]:
    cert_pem, key_pem = odd_leaf(ca, key, [URI])
    valid_before = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return {
        "CertPEM": cert_pem.decode(),
        "PrivateKeyPEM": key_pem.decode(),
        "ServiceURI": URI,
        "SerialNumber": serial,
        "ValidBefore": valid_before.isoformat().replace("+00:00", "Z"),
    }


def expired(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "expired at" in r.getMessage()]


def test_a_leaf_that_expires_with_consul_down_is_one_clear_error(
    agent: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib")
    agent.set_json(LEAF, agent.leaf("01", 1.5), index=6)  # type: ignore[attr-defined]
    source = ConsulSource(ConsulSettings(agent.url), "web", first_timeout=5)
    try:
        agent.close()  # Consul goes away before the renewal
        lines = wait_until(lambda: expired(caplog), timeout=10, what="the expiry said")
        assert len(lines) == 1
        assert lines[0].startswith(f"the mesh certificate of {URI} expired at ")
        assert f"Consul at {agent.url} has not renewed it" in lines[0]
        assert source.current().not_after < dt.datetime.now(dt.UTC)  # the metric reads this
    finally:
        source.close()


def test_a_leaf_renewed_in_time_says_nothing(
    agent: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib")
    agent.set_json(LEAF, agent.leaf("01", 1.5), index=6)  # type: ignore[attr-defined]
    source = ConsulSource(ConsulSettings(agent.url), "web", first_timeout=5)
    try:
        first = source.current()
        agent.set_json(LEAF, agent.leaf("02", 3600), index=7)  # type: ignore[attr-defined]
        wait_until(lambda: source.current() is not first, what="the renewed leaf")
        wait_until(lambda: dt.datetime.now(dt.UTC) > first.not_after + dt.timedelta(seconds=1))
        assert expired(caplog) == []
    finally:
        source.close()
