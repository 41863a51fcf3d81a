"""Services of the demo as real ``meshlib serve`` processes, started and stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ServiceProcess", "stop_all"]

_ANNOUNCE = re.compile(rb"on https?://[^ ]*:(\d+) pid (\d+), admin on (http://[^ \n]*)")


class ServiceProcess:
    """``meshlib serve <target>`` run from ``directory``, its output in ``log``.

    The process gets a session of its own, so a Ctrl-C in the terminal reaches the demo,
    which then stops it (by PID) with the graceful drain.
    """

    def __init__(
        self,
        label: str,
        target: str,
        directory: Path,
        env: dict[str, str],
        log: Path,
        *,
        port: int = 0,
    ) -> None:
        self.label = label
        self.target = target
        self.directory = directory
        self.env = env
        self.log = log
        self.port = port
        #: the admin listener (/mesh/health, /mesh/metrics), once announced
        self.admin_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0  # where this run's output starts in the log

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, once started."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> ServiceProcess:
        """Start the process; ``wait_ready`` waits for it to listen."""
        env = {**os.environ, **self.env, "PYTHONPATH": str(self.directory)}
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        argv = [sys.executable, "-m", "meshlib", "serve", self.target, "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> ServiceProcess:
        """Wait until it announced its port and accepts connections."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited:\n{self.tail()}")
            output = self.log.read_bytes()[self._offset :]
            match = _ANNOUNCE.search(output)
            if match is not None:
                self.port = self.port or int(match.group(1))
                self.admin_url = match.group(3).decode()
            if match is not None and _listening(self.port):
                return self
            time.sleep(0.05)  # poll interval while the server starts
        raise RuntimeError(f"{self.label} did not start within {timeout:g} s:\n{self.tail()}")

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """``spawn`` and ``wait_ready``."""
        return self.spawn().wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM: the graceful drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the graceful drain), then SIGKILL if it has not exited in ``timeout``."""
        self.terminate()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 20) -> str:
        """The end of the process's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


def stop_all(processes: list[ServiceProcess], timeout: float = 15.0) -> None:
    """Drain every process at once, then wait for each (SIGKILL after ``timeout``)."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop(timeout)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
