"""Start real backend servers (tests/backend_server.py under uvicorn) as processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from polling import wait_until

SERVER = Path(__file__).with_name("backend_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend:
    """One backend process on 127.0.0.1:<port>."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: extra command-line arguments for the next start (``["--cold", "3:1500"]``)
        self.args: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> Backend:
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(SERVER),
                "--port",
                str(self.port),
                "--name",
                self.name,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self) -> Backend:
        wait_until(self._ready, timeout=20, what=f"backend {self.name} on {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"backend {self.name} exited: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: connections are reset, nothing is drained (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipes()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self) -> Backend:
        self.kill()
        return self.start()

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/admin/stats", timeout=5).json())

    def set_mode(self, **mode: Any) -> None:
        response = httpx.post(f"{self.url}/admin/mode", content=json.dumps(mode), timeout=5)
        response.raise_for_status()


class BackendFactory:
    def __init__(self) -> None:
        self.started: list[Backend] = []

    def __call__(self, name: str = "backend", port: int | None = None) -> Backend:
        backend = Backend(name, port).start()
        self.started.append(backend)
        return backend

    def many(self, count: int, prefix: str = "b") -> list[Backend]:
        """Start ``count`` backends in parallel (named b0, b1, ...)."""
        servers = [Backend(f"{prefix}{i}") for i in range(count)]
        self.started.extend(servers)
        for server in servers:
            server.spawn()
        return [server.wait_ready() for server in servers]

    def close(self) -> None:
        for backend in self.started:
            backend.kill()


@pytest.fixture
def backends() -> Iterator[BackendFactory]:
    """Start backend processes: ``backends("a")`` or ``backends.many(3)``; all stopped after."""
    factory = BackendFactory()
    try:
        yield factory
    finally:
        factory.close()


def static_env(service: str, servers: list[Backend]) -> str:
    return f"{service}=" + ",".join(s.address for s in servers)


__all__ = ["Backend", "BackendFactory", "backends", "free_port", "static_env"]
