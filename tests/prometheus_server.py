"""A real ``prometheus`` for the tests: scrapes given targets every second, and evaluates
given rule files every second, sending their alerts to an Alertmanager when one is given.

The binary comes from ``tools.find_tool`` (PATH, the cache, or a Go build on first use).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from backends import free_port
from missing_tools import require_tool
from polling import wait_until


class Prometheus:
    """One ``prometheus`` process on a free loopback port, with its own TSDB."""

    def __init__(
        self,
        directory: Path,
        targets: dict[str, str],
        metrics_path: str,
        *,
        scrape_interval: str = "1s",
        rule_files: tuple[Path, ...] = (),
        alertmanager: str | None = None,
        features: tuple[str, ...] = (),
    ) -> None:
        binary = require_tool("prometheus")
        self.port = free_port()
        config = directory / "prometheus.yml"
        jobs = "\n".join(
            f"  - job_name: {job}\n"
            f"    metrics_path: {metrics_path}\n"
            f"    static_configs:\n      - targets: ['{address}']"
            for job, address in targets.items()
        )
        rules = "".join(f"  - {path}\n" for path in rule_files)
        alerting = (
            "alerting:\n  alertmanagers:\n    - static_configs:\n"
            f"        - targets: ['{alertmanager}']\n"
            if alertmanager
            else ""
        )
        config.write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + alerting
            + f"scrape_configs:\n{jobs}\n"
        )
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
                # firing alerts are re-sent to Alertmanager every second, not every minute
                "--rules.alert.resend-delay=1s",
                *(f"--enable-feature={feature}" for feature in features),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, timeout=30, what="prometheus ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        payload = response.json()
        assert payload["status"] == "success", (promql, payload)
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def exemplars(self, promql: str, start: float, end: float) -> list[dict[str, Any]]:
        """``/api/v1/query_exemplars`` (needs ``features=("exemplar-storage",)``)."""
        response = httpx.get(
            f"{self.url}/api/v1/query_exemplars",
            params={"query": promql, "start": start, "end": end},
            timeout=5,
        )
        payload = response.json()
        assert payload["status"] == "success", (promql, payload)
        result: list[dict[str, Any]] = payload["data"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

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
