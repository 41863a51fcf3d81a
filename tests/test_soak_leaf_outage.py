"""Soak (``nox -s soak``, about an hour): a Connect leaf across a real Consul outage.

Consul issues no leaf shorter than an hour (``LeafCertTTL``; it refuses "30s" with "leaf
cert TTL must be greater or equal than 1h0m0s"), and its agent renews a leaf between 60%
and 90% of its life. So the case issue 16 asks for, Consul down from before the renewal
point to after it but back before the expiry, takes a real agent the better part of an
hour: it lives here, out of the default run. test_leaf_expiry.py covers the expiry itself
with a fake agent in seconds.

A single Consul server with its data on disk (so its CA and the registration survive the
restart, as a production agent's do), ``LeafCertTTL = "1h"``, a strict-mTLS ``meshlib
serve`` app and this process as a strict-mTLS client, both on Connect's CA. Consul is
stopped a minute in and started again once the leaves are past 90% of their life; a new
client (a new handshake, both leaves checked) calls every 30 s meanwhile. Then both sides
must hold renewed leaves, and calls go on.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

import meshlib
from consul_agent import unique
from consul_cluster import ClusterAgent
from polling import wait_until
from served import ServedFactory
from test_security_consul import as_client, mesh_env

#: between two calls while Consul is down (the soak's subject is time passing)
PACE = 30.0


class SoloServer(ClusterAgent):
    """One Consul server that is its own cluster, its state in its data directory."""

    def _argv(self) -> list[str]:
        return [a if a != "-bootstrap-expect=3" else "-bootstrap-expect=1" for a in super()._argv()]


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _server_leaf_expiry(served: object) -> float:
    """The served app's leaf expiry, from its admin listener's gauge (seconds left)."""
    text = httpx.get(f"{served.admin_url}/mesh/metrics", timeout=5).text  # type: ignore[attr-defined]
    for line in text.splitlines():
        if line.startswith("meshlib_certificate_expiry_seconds{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no certificate expiry gauge in:\n{text}")


def _ca_configured(agent: ClusterAgent) -> Callable[[], bool]:
    """A probe that sets the 1 h leaf TTL: a server that has just become leader answers 500
    until its CA is initialized (seen once in a few starts)."""

    def attempt() -> bool:
        try:
            agent.put(
                "/v1/connect/ca/configuration",
                {"Provider": "consul", "Config": {"LeafCertTTL": "1h"}},
            )
        except OSError:  # urllib's HTTPError too
            return False
        return True

    return attempt


@pytest.mark.soak
def test_consul_down_past_the_leaf_renewal_point_loses_no_mtls_call_and_renews_when_back(
    serve: ServedFactory,
    consul_bin: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = SoloServer(consul_bin, tmp_path, f"solo-{time.monotonic_ns()}", server=True)
    agent.start()
    try:
        wait_until(lambda: agent.get("/v1/status/leader", timeout=1.0), timeout=60, what="leader")
        wait_until(_ca_configured(agent), timeout=60, what="Connect's CA to take LeafCertTTL")
        hello = unique("hello")
        served = serve("fastapi_app:app", mesh_env(agent, hello, MESH_INTENTIONS_CACHE="10s"))
        wait_until(
            lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), timeout=60, what="hello"
        )
        as_client(monkeypatch, agent, "gateway")
        failures: list[str] = []
        calls = 0

        def call() -> None:
            nonlocal calls
            calls += 1
            try:
                with meshlib.Client() as client:  # a new client: new handshakes
                    status = client.get(f"http://{hello}/hello").status_code
                if status != 200:
                    failures.append(f"HTTP {status}")
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

        with meshlib.Client() as probe:
            assert probe.get(f"http://{hello}/hello").status_code == 200
            security = probe._transport.mesh.security  # type: ignore[attr-defined]
            before = security.tls.material
            leaf = _leaf(before.cert_pem)
            life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
            assert dt.timedelta(minutes=55) <= life <= dt.timedelta(minutes=65), life
            server_left = _server_leaf_expiry(served)

            agent.stop()
            stopped = time.time()
            # past 90% of the leaf's life, with a minute to spare, well before its end
            back_at = (leaf.not_valid_before_utc + life * 0.9).timestamp() + 60
            assert back_at < leaf.not_valid_after_utc.timestamp() - 120
            pause = threading.Event()
            while time.time() < back_at:
                call()
                pause.wait(min(PACE, max(back_at - time.time(), 0)))
            down_calls, down_failures = calls, list(failures)
            agent.start()
            restarted = time.time()
            wait_until(
                lambda: agent.get("/v1/status/leader", timeout=1.0), timeout=60, what="leader"
            )
            renewed = wait_until(
                lambda: security.tls.material.cert_pem != before.cert_pem and security.tls.material,
                timeout=180,
                what="this process's renewed leaf",
            )
            wait_until(
                lambda: _server_leaf_expiry(served) > server_left,
                timeout=180,
                what="the server's renewed leaf",
            )
            renewed_at = time.time()
            for _ in range(5):
                call()
        new_leaf = _leaf(renewed.cert_pem)
        born = leaf.not_valid_before_utc.timestamp()
        print(
            f"\nConsul down {restarted - stopped:.0f} s, from {stopped - born:.0f} s into a "
            f"{life.total_seconds():.0f} s leaf to {restarted - born:.0f} s; {down_calls} calls "
            f"while down, {len(down_failures)} failed; renewed {renewed_at - restarted:.1f} s "
            f"after Consul came back, new leaf until {new_leaf.not_valid_after_utc:%H:%M:%S}; "
            f"{calls} calls in all, {len(failures)} failed"
        )
        assert down_calls >= 90  # about every 30 s for some 50 minutes
        assert failures == []
        assert new_leaf.not_valid_after_utc > leaf.not_valid_after_utc
    finally:
        agent.stop()
