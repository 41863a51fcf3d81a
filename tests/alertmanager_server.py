"""A real ``alertmanager`` for the tests, and the webhook receiver its notifications reach.

The configuration is the shipped ``deploy/alertmanager/alertmanager.yml`` with two changes,
both made by ``config_for``: its webhook URLs point at a ``WebhookReceiver`` in the test, and
its grouping timers are shortened (``group_wait`` 30s -> 1s, ``group_interval`` 5m -> 2s) so
a notification and its resolution arrive within seconds. Routes, receivers' names and the
inhibition rules are used as shipped.
"""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from backends import free_port
from missing_tools import require_tool
from polling import wait_until

SHIPPED_URL = "http://127.0.0.1:9095"


class WebhookReceiver:
    """An HTTP server that keeps every Alertmanager webhook notification it is sent."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with lock:
                    received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, receiver: str, alertname: str, status: str) -> list[dict[str, Any]]:
        """The alerts named ``alertname`` sent to ``receiver`` (the URL's last part) with
        ``status`` (``firing`` or ``resolved``)."""
        return [
            alert
            for path, payload in list(self.notifications)
            if path.rsplit("/", 1)[-1] == receiver
            for alert in payload["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["status"] == status
        ]

    def names(self) -> set[tuple[str, str, str]]:
        """(receiver, alertname, status) of everything received so far."""
        return {
            (path.rsplit("/", 1)[-1], alert["labels"].get("alertname", ""), alert["status"])
            for path, payload in list(self.notifications)
            for alert in payload["alerts"]
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config_for(shipped: Path, receiver: WebhookReceiver) -> str:
    """The shipped configuration, pointed at ``receiver``, with short grouping timers."""
    text = shipped.read_text()
    for old, new in (
        (SHIPPED_URL, receiver.url),
        ("group_wait: 30s", "group_wait: 1s"),
        ("group_interval: 5m", "group_interval: 2s"),
    ):
        assert old in text, f"{shipped} no longer has {old!r}: update the test's mapping"
        text = text.replace(old, new)
    return text


class Alertmanager:
    """One ``alertmanager`` process on a free loopback port, clustering off."""

    def __init__(self, directory: Path, config: str) -> None:
        binary = require_tool("alertmanager")
        self.port = free_port()
        path = directory / "alertmanager.yml"
        path.write_text(config)
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.path={directory / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        wait_until(self._ready, timeout=30, what="alertmanager ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"alertmanager exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def active_names(self) -> set[str]:
        """The names of the alerts Alertmanager holds unresolved (inhibited ones too)."""
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=5)
        response.raise_for_status()
        return {alert["labels"]["alertname"] for alert in response.json()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
