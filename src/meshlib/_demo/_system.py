"""The demo's moving parts: the weather system's processes and the traffic through them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .._config import ConsulSettings, MeshConfig, load_config
from ..client import Client
from ._consul_split import ConsulSplit
from ._processes import ServiceProcess, stop_all

__all__ = ["EXAMPLE", "Traffic", "WeatherSystem"]

#: The services the demo runs: examples/fastapi_weather, inside the package when installed from
#: a wheel, else where it stands in a source checkout (an editable install).
EXAMPLE = next(
    (
        directory
        for directory in (
            Path(__file__).resolve().parent / "weather",
            Path(__file__).resolve().parents[3] / "examples" / "fastapi_weather",
        )
        if (directory / "gateway.py").exists()
    ),
    Path(__file__).resolve().parent / "weather",
)
CITIES = ("Oslo", "Bergen", "London", "Paris", "Nairobi", "Tokyo", "Lima", "Sydney")
WORKERS = 4
#: Pause of each worker between two requests: about 30 requests per second in all.
PACE = 0.12


class Traffic:
    """Worker threads sending ``GET http://gateway/forecast`` through the mesh, counted."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.per_instance: Counter[str] = Counter()
        self.versions: dict[str, str] = {}
        self.requests = 0
        self.failures = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"meshlib-demo-{i}", daemon=True)
            for i in range(WORKERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _work(self) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            city = rng.choice(CITIES)
            try:
                r = self.client.get("http://gateway/forecast", params={"city": city})
                body = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as exc:
                self._count(None, f"{type(exc).__name__}: {exc}")
            else:
                if body is None:
                    self._count(None, f"HTTP {r.status_code} for {city}")
                else:
                    self._count(body, "")
            self._stop.wait(PACE)

    def _count(self, body: dict[str, str] | None, error: str) -> None:
        with self._lock:
            self.requests += 1
            if body is None:
                self.failures += 1
                self.last_error = error
            else:
                self.per_instance[body["instance"]] += 1
                self.versions[body["instance"]] = body["version"]


class WeatherSystem:
    """geo, forecast v1 twice and gateway, as ``meshlib serve`` processes."""

    def __init__(self, workdir: Path, otlp_endpoint: str, consul: str | None) -> None:
        self.workdir = workdir
        self.consul = consul
        common = {
            "MESH_TLS": "strict",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            # Trace a few requests, and every request whose caller asked for a trace.
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.02",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            # Connections to a stopping server are the demo's own: do not wait long on them.
            "MESH_DRAIN_TIMEOUT": "3s",
        }
        if consul is None:
            from ..security import LocalCA

            LocalCA(workdir / "ca").init("meshlib.demo")
            common["MESH_TLS_DIR"] = str(workdir / "ca")
            common["MESH_TLS_CA"] = "local"  # a throwaway demo CA: signing in process is fine
            common["MESH_DISCOVERY"] = "static"
        self.common = common
        self.geo = self._process("geo", "geo:app", {"MESH_SERVICE_NAME": "geo"})
        self.forecasts = [
            self._process(
                f"forecast-{i}",
                "forecast:app",
                {"MESH_SERVICE_NAME": "forecast", "MESH_SERVICE_VERSION": "v1"},
            )
            for i in (1, 2)
        ]
        #: forecast v2, the canary: gets traffic only through the splitter
        self.canary: ServiceProcess | None = self._process(
            "forecast-v2",
            "forecast:app",
            {"MESH_SERVICE_NAME": "forecast", "MESH_SERVICE_VERSION": "v2"},
        )
        #: forecast's subsets and split as Consul config entries (Consul mode)
        self.consul_split: ConsulSplit | None = None
        #: why there is no canary step ("" when there is one)
        self.no_canary = ""
        self.gateway: ServiceProcess | None = None
        self.started: list[ServiceProcess] = []
        self.killed_ids: list[str] = []

    def _process(self, label: str, target: str, env: dict[str, str]) -> ServiceProcess:
        log = self.workdir / f"{label}.log"
        return ServiceProcess(label, target, EXAMPLE, {**self.common, **env}, log)

    def start(self) -> None:
        if self.consul is not None:
            self._prepare_consul_split()
        backends = [self.geo, *self.forecasts, *([self.canary] if self.canary else [])]
        self.started.extend(backends)
        for process in backends:
            process.spawn()
        for process in backends:
            process.wait_ready()
        gateway_env = {
            "MESH_SERVICE_NAME": "gateway",
            # Round robin keeps sending the killed instance its share until outlier detection
            # ejects it, so the ejection shows; the default (p2c_ewma) quietly stops picking
            # an instance that fails. Ejection is short so its return shows within the demo.
            "MESH_LB": "round_robin",
            "MESH_OUTLIER_EJECTION_TIME": "5s",
        }
        if self.consul is None:
            gateway_env["MESH_STATIC_SERVICES"] = f"geo={self.geo.address}"
            # forecast's instances, subsets and split come from the local config file
            gateway_env["MESH_CONFIG_FILE"] = str(self.split(100, 0))
        self.gateway = self._process("gateway", "gateway:app", gateway_env)
        self.started.append(self.gateway)
        self.gateway.start()
        if self.consul is not None:
            forecasts = len(self.forecasts) + (1 if self.canary else 0)
            self._wait_passing({"geo": 1, "forecast": forecasts, "gateway": 1})

    def _prepare_consul_split(self) -> None:
        """forecast v1 as the default subset in Consul before any v2 instance registers,
        so the canary gets no traffic until the split gives it some."""
        self.consul_split = ConsulSplit(self._consul_settings())
        self.consul_split.prepare()
        if self.consul_split.refusal:
            self.no_canary = self.consul_split.refusal
            self.canary = None  # without our resolver it would get an equal share at once

    def split(self, v1: int, v2: int) -> Path | None:
        """Send forecast ``v1``/``v2`` percent to its v1/v2 subsets: a service-splitter in
        Consul, or in the gateway's local config file (written atomically, as a rollout
        controller would; the gateway sees it within 0.5 s)."""
        assert self.canary is not None
        if self.consul_split is not None:
            self.consul_split.split(v1, v2)
            return None
        instances = [{"address": f.address, "meta": {"version": "v1"}} for f in self.forecasts] + [
            {"address": self.canary.address, "meta": {"version": "v2"}}
        ]
        document = {
            "services": {"forecast": instances},
            "config_entries": [
                {
                    "Kind": "service-resolver",
                    "Name": "forecast",
                    "DefaultSubset": "v1",
                    "Subsets": {
                        "v1": {"Filter": "Service.Meta.version == v1"},
                        "v2": {"Filter": "Service.Meta.version == v2"},
                    },
                },
                {
                    "Kind": "service-splitter",
                    "Name": "forecast",
                    "Splits": [
                        {"Weight": v1, "ServiceSubset": "v1"},
                        {"Weight": v2, "ServiceSubset": "v2"},
                    ],
                },
            ],
        }
        path = self.workdir / "mesh.json"
        tmp = self.workdir / "mesh.json.tmp"
        tmp.write_text(json.dumps(document, indent=2))
        os.replace(tmp, path)
        return path

    def _wait_passing(self, wanted: dict[str, int], timeout: float = 30.0) -> None:
        """Wait until Consul's checks pass (an instance registers as critical until then)."""
        with self._consul_client() as client:
            deadline = time.monotonic() + timeout
            for name, count in wanted.items():
                while len(client.health.service(name, passing=True)[1]) < count:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: fewer than {count} passing in Consul")
                    time.sleep(0.2)  # Consul checks every MESH_HEALTH_INTERVAL (2 s)

    def client_config(self) -> MeshConfig:
        """The demo's own mesh identity (``demo``), calling the gateway through the mesh."""
        assert self.gateway is not None
        env = {k: v for k, v in os.environ.items() if k.startswith("CONSUL_")}
        env.update(
            {k: v for k, v in self.common.items() if k.startswith("MESH_")},
            MESH_SERVICE_NAME="demo",
        )
        if self.consul is None:
            env["MESH_STATIC_SERVICES"] = f"gateway={self.gateway.address}"
        return load_config(env)

    def kill(self, process: ServiceProcess) -> None:
        process.kill()
        self.killed_ids.append(f"forecast-127.0.0.1-{process.port}")

    def restart(self, process: ServiceProcess) -> None:
        """The same instance again: on the same port with static discovery (the list is fixed)."""
        if self.consul is not None:
            process.port = 0
        process.start()

    def stop(self) -> None:
        stop_all(self.started)
        if self.consul is not None and self.killed_ids:
            self._deregister_killed()
        if self.consul_split is not None:
            try:
                self.consul_split.close()
            except Exception as exc:
                print(f"meshlib demo: could not remove its Consul entries: {exc}", file=sys.stderr)

    def _deregister_killed(self) -> None:
        """A killed instance could not deregister itself: do it for it."""
        try:
            with self._consul_client() as client:
                for service_id in self.killed_ids:
                    client.agent.service.deregister(service_id)
        except Exception as exc:
            print(f"meshlib demo: could not deregister {self.killed_ids}: {exc}", file=sys.stderr)

    def _consul_settings(self) -> ConsulSettings:
        """The ``CONSUL_*`` settings of this environment."""
        config = load_config({k: v for k, v in os.environ.items() if k.startswith("CONSUL_")})
        assert config.consul is not None
        return config.consul

    @contextlib.contextmanager
    def _consul_client(self) -> Iterator[Any]:
        """A py-consul client of the agent at CONSUL_HTTP_ADDR."""
        from ..instance._py_consul import agent_client

        client = agent_client(self._consul_settings())
        try:
            yield client
        finally:
            client.http.session.close()
