"""Sessions: tests, lint, typing, docs (the default set), and demo, bench, chaos, soak."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typing", "tests", "docs"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def _consul(session: nox.Session) -> str:
    """Find or build the Consul binary the tests use (first time: a Go build, minutes)."""
    out = session.run("python", "tests/consul_binary.py", silent=True, log=False)
    assert isinstance(out, str)
    path = out.strip().splitlines()[-1]
    session.log(f"consul: {path}")
    return path


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, against a real Consul agent (built with Go on first use)."""
    session.install("-e", ".[test]")
    consul = _consul(session)
    session.run(
        "pytest",
        "-m",
        "not soak",
        *session.posargs,
        env={"MESH_TEST_CONSUL": consul},
    )


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Long soak tests, kept out of the default run."""
    session.install("-e", ".[test]")
    consul = _consul(session)
    session.run("pytest", "-m", "soak", *session.posargs, env={"MESH_TEST_CONSUL": consul})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typing(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[server]", "mypy")
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
    session.install("-e", ".[test]")
    consul = _consul(session)
    session.run("python", "bench/perf.py", *session.posargs, env={"MESH_TEST_CONSUL": consul})


@nox.session(python=PYTHON)
def chaos(session: nox.Session) -> None:
    """Chaos scenarios on loopback, counting lost requests; `-- --quick` shortens them."""
    session.install("-e", ".[test]")
    consul = _consul(session)
    session.run("python", "bench/chaos.py", *session.posargs, env={"MESH_TEST_CONSUL": consul})
