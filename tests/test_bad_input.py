"""Bad input at the door: raw bytes a well-formed client never sends, at a real ``meshlib serve``.

Each case goes to uvicorn (FastAPI) and gunicorn (Flask) over a raw socket. For each: the
server answers 4xx or closes the connection, within a bound; the app's handler does not run
for the rejected request (the apps count handler runs at ``/handled``); nothing answers 500;
and the server goes on serving a normal request afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from certs import context_for
from meshlib.security import LocalCA
from meshlib.server._http_guard import HEADER_TIMEOUT
from polling import wait_until
from served import LOOPS, ON_EACH_LOOP, Served, ServedFactory

TARGETS = ["fastapi_app:app", "flask_app:app"]  # uvicorn and gunicorn
BOUND = 15.0  # seconds a refusal may take, generous for a loaded machine

GET = b"GET /hello HTTP/1.1\r\nHost: hello\r\n"
SMUGGLED = b"GET /hello HTTP/1.1\r\nHost: hello\r\n\r\n"

CASES: dict[str, bytes] = {
    "raw garbage": b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
    "a request line with extra parts": b"GET /hello HTTP/1.1 extra\r\nHost: hello\r\n\r\n",
    "an unknown protocol version": b"GET /hello HTTP/7.9\r\nHost: hello\r\n\r\n",
    "a header without a colon": GET + b"no colon here\r\n\r\n",
    "a space before the colon": GET + b"X-Mesh-Peer : forged\r\n\r\n",
    "a NUL in a header value": GET + b"X-Test: a\x00b\r\n\r\n",
    "a bare CR in a header value": GET + b"X-Test: a\rb\r\n\r\n",
    "an oversized header (256 KiB)": GET + b"X-Big: " + b"a" * 256 * 1024 + b"\r\n\r\n",
    "too many headers (10000)": GET + b"".join(b"X-H%d: v\r\n" % i for i in range(10000)) + b"\r\n",
    "two different Content-Lengths": (
        b"POST /hello HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
        + SMUGGLED
    ),
    "a negative Content-Length": (
        b"POST /hello HTTP/1.1\r\nHost: hello\r\nContent-Length: -1\r\n\r\n" + SMUGGLED
    ),
    "Content-Length and Transfer-Encoding (CL.TE)": (
        b"POST /hello HTTP/1.1\r\nHost: hello\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "an obfuscated Transfer-Encoding": (
        b"POST /hello HTTP/1.1\r\nHost: hello\r\nContent-Length: 41\r\n"
        b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "a bad chunk size": (
        b"POST /hello HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n" + SMUGGLED
    ),
}


def handled(served: Served) -> int:
    return int(httpx.get(f"{served.url}/handled", timeout=10).json()["count"])


def exchange(port: int, payload: bytes, *, timeout: float = BOUND) -> tuple[bytes, float]:
    """Send ``payload``; read until the server closes or ``timeout``: (answer, seconds)."""
    started = time.monotonic()
    answer = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may refuse before reading it all
            sock.sendall(payload)
        sock.settimeout(0.5)
        while time.monotonic() - started < timeout:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if answer.count(b"HTTP/1.1 ") and b"\r\n\r\n" in answer:
                    break  # an answer and a connection left open: we are done with it
                continue
            except OSError:
                break  # reset: a refusal too
            if not chunk:
                break
            answer.extend(chunk)
    return bytes(answer), time.monotonic() - started


def statuses(answer: bytes) -> list[int]:
    return [
        int(line.split()[1])
        for line in answer.split(b"\r\n")
        if line.startswith(b"HTTP/1.") and len(line.split()) > 1
    ]


@pytest.fixture(params=TARGETS)
def plain(request: pytest.FixtureRequest, serve: ServedFactory) -> Served:
    return serve(request.param, {"MESH_SERVICE_NAME": "hello"})


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_requests_are_refused_before_the_handler_and_the_server_goes_on(
    plain: Served, case: str
) -> None:
    answer, took = exchange(plain.port, CASES[case])
    codes = statuses(answer)
    print(f"\n{plain.target} | {case} | {codes or 'closed'} | {took:.2f} s")
    assert took < BOUND, f"{case}: no refusal within {BOUND:g} s"
    # 4xx, or the refusals RFC 9110 names for a coding or version the server lacks
    refused = all(400 <= code < 500 or code in (501, 505) for code in codes)
    assert refused, f"{case}: answered {codes}: {answer[:300]!r}"
    assert handled(plain) == 0, f"{case}: a handler ran ({answer[:300]!r})"
    assert httpx.get(f"{plain.url}/hello", timeout=10).status_code == 200
    assert handled(plain) == 1


def test_a_slow_drip_header_block_is_cut_off_and_others_are_served_meanwhile(
    plain: Served,
) -> None:
    """Ten clients (more than gunicorn's eight threads) each send a header line every 100 ms
    and never end the block."""
    closed_after: list[float] = []
    stop = threading.Event()

    def drip() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", plain.port), timeout=5) as sock:
            try:
                sock.sendall(GET)
                n = 0
                while not stop.is_set() and time.monotonic() - started < 120:
                    sock.sendall(b"X-Drip-%d: %s\r\n" % (n, b"d" * 20))
                    n += 1
                    time.sleep(0.1)  # deliberate: the drip is the attack
            except OSError:
                pass
            closed_after.append(time.monotonic() - started)

    drippers = [threading.Thread(target=drip) for _ in range(10)]
    for thread in drippers:
        thread.start()
    waits: list[float] = []
    try:
        for _ in range(20):  # other callers meanwhile
            started = time.monotonic()
            assert httpx.get(f"{plain.url}/hello", timeout=30).status_code == 200
            waits.append(time.monotonic() - started)
        wait_until(lambda: len(closed_after) == len(drippers), timeout=60, what="drips cut off")
    finally:
        stop.set()
        for thread in drippers:
            thread.join(10)
    print(
        f"\n{plain.target}: slow drips cut off after {min(closed_after):.1f}-"
        f"{max(closed_after):.1f} s; other callers waited at most {max(waits):.2f} s"
    )
    if plain.target.startswith("fastapi"):  # uvicorn: one event loop, nobody waits
        assert max(closed_after) < HEADER_TIMEOUT + 5
        assert max(waits) < 2.0
    else:  # gunicorn: 8 threads, a drip is on the clock once a thread takes it
        assert max(closed_after) < 2 * HEADER_TIMEOUT + 5
        assert max(waits) < HEADER_TIMEOUT + 5
    assert handled(plain) == 20


@ON_EACH_LOOP
def test_tls_garbage_at_a_strict_port_is_refused_and_the_port_goes_on(
    serve: ServedFactory, tmp_path: Path, target: str
) -> None:
    ca = tmp_path / "ca"
    LocalCA(ca).init("meshlib.test")
    env = {
        "MESH_TLS": "strict",
        "MESH_TLS_CA": "local",
        "MESH_TLS_DIR": str(ca),
        "MESH_SERVICE_NAME": "hello",
    }
    served = serve(target, env)
    record = b"\x16\x03\x01\x00\x40" + bytes(range(64))  # a TLS record that is no ClientHello
    for payload in (record, b"\x16\x03\x03\xff\xff" + b"\x00" * 1000, b"\x16" * 5, b"\x80" * 64):
        answer, took = exchange(served.port, payload)
        assert took < BOUND
        if payload[:1] == b"\x16":  # a TLS record: refused by the TLS layer, no HTTP at all
            assert b"HTTP/" not in answer
        else:  # no TLS at all: the strict port's plaintext refusal, which says why
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert b"x-mesh-tls-required: strict" in answer
    # A stalled handshake (a TLS header then nothing) holds no one else up.
    stalled = socket.create_connection(("127.0.0.1", served.port))
    stalled.sendall(b"\x16\x03\x01")
    try:
        leaf = _client_context(ca)
        with httpx.Client(verify=leaf, timeout=10) as client:
            assert client.get(f"https://127.0.0.1:{served.port}/hello").status_code == 200
            assert int(client.get(f"https://127.0.0.1:{served.port}/handled").json()["count"]) == 1
    finally:
        stalled.close()


@pytest.mark.parametrize("serve", LOOPS, indirect=True)
def test_a_connection_that_never_speaks_to_a_tls_port_is_closed_and_holds_no_one_up(
    serve: ServedFactory, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    LocalCA(ca).init("meshlib.test")
    env = {
        "MESH_TLS": "permissive",
        "MESH_TLS_CA": "local",
        "MESH_TLS_DIR": str(ca),
        "MESH_SERVICE_NAME": "hello",
    }
    served = serve("fastapi_app:app", env)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=HEADER_TIMEOUT + 10) as mute:
        with httpx.Client(verify=_client_context(ca), timeout=10) as client:
            assert client.get(f"https://127.0.0.1:{served.port}/hello").status_code == 200
        assert httpx.get(f"{served.url}/hello", timeout=10).status_code == 200
        assert mute.recv(1) == b""  # closed by the server (a timeout here: never closed)
        took = time.monotonic() - started
    assert HEADER_TIMEOUT - 1 < took < HEADER_TIMEOUT + 5


def _client_context(ca_dir: Path) -> ssl.SSLContext:
    import datetime as dt

    from meshlib.security import SpiffeId
    from meshlib.security._local_ca import issue_leaf

    signer, key, bundle = LocalCA(ca_dir).signer()
    cert_pem, key_pem, _ = issue_leaf(
        signer, key, SpiffeId("meshlib.test", "auditor"), dt.timedelta(hours=1)
    )
    return context_for(cert_pem, key_pem, bundle.decode())
