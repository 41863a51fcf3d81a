"""Zero trust with the local CA: mTLS both ways, identities, rejections, rotation, egress.

Every rejection is made by a real TLS handshake or a real server, and the test then asks
the server (over a legitimate mTLS connection) how many requests its handler ran.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import meshlib
from backends import BackendFactory
from certs import context_for, odd_leaf, self_signed_ca
from meshlib.security import LocalCA, SpiffeId
from meshlib.security._local_ca import issue_leaf
from polling import wait_until
from served import LOOPS, ON_EACH_LOOP, Served, ServedFactory

TARGETS = ["fastapi_app:app", "flask_app:app"]
TRUST_DOMAIN = "meshlib.test"


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    LocalCA(directory).init(TRUST_DOMAIN)
    return directory


def server_env(
    ca_dir: Path, name: str = "hello", mode: str = "strict", **extra: str
) -> dict[str, str]:
    return {
        "MESH_TLS": mode,
        "MESH_TLS_CA": "local",
        "MESH_TLS_DIR": str(ca_dir),
        "MESH_SERVICE_NAME": name,
        **extra,
    }


def as_client(
    monkeypatch: pytest.MonkeyPatch, ca_dir: Path, name: str, services: str, mode: str = "strict"
) -> None:
    monkeypatch.setenv("MESH_TLS", mode)
    monkeypatch.setenv("MESH_TLS_CA", "local")
    monkeypatch.setenv("MESH_TLS_DIR", str(ca_dir))
    monkeypatch.setenv("MESH_SERVICE_NAME", name)
    monkeypatch.setenv("MESH_STATIC_SERVICES", services)
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "10ms")


def handled(served: Served, ca_dir: Path, service: str = "hello") -> int:
    """How many requests the server's handlers ran, asked over a legitimate mTLS call."""
    ctx = client_context(ca_dir, "auditor")
    with httpx.Client(verify=ctx) as client:
        return int(client.get(f"https://127.0.0.1:{served.port}/handled").json()["count"])


def client_context(
    ca_dir: Path,
    name: str,
    *,
    sign_with: Path | None = None,
    expired: bool = False,
) -> ssl.SSLContext:
    """An SSL context presenting a leaf for ``name`` (signed by ``sign_with``'s CA)."""
    trust = LocalCA(ca_dir)
    signer_ca = LocalCA(sign_with or ca_dir)
    signer, key, _ = signer_ca.signer()
    identity = SpiffeId(trust.load_info().trust_domain, name)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2) if expired else None
    cert_pem, key_pem, _ = issue_leaf(
        signer, key, identity, dt.timedelta(hours=1), not_before=start
    )
    return context_for(cert_pem, key_pem, (ca_dir / "roots.pem").read_text())


# ----------------------------------------------------------------------------- both directions


@ON_EACH_LOOP
def test_mesh_calls_go_over_mtls_and_the_app_sees_the_verified_caller(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client:
        response = client.get("http://hello/peer", headers={"x-meshlib-peer": "forged"})
    assert response.status_code == 200
    assert response.json()["peer"] == f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/gateway"
    assert response.request.url == "http://hello/peer"  # the caller's URL is untouched


@ON_EACH_LOOP
def test_a_plaintext_client_is_refused_by_a_strict_server_before_the_handler(
    serve: ServedFactory, ca_dir: Path, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    response = httpx.get(f"{served.url}/hello", timeout=5)  # curl or a plain client: it says why
    assert response.status_code == 400
    assert response.headers["x-mesh-tls-required"] == "strict"
    assert "requires mutual TLS (MESH_TLS=strict)" in response.text
    assert handled(served, ca_dir) == 0


@pytest.mark.parametrize("target", TARGETS)
def test_plaintext_probes_at_a_strict_port_log_one_line_with_the_peer_and_no_traceback(
    serve: ServedFactory, ca_dir: Path, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    for _ in range(10):  # a TCP check: connect, say nothing, hang up
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as probe:
            probe.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            probe.recv(4096)
        assert httpx.get(f"{served.url}/health", timeout=5).status_code == 400
    assert handled(served, ca_dir) == 0  # an mTLS request: every refusal is behind it
    output = served.output.decode(errors="replace")
    refusals = [line for line in output.splitlines() if "refused a connection" in line]
    assert len(refusals) == 1, output
    assert "127.0.0.1" in refusals[0]
    assert "plaintext at a MESH_TLS=strict port" in refusals[0]
    assert "Traceback" not in output, output
    assert "Socket error" not in output, output


@pytest.mark.parametrize("target", TARGETS)
def test_a_plaintext_mesh_client_is_told_the_server_requires_mtls(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    monkeypatch.setenv("MESH_STATIC_SERVICES", f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client, pytest.raises(meshlib.MeshRequestError) as caught:
        client.get("http://hello/hello")
    message = str(caught.value)
    assert f"service 'hello' at 127.0.0.1:{served.port} requires mTLS" in message
    assert "MESH_TLS=strict" in message
    assert "MESH_TLS_DIR" in message
    assert handled(served, ca_dir) == 0


@pytest.mark.parametrize("target", TARGETS)
def test_a_mesh_client_from_another_ca_is_told_which_ca_it_trusts(
    serve: ServedFactory,
    ca_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
) -> None:
    served = serve(target, server_env(ca_dir))
    rogue = tmp_path / "rogue"
    LocalCA(rogue).init(TRUST_DOMAIN)
    as_client(monkeypatch, rogue, "gateway", f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client, pytest.raises(meshlib.UntrustedCertificate) as caught:
        client.get("http://hello/hello")
    message = str(caught.value)
    assert "is not from the mesh's CA" in message
    assert f"MESH_TLS_DIR={rogue}" in message
    assert isinstance(caught.value, httpx.ConnectError)  # existing handling keeps working
    assert handled(served, ca_dir) == 0


@pytest.mark.parametrize("target", TARGETS)
def test_a_certificate_from_another_ca_is_refused(
    serve: ServedFactory, ca_dir: Path, tmp_path: Path, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    rogue = tmp_path / "rogue"
    LocalCA(rogue).init(TRUST_DOMAIN)
    ctx = client_context(ca_dir, "gateway", sign_with=rogue)
    with pytest.raises(httpx.TransportError), httpx.Client(verify=ctx) as client:
        client.get(f"https://127.0.0.1:{served.port}/hello", timeout=5)
    assert handled(served, ca_dir) == 0


GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/gateway"


@ON_EACH_LOOP
def test_failed_handshakes_log_the_peer_and_reason_once_without_a_traceback(
    serve: ServedFactory, ca_dir: Path, target: str
) -> None:
    served = serve(target, server_env(ca_dir))
    signer, key, roots = LocalCA(ca_dir).signer()
    rogue, rogue_key, rogue_pem = self_signed_ca("rogue CA")  # another mesh's CA
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.check_hostname = False
    no_certificate.load_verify_locations(cadata=roots.decode())
    callers = {
        "its certificate is not from this server's CA": context_for(
            *odd_leaf(rogue, rogue_key, [GATEWAY]), roots.decode()
        ),
        "it sent no client certificate": no_certificate,
        "it does not trust this server's certificate": context_for(
            *odd_leaf(signer, key, [GATEWAY]), rogue_pem
        ),
    }
    for _ in range(3):  # a misconfigured caller retries: still one line per reason
        for ctx in callers.values():
            with httpx.Client(verify=ctx) as client, pytest.raises(httpx.TransportError):
                client.get(f"https://127.0.0.1:{served.port}/hello", timeout=5)
    assert handled(served, ca_dir) == 0

    def logged() -> dict[str, list[str]]:
        lines = served.output.decode(errors="replace").splitlines()
        return {reason: [line for line in lines if reason in line] for reason in callers}

    wait_until(lambda: all(logged().values()), what="a line per reason in the server's log")
    output = served.output.decode(errors="replace")
    for lines in logged().values():
        assert len(lines) == 1, output
        assert "refused a connection from 127.0.0.1:" in lines[0], output
    assert "Traceback" not in output, output


UNIDENTIFIED = {
    "an agent's SPIFFE ID": [f"spiffe://{TRUST_DOMAIN}/agent/client/dc/dc1/id/node1"],
    "a mesh gateway's SPIFFE ID": [f"spiffe://{TRUST_DOMAIN}/gateway/mesh/dc/dc1"],
    "another trust domain": ["spiffe://other.test/ns/default/dc/dc1/svc/gateway"],
    "two URI SANs": [GATEWAY, f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/admin"],
    "no URI SAN": [],
}


@pytest.mark.parametrize("mode", ["strict", "permissive"])
@ON_EACH_LOOP
def test_a_mesh_signed_certificate_without_a_service_identity_is_refused_before_the_handler(
    serve: ServedFactory, ca_dir: Path, target: str, mode: str
) -> None:
    served = serve(target, server_env(ca_dir, mode=mode))
    signer, key, roots = LocalCA(ca_dir).signer()
    for case, uris in UNIDENTIFIED.items():
        ctx = context_for(*odd_leaf(signer, key, uris), roots.decode())
        with httpx.Client(verify=ctx) as client:
            try:
                answer = client.get(f"https://127.0.0.1:{served.port}/peer", timeout=5)
            except httpx.TransportError:
                continue  # refused at the TLS layer
            raise AssertionError(f"{case}: answered {answer.status_code} {answer.text}")
    assert handled(served, ca_dir) == 0
    wait_until(
        lambda: served.output.count(b"refused a connection from 127.0.0.1:") >= len(UNIDENTIFIED),
        what="the refusals in the server's log",
    )
    assert b"is not of the trust domain 'meshlib.test'" in served.output
    assert b"has 2 URI SANs, expected one" in served.output
    # the same CA's service identity is still a caller
    ctx = context_for(*odd_leaf(signer, key, [GATEWAY]), roots.decode())
    with httpx.Client(verify=ctx) as client:
        assert client.get(f"https://127.0.0.1:{served.port}/peer").json() == {"peer": GATEWAY}


def test_a_client_refuses_a_server_certificate_with_several_uris(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    signer, key, roots = LocalCA(ca_dir).signer()
    hello = f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/hello"
    cert_pem, key_pem = odd_leaf(signer, key, [hello, GATEWAY])
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server_ctx.load_verify_locations(cadata=roots.decode())
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{server.server_port}")
        with meshlib.Client() as client, pytest.raises(meshlib.IdentityMismatch):
            client.get("http://hello/", extensions={"meshlib": {"retries": 0}})
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("target", TARGETS)
def test_an_expired_certificate_is_refused(serve: ServedFactory, ca_dir: Path, target: str) -> None:
    served = serve(target, server_env(ca_dir))
    ctx = client_context(ca_dir, "gateway", expired=True)
    with pytest.raises(httpx.TransportError), httpx.Client(verify=ctx) as client:
        client.get(f"https://127.0.0.1:{served.port}/hello", timeout=5)
    assert handled(served, ca_dir) == 0


def test_a_server_proving_another_service_is_refused_by_the_client(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = serve("fastapi_app:app", server_env(ca_dir, name="impostor"))
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{impostor.port}")
    with meshlib.Client() as client, pytest.raises(meshlib.IdentityMismatch) as info:
        client.get("http://hello/hello")
    assert "svc/impostor" in str(info.value)
    assert info.value.service == "hello"
    assert handled(impostor, ca_dir) == 0  # refused before a byte of the request was sent


@pytest.mark.anyio
async def test_async_a_server_proving_another_service_is_refused_before_the_request(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = serve("fastapi_app:app", server_env(ca_dir, name="impostor"))
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{impostor.port}")
    async with meshlib.AsyncClient() as client:
        with pytest.raises(meshlib.IdentityMismatch) as info:
            await client.get("http://hello/hello")
    assert "svc/impostor" in str(info.value)
    assert handled(impostor, ca_dir) == 0  # refused before a byte of the request was sent


def test_a_callers_own_trace_extension_sees_every_event_over_mesh_tls(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The identity check lives in the pool's network backend, not in the trace extension:
    # the caller's own trace is left as it was given, and sees the handshake too.
    served = serve("fastapi_app:app", server_env(ca_dir))
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}")
    events: list[str] = []

    def trace(event: str, info: object) -> None:
        events.append(event)

    with meshlib.Client() as client:
        for _ in range(2):
            response = client.get("http://hello/hello", extensions={"trace": trace})
            assert response.status_code == 200
            assert response.request.extensions["trace"] is trace
    assert events.count("connection.start_tls.complete") == 1  # one connection, reused
    assert events.count("http11.receive_response_headers.complete") == 2


def test_a_wrong_server_is_skipped_for_a_right_one(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = serve("fastapi_app:app", server_env(ca_dir, name="impostor"))
    real = serve("fastapi_app:app", server_env(ca_dir))
    as_client(
        monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{impostor.port},127.0.0.1:{real.port}"
    )
    monkeypatch.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        statuses = {client.get("http://hello/hello").status_code for _ in range(6)}
    assert statuses == {200}
    assert handled(impostor, ca_dir) == 0


@pytest.mark.parametrize("target", TARGETS)
def test_a_caller_that_is_not_allowed_gets_403_and_the_handler_never_runs(
    serve: ServedFactory,
    ca_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
) -> None:
    served = serve(target, server_env(ca_dir, MESH_ALLOWED_CALLERS="gateway,auditor"))
    as_client(monkeypatch, ca_dir, "intruder", f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client:
        denied = client.get("http://hello/hello")
    assert denied.status_code == 403
    assert "intruder is not in MESH_ALLOWED_CALLERS" in denied.json()["detail"]
    denial = b"denied GET /hello from spiffe://meshlib.test/ns/default/dc/dc1/svc/intruder"
    wait_until(lambda: denial in served.output, what="the denial in the server's log")
    assert handled(served, ca_dir) == 0
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}")
    with meshlib.Mesh() as mesh, meshlib.Client(mesh=mesh) as client:
        assert client.get("http://hello/hello").status_code == 200


@pytest.mark.parametrize("target", TARGETS)
def test_a_path_cannot_forge_a_line_in_the_servers_log(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    served = serve(target, server_env(ca_dir, MESH_ALLOWED_CALLERS="gateway,auditor"))
    as_client(monkeypatch, ca_dir, "intruder", f"hello=127.0.0.1:{served.port}")
    forged = f"INFO allowed GET /admin from {GATEWAY}"
    with meshlib.Client() as client:
        path = "/hello%0D%0A" + forged.replace(" ", "%20") + "%1B[2J"
        assert client.get(f"http://hello{path}").status_code == 403
    wait_until(lambda: b"denied GET /hello" in served.output, what="the denial in the log")
    lines = served.output.decode(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("INFO allowed")], lines
    denial = next(line for line in lines if "denied GET /hello" in line)
    assert f"denied GET /hello\\r\\n{forged}\\x1b[2J from spiffe://" in denial
    assert "\x1b" not in served.output.decode(errors="replace")


@ON_EACH_LOOP
def test_a_permissive_server_serves_mtls_and_plaintext_on_one_port(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    served = serve(target, server_env(ca_dir, mode="permissive"))
    plain = httpx.get(f"{served.url}/peer")
    assert plain.json() == {"peer": None}
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}", "permissive")
    with meshlib.Client() as client:
        peer = client.get("http://hello/peer").json()["peer"]
    assert peer.endswith("/svc/gateway")


def test_egress_to_a_host_not_allowed_fails_fast_without_a_connection(
    backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = backends("outside")
    monkeypatch.setenv("MESH_EGRESS", "deny")
    monkeypatch.setenv("MESH_EGRESS_ALLOW", "*.example.com,localhost")
    with meshlib.Client() as client:
        with pytest.raises(meshlib.EgressDenied, match=r"egress to '127\.0\.0\.1' is denied"):
            client.get(f"{outside.url}/whoami")
        assert client.get(f"http://localhost:{outside.port}/whoami").status_code == 200
    assert outside.stats()["GET"] == 1  # the denied request never reached it


# ----------------------------------------------------------------------------- rotation


def _served_leaf_expiry(port: int, context: ssl.SSLContext) -> float:
    """When the leaf a new connection to ``port`` is served with expires (0: refused)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            return ssl.cert_time_to_seconds(str(tls.getpeercert()["notAfter"]))
    except (OSError, ssl.SSLError):
        return 0.0


def test_every_worker_of_a_pre_forking_server_renews_its_leaf(
    serve: ServedFactory, ca_dir: Path
) -> None:
    # gunicorn forks its workers after loading the app; the renewal thread stayed in the
    # parent, so each worker served its first leaf until it expired, then no handshake
    served = serve(
        "flask_app:app", server_env(ca_dir, MESH_TLS_LEAF_TTL="3s"), args=("--workers", "2")
    )
    context = client_context(ca_dir, "auditor")
    first = _served_leaf_expiry(served.port, context)
    assert first > 0
    wait_until(
        lambda: all(_served_leaf_expiry(served.port, context) > first for _ in range(8)),
        timeout=20,
        what="every worker serving a renewed leaf",
    )


@pytest.mark.parametrize("serve", LOOPS, indirect=True)
def test_leaves_and_a_root_rotate_under_load_without_a_failed_request(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = server_env(ca_dir, MESH_TLS_LEAF_TTL="3s")
    servers = [serve("fastapi_app:app", env) for _ in range(2)]
    as_client(
        monkeypatch,
        ca_dir,
        "gateway",
        ",".join(f"127.0.0.1:{s.port}" for s in servers).join(("hello=", "")),
    )
    monkeypatch.setenv("MESH_TLS_LEAF_TTL", "3s")
    ok: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        # New connections now and then, so fresh handshakes meet rotated material.
        for _ in range(200):
            if stop.is_set():
                return
            with meshlib.Client() as client:
                for _ in range(50):
                    try:
                        response = client.get("http://hello/hello")
                        if response.status_code == 200:
                            ok.append(1)
                        else:
                            failures.append(str(response.status_code))
                    except Exception as exc:
                        failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    ca = LocalCA(ca_dir)
    try:
        wait_until(lambda: len(ok) > 300, timeout=30, what="traffic")
        first_signer = ca.load_info().signer
        ca.rotate(grace=2.0)  # trusted everywhere at once; signs 2 s later
        assert ca.load_info().signer == first_signer
        wait_until(lambda: ca.load_info().signer != first_signer, what="the switch to sign")
        retire_at = ca.load_info().signing_after + 3.0  # + the leaf lifetime
        with pytest.raises(RuntimeError, match="may be valid until"):
            ca.rotate(drop_old=True, leaf_ttl=3.0)
        seen = len(ok)
        wait_until(lambda: len(ok) > seen + 600, timeout=60, what="traffic across leaf renewals")
        wait_until(lambda: time.time() > retire_at, what="old-root leaves to expire")
        ca.rotate(drop_old=True, leaf_ttl=3.0)  # the old root is no longer trusted
        assert len(ca.load_info().roots) == 1
        seen = len(ok)
        wait_until(lambda: len(ok) > seen + 600, timeout=60, what="traffic after the drop")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    print(f"\nrotation under load: {len(ok)} requests, {len(failures)} failed")
    assert failures == []


# ----------------------------------------------------------------------------- CA and secrets


def test_ca_keys_are_0600_even_under_a_umask_that_lets_everyone_read(tmp_path: Path) -> None:
    directory = tmp_path / "open-umask-ca"

    def run(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "meshlib", "ca", *args, "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            umask=0,  # files the process creates would be 0666 unless it says otherwise
        )
        assert done.returncode == 0, done.stderr

    run("init", "--trust-domain", "corp.internal")
    run("rotate", "--grace", "1ms")  # the old root's key is kept as previous-root-key.pem
    keys = sorted(p.name for p in directory.iterdir() if "key" in p.name)
    assert keys == ["previous-root-key.pem", "root-key.pem"]
    for name in keys:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    for path in directory.iterdir():  # nothing in it is writable by group or others
        assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path.name
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_ca_cli_creates_keys_readable_only_by_the_owner(tmp_path: Path) -> None:
    directory = tmp_path / "cli-ca"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshlib", "ca", *args, "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    created = run("init", "--trust-domain", "corp.internal")
    assert created.returncode == 0, created.stderr
    assert "trust domain: corp.internal" in created.stdout
    assert stat.S_IMODE((directory / "root-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert run("init").returncode == 1  # never overwrites a CA
    rotated = run("rotate", "--grace", "1h")
    assert rotated.stdout.count("root (") == 2
    assert "root (signing)" in rotated.stdout
    assert "the newest root signs from" in rotated.stdout
    too_early = run("rotate", "--drop-old")
    assert too_early.returncode == 1
    assert "may be valid until" in too_early.stderr
    assert stat.S_IMODE((directory / "root-key.pem").stat().st_mode) == 0o600
    shown = run("show")
    assert "expires" in shown.stdout
    for output in (created.stdout, rotated.stdout, shown.stdout):
        assert "PRIVATE KEY" not in output
        assert "BEGIN CERTIFICATE" not in output


def test_no_key_certificate_or_token_reaches_the_logs(
    serve: ServedFactory,
    ca_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = serve("fastapi_app:app", server_env(ca_dir))
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cr3t-token")
    monkeypatch.setenv("MESH_DISCOVERY", "static")
    with caplog.at_level(logging.DEBUG), meshlib.Client() as client:
        assert client.get("http://hello/hello").status_code == 200
    logs = caplog.text + served.output.decode(errors="replace")
    assert "issued a leaf for spiffe://" in logs
    for secret in ("PRIVATE KEY", "BEGIN CERTIFICATE", "s3cr3t-token"):
        assert secret not in logs


def test_ca_init_refuses_an_existing_directory_others_can_write(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    created = subprocess.run(
        [sys.executable, "-m", "meshlib", "ca", "init", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 1
    assert created.stderr.count("\n") == 1
    assert "is writable by others (mode 0777)" in created.stderr
    assert not (directory / "root-key.pem").exists()


@pytest.mark.parametrize(
    ("path", "mode", "message"),
    [
        ("", 0o777, "is writable by others (mode 0777)"),
        ("", 0o720, "is writable by others (mode 0720)"),
        ("root-key.pem", 0o640, "can be read or written by others (mode 0640"),
        ("root-key.pem", 0o604, "can be read or written by others (mode 0604"),
    ],
)
def test_a_ca_others_can_change_or_read_stops_start_up_with_one_line(
    ca_dir: Path, path: str, mode: int, message: str
) -> None:
    (ca_dir / path).chmod(mode)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        **server_env(ca_dir),
    }
    started = subprocess.run(
        [sys.executable, "-m", "meshlib", "serve", "fastapi_app:app", "--port", "0"],
        cwd=Path(__file__).with_name("apps"),
        env={**env, "PYTHONPATH": str(Path(__file__).with_name("apps"))},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode != 0
    assert "Traceback" not in started.stderr
    errors = [line for line in started.stderr.splitlines() if "MESH_TLS_DIR" in line]
    assert len(errors) == 1, started.stderr
    assert f"MESH_TLS_DIR='{ca_dir}'" in errors[0]
    assert message in errors[0]


def test_mesh_tls_without_a_ca_stops_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TLS", "strict")
    monkeypatch.setenv("MESH_SERVICE_NAME", "geo")
    monkeypatch.setenv("MESH_TLS_CA", "local")
    monkeypatch.setenv("MESH_TLS_DIR", str(tmp_path / "none"))
    with pytest.raises(meshlib.ConfigError, match="expected a CA in MESH_TLS_DIR") as info:
        meshlib.Client()
    assert "\n" not in str(info.value)
    assert "meshlib ca init" in str(info.value)


def test_a_short_lived_leaf_is_valid_from_now_for_its_lifetime(ca_dir: Path) -> None:
    signer, key, _ = LocalCA(ca_dir).signer()
    _, _, not_after = issue_leaf(
        signer, key, SpiffeId(TRUST_DOMAIN, "geo"), dt.timedelta(seconds=3)
    )
    left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
    assert 2 < left <= 3


@pytest.mark.parametrize("serve", LOOPS, indirect=True)
def test_an_idle_mtls_connection_does_not_hold_up_a_drain(
    serve: ServedFactory, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(
        "fastapi_app:app",
        server_env(ca_dir, MESH_DRAIN_TIMEOUT="30s", MESH_SHUTDOWN_DELAY="100ms"),
    )
    as_client(monkeypatch, ca_dir, "gateway", f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client:
        assert client.get("http://hello/hello").status_code == 200  # an idle keep-alive stays
        served.terminate()
        # asyncio's TLS close used to wait 30 s for the idle client's close_notify, and
        # uvicorn waited for that connection until the drain timeout.
        served.wait(15)


def test_the_threat_model_names_only_tests_that_exist() -> None:
    """Every test docs/security.md's threat-model table cites is defined in tests/."""
    root = Path(__file__).parent
    text = (root.parent / "docs" / "security.md").read_text()
    table = [
        line for line in text.split("## Threat model", 1)[1].splitlines() if line.startswith("| ")
    ]
    assert table[0].startswith("| asset | attacker | tries | what stops it | tested in |")
    cited = {
        name for row in table[2:] for name in re.findall(r"`(test_\w+)`", row.split(" | ")[-1])
    }
    defined = {
        name
        for path in root.glob("test_*.py")
        for name in re.findall(r"def (test_\w+)\(", path.read_text())
    }
    assert len(cited) > 20
    assert sorted(cited - defined) == []
