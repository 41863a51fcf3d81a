"""The CA signer (``meshlib ca serve``): services hold their own key and leaf, never the root key.

A real signer process serves a real CA directory on a Unix socket; services are real
``meshlib serve`` processes and clients, and the "compromised service" is a real process
running as another user (``nobody``), which is what the signer's policy is keyed by.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

import meshlib
from meshlib.security import LocalCA
from meshlib.security._signer import SignerError, request_leaf, request_status
from polling import wait_until
from served import ServedFactory

TRUST_DOMAIN = "signer.test"
NOBODY = 65534
TARGETS = ["fastapi_app:app", "flask_app:app"]  # uvicorn and gunicorn


class Signer:
    """One ``meshlib ca serve`` process and its CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        self.socket = str(root / "signer.sock")
        LocalCA(self.ca_dir).init(TRUST_DOMAIN)
        policy = root / "policy"
        policy.write_text(
            f"# who may hold what\n{os.getuid()} hello gateway auditor\n{NOBODY} alpha\n"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlib",
                "ca",
                "serve",
                "--dir",
                str(self.ca_dir),
                "--socket",
                self.socket,
                "--policy",
                str(policy),
                "--leaf-ttl",
                "1h",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, timeout=30, what="the signer to listen")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
        try:
            request_status(self.socket)
        except SignerError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def signer() -> Iterator[Signer]:
    # Not under pytest's tmp_path (mode 0700): the socket must be reachable by another user.
    root = Path(tempfile.mkdtemp(prefix="meshlib-signer-"))
    root.chmod(0o755)
    started = Signer(root)
    try:
        yield started
    finally:
        started.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def signer_env(signer: Signer, name: str, **extra: str) -> dict[str, str]:
    return {
        "MESH_TLS": "strict",
        "MESH_TLS_SIGNER": signer.socket,
        "MESH_SERVICE_NAME": name,
        # the services are not told where the CA is: they must not need it
        "MESH_TLS_DIR": "/nonexistent/meshlib-ca",
        **extra,
    }


def as_client(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], services: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MESH_STATIC_SERVICES", services)
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "10ms")


def auditor_context(signer: Signer) -> ssl.SSLContext:
    """A client context with a leaf the signer gives this test process (``auditor``)."""
    cert_pem, key_pem, roots_pem, _ = request_leaf(signer.socket, "auditor", "dc1", 600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots_pem.decode())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.pem").write_bytes(cert_pem)
        (Path(tmp) / "k.pem").write_bytes(key_pem)
        ctx.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
    return ctx


def server_leaf(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("target", TARGETS)
def test_services_take_their_leaves_from_the_signer_and_call_each_other_over_mtls(
    serve: ServedFactory, signer: Signer, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    served = serve(target, signer_env(signer, "hello"))
    as_client(monkeypatch, signer_env(signer, "gateway"), f"hello=127.0.0.1:{served.port}")
    with meshlib.Client() as client:
        response = client.get("http://hello/peer")
    assert response.status_code == 200
    assert response.json()["peer"] == f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/gateway"
    leaf = server_leaf(served.port, auditor_context(signer))
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u.value) for u in uris] == [f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/hello"]


def test_the_signer_refuses_a_service_the_caller_is_not_entitled_to(signer: Signer) -> None:
    cert_pem, _, _, _ = request_leaf(signer.socket, "gateway", "dc1", 60)
    assert b"BEGIN CERTIFICATE" in cert_pem
    with pytest.raises(SignerError, match=r"may not hold service 'billing'; it may hold: audi"):
        request_leaf(signer.socket, "billing", "dc1", 60)
    with pytest.raises(SignerError, match="bad request"):  # no path tricks in the identity
        request_leaf(signer.socket, "gateway", "dc1/svc/billing", 60)
    # A leaf asked for longer than the signer grants is cut to its --leaf-ttl (1h).
    cert_pem, _, _, not_after = request_leaf(signer.socket, "gateway", "dc1", 10 * 3600)
    assert not_after.timestamp() <= time.time() + 3600 + 5


def _as_nobody(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a process that becomes ``nobody`` once its imports are loaded.

    (The interpreter and its packages live where only root may read, so the process
    starts as root, imports everything, then drops to ``nobody`` for good.)
    """
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env, "HOME": "/nonexistent"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


_PROBE = """
import json, os
import meshlib
import meshlib.security._signer, meshlib.security._material, meshlib.server
from meshlib.security import Security
from meshlib._config import load_config
os.setgroups([])
os.setgid({nobody})
os.setuid({nobody})
try:
    open({key!r}).read()
    key = "read"
except OSError as exc:
    key = type(exc).__name__
try:
    security = Security(load_config())
except (meshlib.ConfigError, OSError) as exc:
    print(json.dumps({{"key": key, "error": f"{{type(exc).__name__}}: {{exc}}"}}))
else:
    print(json.dumps({{"key": key, "identity": str(security.identity)}}))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_service_a_cannot_get_a_leaf_for_b_nor_read_the_root_key(
    signer: Signer,
) -> None:
    key_path = str(signer.ca_dir / "root-key.pem")
    script = _PROBE.format(key=key_path, nobody=NOBODY)
    allowed = _as_nobody(script, signer_env(signer, "alpha"))
    assert allowed.returncode == 0, allowed.stderr
    outcome = json.loads(allowed.stdout)
    assert outcome == {
        "key": "PermissionError",
        "identity": f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/alpha",
    }
    stolen = _as_nobody(script, signer_env(signer, "hello"))
    assert stolen.stdout, stolen.stderr
    outcome = json.loads(stolen.stdout)
    assert outcome["key"] == "PermissionError"
    error = outcome["error"]
    assert "\n" not in error
    assert error.startswith(
        f"ConfigError: MESH_TLS_SIGNER={signer.socket!r}: expected a `meshlib ca serve`"
    )
    assert f"uid {NOBODY} may not hold service 'hello'; it may hold: alpha" in error
    # And signing in process (the development setting) is no way round it.
    local = _as_nobody(
        script, signer_env(signer, "hello", MESH_TLS_CA="local", MESH_TLS_DIR=str(signer.ca_dir))
    )
    assert local.stdout, local.stderr
    assert json.loads(local.stdout)["error"].startswith("PermissionError")


def test_a_missing_signer_stops_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TLS", "strict")
    monkeypatch.setenv("MESH_SERVICE_NAME", "geo")
    monkeypatch.setenv("MESH_TLS_SIGNER", str(tmp_path / "none.sock"))
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"MESH_TLS_SIGNER='{tmp_path / 'none.sock'}': expected a")
    assert "cannot reach the signer" in message


def test_the_signer_answers_garbage_with_an_error_and_keeps_serving(signer: Signer) -> None:
    for payload in (b"\xff\xfegarbage\n", b"[1,2]\n", b"x" * 200_000 + b"\n", b'{"op":"x"}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(signer.socket)
            # the signer may close before reading all of an oversized request
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            answer = sock.makefile("rb").readline()
        assert b'"error"' in answer
    assert request_status(signer.socket)["trust_domain"] == TRUST_DOMAIN


def test_a_root_rotation_reaches_services_through_the_signer_without_a_failed_request(
    serve: ServedFactory, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = signer_env(signer, "hello", MESH_TLS_LEAF_TTL="3s")
    served = serve("fastapi_app:app", env)
    as_client(
        monkeypatch,
        signer_env(signer, "gateway", MESH_TLS_LEAF_TTL="3s"),
        f"hello=127.0.0.1:{served.port}",
    )
    ok: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with meshlib.Client() as client:  # new connections: fresh handshakes
                for _ in range(20):
                    try:
                        response = client.get("http://hello/hello")
                        (ok if response.status_code == 200 else failures).append(
                            response.status_code
                        )
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))  # type: ignore[arg-type]

    thread = threading.Thread(target=load)
    thread.start()
    ca = LocalCA(signer.ca_dir)
    try:
        wait_until(lambda: len(ok) > 50, timeout=30, what="traffic")
        first = ca.load_info().signer
        ca.rotate(grace=2.0)
        wait_until(lambda: ca.load_info().signer != first, what="the new root to sign")
        new_root = ca.load_info().signer.subject

        def served_by_new_root() -> bool:
            return server_leaf(served.port, auditor_context(signer)).issuer == new_root

        wait_until(served_by_new_root, timeout=30, what="the server's leaf from the new root")
        seen = len(ok)
        wait_until(lambda: len(ok) > seen + 50, timeout=30, what="traffic after the rotation")
    finally:
        stop.set()
        thread.join(60)
    print(f"\nrotation through the signer: {len(ok)} requests, {len(failures)} failed")
    assert failures == []
