"""Sessions: tests, lint, typing, docs (the default set), and demo, bench, chaos, soak."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

# tests/tools.py finds or builds Consul, Prometheus and Alertmanager (stdlib only)
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
import tools

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typing", "tests", "docs"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def _tools(session: nox.Session, *names: str) -> dict[str, str]:
    """Find or build the programs the tests run (first time: Go builds, minutes, with progress).

    Returns ``MESH_TEST_<NAME>`` variables for the test run. A tool that cannot be had is left
    out: the tests that need it skip with a line saying how to get it (and fail the run when
    ``MESH_TEST_REQUIRE_TOOLS`` is set, as in CI).
    """
    env: dict[str, str] = {}
    for name in names or tuple(tools.TOOLS):
        try:
            path = tools.find_tool(name)
        except tools.ToolUnavailable as exc:
            session.warn(f"{name}: {exc}")
            continue
        session.log(f"{name}: {path}")
        env[f"MESH_TEST_{name.upper()}"] = path
    return env


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, against a real Consul agent (built with Go on first use)."""
    session.install("-e", ".[test]")
    env = _tools(session)
    session.run("pytest", "-m", "not soak", *session.posargs, env=env)


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Long soak tests, kept out of the default run."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "soak", *session.posargs, env=_tools(session))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[server]", "mypy", "pytest")  # pytest: meshlib.testing.plugin
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    session.install("-e", ".[docs]")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", os.path.join(session.create_tmp(), "site")
    )


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The weather mesh on loopback, about a minute; `-- --duration 20s` for a shorter one."""
    session.install("-e", ".[demo]")
    session.run("meshlib", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against bare httpx (docs/performance.md); `-- --quick` only proves they run."""
    session.install("-e", ".[test]", "aiohttp")  # aiohttp: row 2b's yardstick
    env = _tools(session, "consul")
    session.run("python", "bench/perf.py", *session.posargs, env=env)
    # row 1's added time, stage by stage (docs/performance.md, "Where row 1's time goes")
    requests = "1000" if "--quick" in session.posargs else "20000"
    session.run("python", "bench/stages.py", "--requests", requests, env=env)


@nox.session(python=PYTHON)
def chaos(session: nox.Session) -> None:
    """Chaos scenarios on loopback, counting lost requests; `-- --quick` shortens them."""
    session.install("-e", ".[test]")
    env = _tools(session, "consul")
    session.run("python", "bench/chaos.py", *session.posargs, env=env)
