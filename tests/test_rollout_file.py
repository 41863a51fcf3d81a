"""``meshlib rollout`` without Consul or Prometheus: the local config file is the control
plane and the instances' own ``/mesh/metrics`` the metric source.

Real parts: three ``meshlib serve`` apps (v1; a healthy v2; a v3 answering 503 half the
time) listed in a ``MESH_CONFIG_FILE``, a caller (``meshlib.Client`` reading that file) that
sends its requests through the file's splitter the whole time, and the controller run as
the real command in its own process. The tests read the file back, the state beside it,
and which versions the caller reached.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib._config import load_config
from meshlib.rollout import Settings
from meshlib.rollout._controller import begin
from meshlib.rollout._file import FileStateStore
from meshlib.rollout._hooks import ask
from meshlib.rollout._scrape import quantile
from polling import wait_until
from served import Served
from test_rollout import Controller

#: Every check: 1 s apart, over the last 1 s (scraped at each check: no scrape interval).
FAST = ("--interval", "1s", "--window", "1s", "--max-p99", "5s", "--json")
SERVICE = "shop"


class Caller:
    """A meshlib client reading the file, calling the service through its split."""

    def __init__(self, config_file: Path) -> None:
        self.config = load_config({"MESH_CONFIG_FILE": str(config_file)})
        #: (time.time(), version or None, status) of the requests without the beta header
        self.seen: list[tuple[float, str | None, int]] = []
        #: versions reached by the requests with ``x-beta: 1`` (every other one)
        self.beta: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with meshlib.Client(config=self.config, timeout=10) as client:
            while not self._stop.is_set() and len(self.seen) < 100_000:
                for headers in ({}, {"x-beta": "1"}):
                    try:
                        response = client.get(f"http://{SERVICE}/work", headers=headers)
                        ok = response.is_success
                        version = response.json().get("version") if ok else None
                        status = response.status_code
                    except Exception:
                        version, status = None, 0
                    if headers:
                        self.beta.append(version)
                    else:
                        self.seen.append((time.time(), version, status))
                    self._stop.wait(0.005)  # pacing: some 100 requests/s

    def since(self, moment: float) -> list[str | None]:
        return [version for at, version, _ in list(self.seen) if at >= moment]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


class FileMesh:
    """The three versions, the config file listing them, and the caller."""

    def __init__(self, path: Path, document: dict[str, Any], caller: Caller) -> None:
        self.path = path
        self.document = document
        self.caller = caller
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CONSUL_HTTP_ADDR", "MESH_ROLLOUT_PROMETHEUS_URL")
        }
        self.env["MESH_CONFIG_FILE"] = str(path)

    def split(self) -> dict[str, int] | None:
        for entry in json.loads(self.path.read_text())["config_entries"]:
            if entry["Kind"] == "service-splitter":
                return {s["ServiceSubset"]: s["Weight"] for s in entry["Splits"]}
        return None

    def router(self) -> dict[str, Any] | None:
        for entry in json.loads(self.path.read_text())["config_entries"]:
            if entry["Kind"] == "service-router":
                return entry  # type: ignore[no-any-return]
        return None

    def state(self) -> dict[str, Any] | None:
        path = Path(f"{self.path}.rollouts/{SERVICE}.json")
        if not path.exists():
            return None
        return json.loads(path.read_text())["state"]  # type: ignore[no-any-return]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshlib", "rollout", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def controller(self, *args: str) -> Controller:
        return Controller(self.env, ["start", SERVICE, *args])

    def reset(self) -> None:
        self.path.write_text(json.dumps(self.document, indent=2))
        shutil.rmtree(f"{self.path}.rollouts", ignore_errors=True)


@pytest.fixture(scope="module")
def file_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileMesh]:
    versions = {"v1": "0", "v2": "0", "v3": "50"}
    apps = [
        Served(
            "canary_app:app",
            {
                "MESH_SERVICE_NAME": SERVICE,
                "MESH_SERVICE_VERSION": version,
                "MESH_TEST_FAIL_PERCENT": fail,
            },
        )
        for version, fail in versions.items()
    ]
    caller: Caller | None = None
    try:
        for app in apps:
            app.start()
        document = {
            "services": {
                SERVICE: [
                    {
                        "address": app.address,
                        "meta": {"version": version, "admin-port": str(app.admin_port)},
                    }
                    for version, app in zip(versions, apps, strict=True)
                ]
            },
            "config_entries": [
                {
                    "Kind": "service-resolver",
                    "Name": SERVICE,
                    "DefaultSubset": "v1",
                    "Subsets": {v: {"Filter": f"Service.Meta.version == {v}"} for v in versions},
                }
            ],
        }
        path = tmp_path_factory.mktemp("mesh") / "mesh.json"
        path.write_text(json.dumps(document, indent=2))
        caller = Caller(path)
        wait_until(lambda: len(caller.seen) >= 50, timeout=30, what="the caller's traffic")
        yield FileMesh(path, document, caller)
    finally:
        if caller is not None:
            caller.stop()
        for app in apps:
            app.stop()


@pytest.fixture
def mesh(file_mesh: FileMesh) -> Iterator[FileMesh]:
    file_mesh.reset()
    yield file_mesh
    file_mesh.reset()


def _all_on(mesh: FileMesh, version: str, since: float, count: int = 50) -> bool:
    seen = mesh.caller.since(since)
    return len(seen) >= count and set(seen[-count:]) == {version}


def test_a_canary_in_the_local_file_is_promoted_and_a_failing_one_rolled_back(
    mesh: FileMesh,
) -> None:
    """No Consul, no Prometheus: the controller steps the file's splitter on the instances'
    own metrics; the caller (reading the file) follows within a second or two."""
    controller = mesh.controller("--canary", "v2", "--step", "50", *FAST)
    code, err = controller.finish()
    assert code == 0, err
    events = controller.events()
    assert events[0]["event"] == "started"
    assert events[-1]["event"] == "promoted"
    passed = [e for e in events if e["verdict"] == "passed"]
    assert len(passed) == 2, events
    assert all(e["metrics"]["success_rate"] == 100 and e["metrics"]["requests"] > 0 for e in passed)
    assert mesh.split() == {"v1": 0, "v2": 100}
    assert (mesh.state() or {})["phase"] == "promoted"
    written = mesh.path.stat().st_mtime
    wait_until(lambda: _all_on(mesh, "v2", written), timeout=10, what="the caller on v2 alone")
    last_v1 = max(at for at, version, _ in mesh.caller.seen if version == "v1")
    print(f"the caller's last request to v1: {last_v1 - written:+.2f}s after the file's write")

    mesh.reset()  # back to v1 alone
    bad = mesh.controller("--canary", "v3", "--step", "20", "--threshold", "2", *FAST)
    code, err = bad.finish()
    assert code == 1, err
    events = bad.events()
    failed = [e for e in events if e["verdict"] == "failed"]
    assert len(failed) == 2, events
    assert all(e["metrics"]["success_rate"] < 99 for e in failed)
    assert events[-1]["event"] == "rolled-back"
    assert mesh.split() == {"v1": 100, "v3": 0}
    rolled_back = time.time()
    wait_until(lambda: _all_on(mesh, "v1", rolled_back), timeout=10, what="the caller on v1")


def test_a_killed_file_controller_resumes_and_the_lock_refuses_a_second(mesh: FileMesh) -> None:
    first = mesh.controller("--canary", "v2", "--step", "5", *FAST)
    try:
        wait_until(
            lambda: (mesh.state() or {}).get("step", 0) >= 2, timeout=60, what="two passed checks"
        )
        second = mesh.run("start", SERVICE, "--canary", "v2", *FAST)
        assert second.returncode == 1
        assert second.stderr.startswith(
            f"meshlib rollout: another controller is driving '{SERVICE}' "
            f"(pid {first.proc.pid} on host "
        )
        assert second.stderr.count("\n") == 1
        status = json.loads(mesh.run("status", SERVICE, "--json").stdout)
        assert status["controller"].startswith(f"pid {first.proc.pid} on host ")
    finally:
        first.kill()  # kill -9: the kernel drops its flock
    killed = mesh.state()
    assert killed is not None
    assert killed["phase"] == "progressing"
    assert mesh.split() == {"v1": 100 - killed["weight"], "v2": killed["weight"]}

    again = mesh.controller("--canary", "v2", "--step", "5", *FAST)
    try:
        resumed = wait_until(
            lambda: [e for e in again.events() if e["event"] == "resumed"],
            timeout=30,
            what="resumed",
        )[0]
        assert (resumed["step"], resumed["weight"]) == (killed["step"], killed["weight"])
        wait_until(
            lambda: (mesh.state() or {}).get("step", 0) > killed["step"],
            timeout=60,
            what="the resumed controller to pass one more check",
        )
        promoted = mesh.run("promote", SERVICE, "--json")  # reaches the running controller
        assert promoted.returncode == 0, promoted.stderr
        code, err = again.finish()
        assert code == 0, err
    finally:
        again.kill()
    assert mesh.split() == {"v1": 0, "v2": 100}
    assert json.loads(mesh.run("status", SERVICE, "--json").stdout)["controller"] is None


def test_an_ab_release_routes_the_header_in_the_file_until_it_is_promoted(mesh: FileMesh) -> None:
    controller = mesh.controller(
        "--canary", "v2", "--mode", "ab", "--header", "x-beta=1", "--iterations", "2", *FAST
    )
    try:
        wait_until(lambda: mesh.router() is not None, timeout=30, what="the A/B route")
        assert mesh.split() == {"v1": 100, "v2": 0}
        # the caller reads the file within half a second: then beta users are on v2 alone
        wait_until(lambda: mesh.caller.beta[-20:] == ["v2"] * 20, timeout=10, what="beta on v2")
        routed = len(mesh.caller.beta)
        wait_until(lambda: len(mesh.caller.beta) >= routed + 30, timeout=30, what="beta traffic")
        assert set(mesh.caller.beta[routed : routed + 30]) == {"v2"}
        code, err = controller.finish()
    finally:
        controller.kill()
    assert code == 0, err
    assert controller.events()[-1]["event"] == "promoted"
    assert mesh.split() == {"v1": 0, "v2": 100}
    assert mesh.router() is None  # the controller's own router is gone with its route


class HookServer:
    """A real HTTP server on loopback recording the hooks' POSTs; answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                hooks.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hooks.status)
                self.send_header("content-length", "8")
                self.end_headers()
                self.wfile.write(b"not yet\n")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_failing_pre_rollout_hook_moves_no_weight_and_gives_up_after_the_threshold(
    mesh: FileMesh, tmp_path: Path
) -> None:
    hooks = HookServer()
    hooks.status = 503
    try:
        result = mesh.run(
            "start", SERVICE, "--canary", "v2", "--threshold", "2", *FAST,
            "--pre-rollout", hooks.url,
        )  # fmt: skip
    finally:
        hooks.close()
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"meshlib rollout: pre-rollout hook {hooks.url} answered 503: not yet (1/2); "
        "asking again in 1s",
        f"meshlib rollout: pre-rollout hook {hooks.url} answered 503: not yet (2/2): "
        "the rollout did not start, no weight was moved",
    ]
    assert [b["phase"] for b in hooks.bodies] == ["pre-rollout", "pre-rollout"]
    assert hooks.bodies[0] == {
        "name": SERVICE, "phase": "pre-rollout", "mode": "canary", "canary": "v2",
        "stable": "v1", "version": "v2", "weight": 0, "checks_passed": 0,
    }  # fmt: skip
    assert mesh.split() is None  # no splitter was ever written
    assert mesh.state() is None
    assert set(mesh.caller.since(time.time() - 1)) == {"v1"}

    # a command that is not there is one line too
    missing = mesh.run(
        "start", SERVICE, "--canary", "v2", "--threshold", "1", *FAST,
        "--pre-rollout", str(tmp_path / "no-such-check"),
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr == (
        f"meshlib rollout: pre-rollout hook `{tmp_path / 'no-such-check'}`: command not found "
        "(1/1): the rollout did not start, no weight was moved\n"
    )


def test_blue_green_in_the_file_waits_for_its_confirm_promotion_gate(
    mesh: FileMesh, tmp_path: Path
) -> None:
    """Blue/green from the file: the canary stays at 0% of the split while its checks (on the
    beta users' test traffic) pass, the pre-rollout URL having passed first; promotion waits
    for the gate (a command), the checks going on, until the gate opens."""
    gate, asked = tmp_path / "gate", tmp_path / "asked"
    command = (
        f'sh -c \'echo "$MESH_ROLLOUT_PHASE $MESH_ROLLOUT_CANARY $MESH_ROLLOUT_WEIGHT" >> {asked}; '
        f"test -e {gate} || {{ echo gate closed >&2; exit 3; }}'"
    )
    hooks = HookServer()
    controller = mesh.controller(
        "--canary", "v2", "--mode", "blue-green", "--iterations", "2", *FAST,
        "--header", "x-beta=1",  # the test traffic the checks judge
        "--pre-rollout", hooks.url, "--confirm-promotion", command,
    )  # fmt: skip
    try:
        held = wait_until(
            lambda: [e for e in controller.events() if "promotion waits" in e["message"]][2:],
            timeout=60,
            what="three checks held at the gate",
        )
        assert hooks.bodies
        assert hooks.bodies[0]["phase"] == "pre-rollout"
        assert hooks.bodies[0]["mode"] == "blue-green"
        assert held[0]["message"].endswith(
            f"promotion waits: confirm-promotion hook `{command}` exited 3: gate closed"
        )
        assert all(e["phase"] == "progressing" and e["verdict"] == "passed" for e in held)
        assert mesh.split() == {"v1": 100, "v2": 0}
        assert set(mesh.caller.since(time.time() - 1)) == {"v1"}
        gate.touch()
        code, err = controller.finish()
    finally:
        controller.kill()
        hooks.close()
    assert code == 0, err
    events = controller.events()
    assert events[-1]["event"] == "promoted"
    assert events[-1]["message"].startswith("promoted after ")
    assert mesh.split() == {"v1": 0, "v2": 100}
    assert set(asked.read_text().splitlines()) == {"confirm-promotion v2 0"}
    assert len(hooks.bodies) == 1  # asked once, before the rollout started
    promoted = time.time()
    wait_until(lambda: _all_on(mesh, "v2", promoted), timeout=10, what="the caller on v2")


def test_a_hook_that_hangs_or_is_not_there_fails_in_one_line(tmp_path: Path) -> None:
    state = begin("shop", Settings(mode="canary", canary="v2", stable="v1", canary_version="v2"), 1)
    assert ask("sleep 5", "confirm-promotion", state, 0.3) == "`sleep 5` did not finish within 0.3s"
    assert ask("true", "confirm-promotion", state, 5) is None
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/gate"
    try:
        why = ask(url, "pre-rollout", state, 2)
    finally:
        closed.close()
    assert why is not None
    assert why.startswith(f"{url} failed: ")
    assert ask("'unbalanced", "pre-rollout", state, 2) == (
        "`'unbalanced` cannot be split into arguments: No closing quotation"
    )


def test_the_file_state_store_is_a_check_and_set(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path, "shop")
    state = begin("shop", Settings(mode="canary", canary="v2", stable="v1", canary_version="v2"), 1)
    assert store.load() == (None, 0)
    assert store.save(state, 0)
    assert not store.save(state.replace(weight=50), 0)  # a stale write fails
    loaded, index = store.load()
    assert (loaded, index) == (state, 1)
    assert store.save(state.replace(weight=50), 1)
    assert store.wait(1, 5.0)[1] == 2  # changed already: no waiting


def test_scraped_p99_is_interpolated_as_histogram_quantile_does() -> None:
    buckets = {0.1: 50.0, 0.5: 100.0, math.inf: 100.0}
    assert quantile(0.99, buckets) == pytest.approx(0.1 + 0.4 * 49 / 50)
    assert quantile(0.99, {0.1: 0.0, 0.5: 50.0, math.inf: 100.0}) == 0.5  # past the last bound
    assert quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
