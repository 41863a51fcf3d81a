"""docs/quickstart.md, run as written: its files saved, its shell lines run in one bash with
job control, from its first (a fresh venv, meshlib installed from this checkout as a
non-editable wheel, as a new user would) to its last, and the outputs it quotes checked.

The only departures from the letter are a reader's own: the ports (8001/8002 and the admin
ports 9001/9002) become free ones, as this machine runs other tests at once; Consul's address
is the test agent's; and `pip install '.[fastapi]'` names this checkout instead of `.`.
The test waits for nothing the page does not wait for: the page's own `curl --retry` on
each instance's readiness is the wait.

Installing takes most of the time: ~40 s measured for the venv and `pip install` of the
wheel with its dependencies from pip's cache on a loaded 2-core machine; the calls ~15 s.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from backends import free_port
from consul_agent import ConsulAgent

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"
_LINE = re.compile(
    r"\{'city': 'Oslo', 'forecast': 'sunny', 'port': '(\d+)'\} via 127\.0\.0\.1:(\d+) "
    r"attempts: (\d)"
)


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", QUICKSTART.read_text(), flags=re.S)


def test_the_quickstart_runs_as_written(tmp_path: Path, consul: ConsulAgent) -> None:
    weather, call = blocks("python")[:2]
    (tmp_path / "weather.py").write_text(weather)
    (tmp_path / "call.py").write_text(call)
    ports = {port: str(free_port()) for port in ("8001", "8002", "9001", "9002")}
    a, b = ports["8001"], ports["8002"]
    script = ["set -m", f"cd {tmp_path}"]
    install, *rest = blocks("sh")
    assert "pip install '.[fastapi]'" in install
    script.append(install.replace("'.[fastapi]'", f"'{ROOT}[fastapi]'"))
    for block in rest:
        block = re.sub(r"\b(8001|8002|9001|9002)\b", lambda m: ports[m.group()], block)
        block = block.replace("127.0.0.1:8500", consul.http_addr.removeprefix("http://"))
        for line in block.splitlines():
            if "python3 call.py" in line:
                script.append(f"echo '--- {line}'")
            script.append(line)
    script.append("kill $(jobs -p) 2>/dev/null; wait")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESH_", "CONSUL_", "OTEL_", "PYTHON", "VIRTUAL_ENV"))
    }
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    runs = result.stdout.split("--- ")[1:]
    assert len(runs) == 4, result.stdout + result.stderr
    for run in runs:
        answers = _LINE.findall(run)
        assert len(answers) == 4, run + result.stderr  # every call succeeded
        assert all(port == via for port, via, _ in answers), run
    first, after_kill, mtls, consul_run = ([int(n) for _, _, n in _LINE.findall(r)] for r in runs)
    assert first == [1, 1, 1, 1]
    assert {port for port, _, _ in _LINE.findall(runs[0])} == {a, b}
    assert set(after_kill) <= {1, 2}
    assert after_kill.count(2) <= 1  # "from then on the balancer avoids the dead instance"
    assert {port for port, _, _ in _LINE.findall(runs[1])} == {b}
    assert mtls == [1, 1, 1, 1]
    assert consul_run == [1, 1, 1, 1]
    assert f"meshlib serve: weather (asgi) on http://127.0.0.1:{a} pid" in result.stderr
    assert f"admin on http://127.0.0.1:{ports['9001']}" in result.stderr
    # meshlib came from the wheel, installed into the page's venv
    installed = tmp_path / ".venv" / "lib"
    assert list(installed.glob("python3*/site-packages/meshlib/__init__.py")), result.stderr
    assert not list(installed.glob("python3*/site-packages/*meshlib*.pth")), "editable install"
