"""Run apps with ``meshlib serve`` as real processes (apps live in tests/apps)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from polling import wait_until

APPS = Path(__file__).with_name("apps")
#: The event loops an ASGI app is served on: uvloop (installed with the ``test`` extra, as by
#: ``meshlib[fast]``) and asyncio's own (uvloop hidden, as where it is not installed).
#: ``@pytest.mark.parametrize("serve", LOOPS, indirect=True)`` runs a test on each; unmarked
#: tests get ``auto``, uvloop when installed, as ``meshlib serve`` picks.
LOOPS = ["uvloop", "asyncio"]
#: ``target`` and ``serve`` for a test of both servers: the ASGI app (uvicorn) on each loop,
#: the WSGI app (gunicorn's threads: no event loop) once.
ON_EACH_LOOP = pytest.mark.parametrize(
    ("target", "serve"),
    [*(("fastapi_app:app", loop) for loop in LOOPS), ("flask_app:app", "auto")],
    indirect=["serve"],
)
_WITHOUT_UVLOOP = Path(__file__).with_name("without_uvloop")
_ANNOUNCE = re.compile(rb"on https?://[^ ]*:(\d+) pid (\d+), admin on http://[^ ]*:(\d+)")


class Served:
    """One ``meshlib serve <target>`` process."""

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        *,
        port: int = 0,
        args: tuple[str, ...] = (),
        loop: str = "auto",
    ) -> None:
        if loop == "uvloop":
            import uvloop  # noqa: F401 - the test extra installs it; never a silent asyncio run
        elif loop not in ("asyncio", "auto"):
            raise ValueError(f"loop {loop!r}: one of {LOOPS} or 'auto'")
        self.loop = loop
        self.target = target
        self.env = env
        self.port = port
        self.admin_port = 0
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = bytearray()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener: /mesh/health, /mesh/metrics, /mesh/status."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def start(self) -> Served:
        # the apps first, then the caller's PYTHONPATH: a checkout run with PYTHONPATH=src
        # serves its own meshlib, not the one installed
        inherited = os.environ.get("PYTHONPATH")
        first = [str(APPS), str(_WITHOUT_UVLOOP)] if self.loop == "asyncio" else [str(APPS)]
        path = os.pathsep.join([*first, inherited] if inherited else first)
        env = {**os.environ, **self.env, "PYTHONPATH": path}
        self.output.clear()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlib",
                "serve",
                self.target,
                "--port",
                str(self.port),
                *self.args,
            ],
            cwd=APPS,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = wait_until(
            lambda: _ANNOUNCE.search(self.output) or self._exited(),
            timeout=30,
            what=f"{self.target} to start",
        )
        if not isinstance(match, re.Match):
            raise AssertionError(f"{self.target} exited: {self.output.decode(errors='replace')}")
        self.port = int(match.group(1))
        self.admin_port = int(match.group(3))
        wait_until(self._healthy, timeout=30, what=f"{self.target} healthy")
        return self

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.extend(line)

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _healthy(self) -> bool:
        import httpx

        try:  # the admin listener is plaintext whatever MESH_TLS says
            return httpx.get(f"{self.admin_url}/mesh/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def terminate(self) -> None:
        """SIGTERM: the graceful drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.wait()


class ServedFactory:
    def __init__(self, loop: str = "auto") -> None:
        self.loop = loop
        self.started: list[Served] = []

    def __call__(self, target: str, env: dict[str, str], **kwargs: object) -> Served:
        kwargs.setdefault("loop", self.loop)
        served = Served(target, env, **kwargs)  # type: ignore[arg-type]
        self.started.append(served)
        return served.start()


@pytest.fixture
def serve(request: pytest.FixtureRequest) -> Iterator[ServedFactory]:
    """``serve("fastapi_app:app", env)`` runs ``meshlib serve``; all stopped afterwards.

    Parametrized indirectly with one of ``LOOPS``, it serves on that event loop.
    """
    factory = ServedFactory(loop=getattr(request, "param", "auto"))
    try:
        yield factory
    finally:
        for served in factory.started:
            served.stop()
