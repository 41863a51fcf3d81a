"""docs/quickstart.md, run as written: its files saved, its shell lines run in one bash with
job control, and the outputs it quotes checked.

Two departures from the letter, both a reader's own: the ports 8001/8002 become free ones
(this machine runs other tests at once) and Consul's address is the test agent's; and
before each `python3 call.py` the script waits for the instances it just started to
listen, as a person typing does without noticing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from backends import free_port
from consul_agent import ConsulAgent

QUICKSTART = Path(__file__).parent.parent / "docs" / "quickstart.md"
_LINE = re.compile(
    r"\{'city': 'Oslo', 'forecast': 'sunny', 'port': '(\d+)'\} via 127\.0\.0\.1:(\d+) "
    r"attempts: (\d)"
)


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", QUICKSTART.read_text(), flags=re.S)


def wait_for(*ports: int) -> str:
    checks = ", ".join(str(p) for p in ports)
    return (
        f'{sys.executable} -c "import socket,sys,time\n'
        f"for p in ({checks},):\n"
        "    for _ in range(600):\n"
        "        try: socket.create_connection(('127.0.0.1', p), 0.2).close(); break\n"
        '        except OSError: time.sleep(0.05)"\n'
    )


def wait_healthy(consul: ConsulAgent) -> str:
    url = f"{consul.http_addr}/v1/health/service/weather?passing=1"
    return (
        f'{sys.executable} -c "import json,time,urllib.request\n'
        "for _ in range(600):\n"
        f"    if len(json.load(urllib.request.urlopen('{url}'))) == 2: break\n"
        '    time.sleep(0.1)"\n'
    )


def test_the_quickstart_runs_as_written(tmp_path: Path, consul: ConsulAgent) -> None:
    weather, call = blocks("python")[:2]
    (tmp_path / "weather.py").write_text(weather)
    (tmp_path / "call.py").write_text(call)
    a, b = free_port(), free_port()
    script = ["set -m", f"cd {tmp_path}"]
    for block in blocks("sh")[1:]:  # the first installs meshlib: the test's venv has it
        block = block.replace("8001", str(a)).replace("8002", str(b))
        block = block.replace("127.0.0.1:8500", consul.http_addr.removeprefix("http://"))
        for line in block.splitlines():
            if "python3 call.py" in line:
                script.append(wait_for(b) if "kill -9" in script[-1] else wait_for(a, b))
                if "CONSUL_HTTP_ADDR" in block:  # and for Consul to call both healthy
                    script.append(wait_healthy(consul))
                script.append(f"echo '--- {line}'")
            script.append(line)
    script.append("kill $(jobs -p) 2>/dev/null; wait")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
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
    assert {port for port, _, _ in _LINE.findall(runs[0])} == {str(a), str(b)}
    assert set(after_kill) <= {1, 2}
    assert after_kill.count(2) <= 1  # "from then on the balancer avoids the dead instance"
    assert {port for port, _, _ in _LINE.findall(runs[1])} == {str(b)}
    assert mtls == [1, 1, 1, 1]
    assert consul_run == [1, 1, 1, 1]
    assert f"meshlib serve: weather (asgi) on http://127.0.0.1:{a} pid" in result.stderr
