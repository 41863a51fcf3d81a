"""The async inner transport (_async_pool.py) against real servers on loopback."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import anyio
import httpcore
import httpx
import pytest

import meshlib
from certs import server_context_for
from meshlib._async_pool import AsyncPoolTransport
from meshlib._asyncio_stream import _HIGH_WATER, AsyncioBackend, AsyncioStream
from meshlib.security import LocalCA, SpiffeId
from meshlib.security._local_ca import issue_leaf
from raw_http_server import BIG, RawServer

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("asyncio", {}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Each test on uvloop (the loop of `meshlib serve` when installed) and asyncio's own:
    the pool's connections are the running loop's transports (_asyncio_stream.py)."""
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


async def test_many_concurrent_requests_share_few_connections() -> None:
    pool = AsyncPoolTransport(limits=httpx.Limits(max_connections=4))
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            statuses: list[int] = []

            async def one() -> None:
                statuses.append((await client.get(f"{server.url}/")).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(one)
            assert statuses == [200] * 200
            assert server.connections <= 4
            assert pool.connections <= 4
            assert pool.idle == pool.connections


async def test_a_request_cancelled_mid_body_leaves_no_connection_checked_out() -> None:
    pool = AsyncPoolTransport()
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            with anyio.move_on_after(0.2) as scope:
                async with client.stream("GET", f"{server.url}/slow-body") as response:
                    async for _ in response.aiter_bytes():
                        pass
            assert scope.cancelled_caught
            assert pool.connections == 0  # closed, not given back half-read
            assert pool.idle == 0
            assert (await client.get(f"{server.url}/")).text == "ok"
            assert pool.connections == 1


async def test_a_server_closing_a_kept_alive_connection_costs_no_failed_get() -> None:
    pool = AsyncPoolTransport()
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            for _ in range(5):
                # /once answers, then hangs up on the next request sent on that connection
                assert (await client.get(f"{server.url}/once")).text == "ok"
            assert server.connections == 5


async def test_a_non_idempotent_request_on_a_stale_connection_is_not_replayed() -> None:
    pool = AsyncPoolTransport()
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            assert (await client.get(f"{server.url}/once")).text == "ok"
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(f"{server.url}/", content=b"order")
            assert server.connections == 1


async def test_a_full_pool_raises_pool_timeout() -> None:
    pool = AsyncPoolTransport(limits=httpx.Limits(max_connections=1))
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, f"{server.url}/hold")
                with anyio.fail_after(10):
                    while server.connections < 1:  # the held request took the one connection
                        await anyio.sleep(0.01)
                with pytest.raises(httpx.PoolTimeout):
                    await client.get(f"{server.url}/", timeout=httpx.Timeout(5, pool=0.2))
                server.release.set()
            assert (await client.get(f"{server.url}/")).text == "ok"


def _server_tls(ca_dir: Path, service: str) -> ssl.SSLContext:
    ca = LocalCA(ca_dir)
    signer, key, _ = ca.signer()
    identity = SpiffeId(ca.load_info().trust_domain, service)
    cert_pem, key_pem, _ = issue_leaf(signer, key, identity, dt.timedelta(hours=1))
    return server_context_for(cert_pem, key_pem, (ca_dir / "roots.pem").read_text())


async def test_a_renewed_client_leaf_is_used_by_the_next_new_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = tmp_path / "ca"
    LocalCA(ca_dir).init("meshlib.test")
    with RawServer(tls=_server_tls(ca_dir, "hello")) as server:
        monkeypatch.setenv("MESH_TLS", "strict")
        monkeypatch.setenv("MESH_TLS_DIR", str(ca_dir))
        monkeypatch.setenv("MESH_TLS_CA", "local")  # signs in process, as the test's own CA
        monkeypatch.setenv("MESH_SERVICE_NAME", "gateway")
        monkeypatch.setenv("MESH_TLS_LEAF_TTL", "3s")  # renewed after 2 s
        monkeypatch.setenv("MESH_STATIC_SERVICES", f"hello=127.0.0.1:{server.port}")
        async with meshlib.AsyncClient() as client:
            assert (await client.get("http://hello/")).text == "ok"
            with anyio.fail_after(20):
                while len(server.client_serials) < 2:
                    assert (await client.get("http://hello/")).text == "ok"
                    await anyio.sleep(0.05)
    first, second = server.client_serials[:2]
    assert first is not None
    assert second is not None
    assert first != second  # the second connection presented the renewed leaf


async def test_a_read_timeout_raises_read_timeout_and_closes_the_connection() -> None:
    pool = AsyncPoolTransport()
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{server.url}/hold", timeout=httpx.Timeout(5, read=0.2))
            assert pool.connections == 0
            server.release.set()
            assert (await client.get(f"{server.url}/")).text == "ok"


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    # Not the stale-connection retry (a POST is never replayed): the pool sees the close
    # before it hands the connection out, so even a POST gets a fresh connection.
    pool = AsyncPoolTransport()
    with RawServer() as server:
        async with httpx.AsyncClient(transport=pool) as client:
            assert (await client.get(f"{server.url}/bye")).text == "ok"
            idle = [c for connections in pool._idle.values() for c in connections]
            assert len(idle) == 1
            with anyio.fail_after(10):
                while not idle[0].has_expired():  # the loop reports the server's close
                    await anyio.sleep(0.01)
            assert (await client.post(f"{server.url}/", content=b"order")).text == "ok"
            assert server.connections == 2


async def _requested(server: RawServer, path: str) -> AsyncioStream:
    """A connection of this module's backend with a GET of ``path`` written on it."""
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", server.port, timeout=5)
    assert isinstance(stream, AsyncioStream)
    await stream.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), timeout=5)
    return stream


async def test_a_large_body_read_slowly_pauses_reading_and_arrives_whole() -> None:
    with RawServer() as server:
        stream = await _requested(server, "/big")
        protocol = stream._protocol
        with anyio.fail_after(10):
            while not protocol.reading_paused:  # nobody reads: the buffer fills, then stops
                await anyio.sleep(0.01)
        assert protocol.buffered <= _HIGH_WATER + 256 * 1024  # one read's worth over, at most
        waiting, chunks = protocol.buffered, len(protocol.chunks)
        received = bytearray(await stream.read(len(BIG) * 2, timeout=5))
        assert chunks > 1
        assert len(received) == waiting  # every chunk that had arrived, in one read
        with anyio.fail_after(10):
            while len(received) < len(BIG) + 40:
                chunk = await stream.read(65536, timeout=5)
                assert chunk, "the stream ended early"
                received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == BIG
        assert not protocol.reading_paused
        await stream.aclose()


async def test_a_refused_connection_and_a_failed_handshake_raise_connect_error(
    tmp_path: Path,
) -> None:
    with RawServer() as server:
        port = server.port
    with pytest.raises(httpcore.ConnectError):  # nothing listens there any more
        await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
    ca_dir = tmp_path / "ca"
    LocalCA(ca_dir).init("meshlib.test")
    with RawServer(tls=_server_tls(ca_dir, "hello")) as server:
        pool = AsyncPoolTransport(verify=ssl.create_default_context())  # not the mesh's CA
        async with httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(server.url)
            assert pool.connections == 0


async def test_a_write_after_the_server_closed_raises_write_error() -> None:
    with RawServer() as server:
        stream = await _requested(server, "/bye")
        with anyio.fail_after(10):
            while await stream.read(65536, timeout=5):
                pass  # the answer, then b"": the server's end of stream
        assert stream.get_extra_info("is_readable")  # an idle check would see it closed
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
