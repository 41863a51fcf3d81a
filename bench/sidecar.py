"""Rows 3 and 3b: meshlib strict mTLS against a sidecar pair (HAProxy -> mTLS -> HAProxy).

The same app (tests/apps/fastapi_app.py under ``meshlib serve``) is called two ways, one
request at a time (row 3: p50) and 32 in flight (row 3b: throughput), on one set-up
(``sidecar_pair``):

* **meshlib**: ``meshlib.Client`` (row 3b: ``meshlib.AsyncClient``) with ``MESH_TLS=strict``
  straight to the app served with ``MESH_TLS=strict`` (a local CA made by ``LocalCA.init``),
  no proxy;
* **sidecar pair**: a plain ``httpx.Client`` (row 3b: ``httpx.AsyncClient`` as it comes) to
  a client-side HAProxy, mTLS from it to a server-side HAProxy, plain HTTP from that to the
  app served with ``MESH_TLS=off``::

    client --plain--> client-side HAProxy ==mTLS==> server-side HAProxy --plain--> app

Both proxies are Debian's ``haproxy`` with certificates made here by ``cryptography`` (an EC
P-256 CA, server and client leaves carrying SPIFFE IDs) and keep connections alive on both
hops, as Envoy and Linkerd do. The client-side proxy shares the client's CPU and the
server-side one the server's, as sidecars share their app's host. Both rows also call the
plain app directly (row 3b with bare httpx and with meshlib), for what TLS and the proxies
add.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import Line, compare_async, percentile, pin_as_client, pin_server, wait_listening

from meshlib._config import MeshConfig, load_config

_TRUST_DOMAIN = "spiffe://meshlib.bench"


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, and server and client leaves as HAProxy wants them (cert + key in one PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshlib bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(f"{_TRUST_DOMAIN}/ns/default/sa/{role}"),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        paths[role] = directory / f"{role}.pem"
        paths[role].write_bytes(leaf.public_bytes(pem) + key_pem)
    return paths


_GLOBAL = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
"""


class _HAProxy:
    """One ``haproxy`` process with the given config, stopped by ``stop``."""

    def __init__(self, name: str, config: str, directory: Path) -> None:
        self.path = directory / f"{name}.cfg"
        self.path.write_text(_GLOBAL + config, encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _HAProxy:
        """Check the config, then run haproxy in the foreground (``-db``)."""
        subprocess.run(["haproxy", "-c", "-q", "-f", str(self.path)], check=True)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.path)])
        return self

    def stop(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _latencies(client: httpx.Client, url: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        response = client.get(url)
        out.append(time.perf_counter() - t0)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return out


def _serve(env: dict[str, str]) -> Any:
    from served import Served

    served = Served("fastapi_app:app", env).start()
    pin_server(served.proc.pid)
    return served


def _figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "p50_us": percentile(latencies, 50) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
    }


@dataclass
class SidecarSetup:
    """The two ways of calling one app, set up by ``sidecar_pair``."""

    #: the app under ``meshlib serve`` with ``MESH_TLS=strict``, for meshlib's clients
    mesh_app: Any
    #: the same app with ``MESH_TLS=off``: behind the server-side proxy, and called direct
    plain_app: Any
    #: the client-side proxy's plain listener: ``http://127.0.0.1:<port>``
    sidecar_url: str
    #: a strict-mTLS caller's configuration, ``app`` being ``mesh_app`` (``http://app/``)
    mesh_config: MeshConfig
    #: a plaintext caller's configuration, ``plainapp`` being ``plain_app``
    plain_config: MeshConfig


@contextmanager
def sidecar_pair() -> Iterator[SidecarSetup]:
    """Both apps, a local CA for meshlib, and the HAProxy pair in front of the plain app.

    All are stopped, and the CA's directory removed, on exit.
    """
    from backends import free_port
    from meshlib._runtime import live_meshes
    from meshlib.security import LocalCA

    directory = Path(tempfile.mkdtemp(prefix="meshlib-bench-sidecar-"))
    ca_dir = directory / "ca"
    LocalCA(ca_dir).init("meshlib.bench")
    started: list[Any] = []
    try:
        certs = _certificates(directory)
        strict = {"MESH_TLS": "strict", "MESH_TLS_CA": "local", "MESH_TLS_DIR": str(ca_dir)}
        started.append(_serve({**strict, "MESH_SERVICE_NAME": "app"}))
        started.append(_serve({"MESH_SERVICE_NAME": "plainapp"}))
        mesh_app, plain_app = started
        inbound, outbound = free_port(), free_port()
        server_side = _HAProxy(
            "server-side",
            f"frontend mtls\n    bind 127.0.0.1:{inbound} ssl crt {certs['server']} "
            f"ca-file {certs['ca']} verify required\n    default_backend app\n"
            f"backend app\n    server app {plain_app.address}\n",
            directory,
        )
        client_side = _HAProxy(
            "client-side",
            f"frontend plain\n    bind 127.0.0.1:{outbound}\n    default_backend mesh\n"
            f"backend mesh\n    server peer 127.0.0.1:{inbound} ssl crt {certs['client']} "
            f"ca-file {certs['ca']} verify required verifyhost localhost sni str(localhost)\n",
            directory,
        )
        started += [server_side.start(), client_side.start()]
        assert server_side.proc is not None
        assert client_side.proc is not None
        pin_server(server_side.proc.pid)
        pin_as_client(client_side.proc.pid)
        wait_listening(inbound)
        wait_listening(outbound)
        caller = {"MESH_SERVICE_NAME": "caller"}
        yield SidecarSetup(
            mesh_app,
            plain_app,
            f"http://127.0.0.1:{outbound}",
            load_config({**strict, **caller, "MESH_STATIC_SERVICES": f"app={mesh_app.address}"}),
            load_config({**caller, "MESH_STATIC_SERVICES": f"plainapp={plain_app.address}"}),
        )
    finally:
        for process in reversed(started):
            process.stop()
        for mesh in live_meshes():  # stop renewing the client's leaf from the directory
            mesh.close()
        shutil.rmtree(directory, ignore_errors=True)


def measure(quick: bool) -> dict[str, Any]:
    """p50/p99 of c=1 calls: meshlib strict mTLS, the sidecar pair, and direct plaintext."""
    import meshlib

    count = 300 if quick else 3000
    with (
        sidecar_pair() as setup,
        httpx.Client() as plain,
        meshlib.Client(config=setup.mesh_config) as mesh,
    ):
        paths = {
            "meshlib_strict_mtls": (mesh, "http://app/hello"),
            "sidecar_pair": (plain, f"{setup.sidecar_url}/hello"),
            "direct_plaintext": (plain, f"{setup.plain_app.url}/hello"),
        }
        for client, url in paths.values():
            _latencies(client, url, 200)  # warm: connections, TLS sessions
        latencies: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(3):  # rounds, so a change in load hits every path alike
            for name, (client, url) in paths.items():
                latencies[name] += _latencies(client, url, count // 3)
    return {name: _figures(got) for name, got in latencies.items()}


def mtls_vs_sidecar(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 3: p50 of meshlib strict mTLS divided by p50 through the sidecar pair."""
    measure_name = "strict mTLS, c=1: p50 meshlib/sidecar pair"
    if shutil.which("haproxy") is None:
        line = Line("3", measure_name, "not measurable: no haproxy on PATH", "≤ 0.8x", None)
        return [line], {"row3_mtls_vs_sidecar": "no haproxy"}
    figures = measure(quick)
    mesh, pair, direct = (
        figures["meshlib_strict_mtls"],
        figures["sidecar_pair"],
        figures["direct_plaintext"],
    )
    ratio = mesh["p50_us"] / pair["p50_us"]
    lines = [
        Line(
            "3",
            measure_name,
            f"{ratio:.2f} (meshlib {mesh['p50_us']:.0f} µs, sidecars {pair['p50_us']:.0f} µs, "
            f"plaintext direct {direct['p50_us']:.0f} µs)",
            "≤ 0.8x",
            ratio <= 0.8,
        )
    ]
    return lines, {"row3_mtls_vs_sidecar": figures}


def measure_async(quick: bool) -> dict[str, Any]:
    """Throughput, 32 in flight: meshlib strict mTLS, the sidecar pair, plaintext direct.

    Plaintext direct is measured with bare httpx and with meshlib (``MESH_TLS=off``).
    """
    import meshlib

    # Four paths keep both CPUs busy: 4 x 2.5 s each (about 45 s with the set-up) keeps the
    # row's own share of the 1-minute load average near 1, under the "noisy" line (1.5).
    rounds, seconds = (1, 0.5) if quick else (4, 2.5)

    async def run(setup: SidecarSetup) -> dict[str, Any]:
        async with (
            httpx.AsyncClient() as bare,
            meshlib.AsyncClient(config=setup.mesh_config) as mesh,
            meshlib.AsyncClient(config=setup.plain_config) as mesh_plain,
        ):
            paths = {
                "meshlib_strict_mtls": (mesh, "http://app/hello"),
                "sidecar_pair": (bare, f"{setup.sidecar_url}/hello"),
                "direct_plaintext_bare": (bare, f"{setup.plain_app.url}/hello"),
                "direct_plaintext_meshlib": (mesh_plain, "http://plainapp/hello"),
            }
            return await compare_async(paths, rounds, seconds, concurrency=32)

    with sidecar_pair() as setup:
        return asyncio.run(run(setup))


def mtls_vs_sidecar_async(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 3b: throughput of meshlib strict mTLS divided by the sidecar pair's, 32 in flight."""
    measure_name = "strict mTLS, c=32: throughput meshlib/sidecar pair"
    if shutil.which("haproxy") is None:
        line = Line("3b", measure_name, "not measurable: no haproxy on PATH", "≥ 1.5x", None)
        return [line], {"row3b_mtls_vs_sidecar_c32": "no haproxy"}
    figures = measure_async(quick)
    mesh, pair = figures["meshlib_strict_mtls"], figures["sidecar_pair"]
    bare, plain = figures["direct_plaintext_bare"], figures["direct_plaintext_meshlib"]
    ratio = mesh["req_per_s"] / pair["req_per_s"]
    lines = [
        Line(
            "3b",
            measure_name,
            f"{ratio:.2f}x (meshlib {mesh['req_per_s']:.0f}/s, sidecars {pair['req_per_s']:.0f}/s)",
            "≥ 1.5x",
            ratio >= 1.5,
        ),
        Line(
            "3b",
            "  for comparison: plaintext direct, c=32",
            f"bare httpx {bare['req_per_s']:.0f}/s, meshlib {plain['req_per_s']:.0f}/s",
            "(no TLS, no proxy)",
            None,
        ),
    ]
    return lines, {"row3b_mtls_vs_sidecar_c32": figures}
