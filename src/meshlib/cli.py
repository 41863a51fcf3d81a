"""The ``meshlib`` command.

Subcommands that are planned but not built yet say so plainly and exit with status 2,
rather than pretending to work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from ._config import load_config
from ._exceptions import ConfigError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _not_built(name: str, what: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        print(f"meshlib {name}: not built yet ({what}).", file=sys.stderr)
        return 2

    return run


def _serve(args: argparse.Namespace) -> int:
    """Run an ASGI or WSGI app in the mesh."""
    try:
        from .server._serve import ServeError, serve
    except ImportError as exc:  # pragma: no cover - the `server` extra is missing
        print(f"meshlib serve: {exc}; install meshlib[server]", file=sys.stderr)
        return 1
    try:
        return serve(args.target, host=args.host, port=args.port, workers=args.workers)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"meshlib serve: {line}", file=sys.stderr)
    except ServeError as exc:
        print(f"meshlib serve: {exc}", file=sys.stderr)
    return 1


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the app, as module:attribute (e.g. main:app)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (0: any free port)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")


def _config(args: argparse.Namespace) -> int:
    """Validate the environment and print the effective configuration."""
    try:
        config = load_config()
    except ConfigError as exc:
        for line in exc.errors:
            print(f"meshlib: {line}", file=sys.stderr)
        return 1
    print(f"service:    {config.service_name or '(unset: client only)'}")
    print(f"version:    {config.service_version or '(unset)'}")
    print(f"discovery:  {config.discovery}")
    if config.consul is not None:
        print(f"consul:     {config.consul.address}")
    for name, endpoints in sorted(config.static_services.items()):
        addresses = ", ".join(
            (f"[{e.host}]" if ":" in e.host else e.host)
            + f":{e.port}"
            + (f"*{e.weight}" if e.weight != 1 else "")
            for e in endpoints
        )
        print(f"static:     {name} = {addresses}")
    print(f"tls:        {config.tls}")
    print(f"defaults:   {config.defaults}")
    for key, policy in sorted(config.overrides.items()):
        print(f"override:   {key}: {policy}")
    return 0


_COMMANDS: tuple[tuple[str, str, Handler], ...] = (
    (
        "serve",
        "run an ASGI app (uvicorn) or a WSGI app (gunicorn) in the mesh: registration, "
        "health, graceful drain",
        _serve,
    ),
    (
        "ca",
        "manage the local certificate authority (init, show)",
        _not_built("ca", "it arrives with mTLS"),
    ),
    (
        "rollout",
        "drive a canary, blue/green or A/B release (start, status, promote, abort, pause, resume)",
        _not_built("rollout", "it arrives with traffic management"),
    ),
    (
        "status",
        "show what this process's mesh sees: services, endpoints, ejections, breakers",
        _not_built("status", "it arrives with observability"),
    ),
    (
        "demo",
        "run the weather system on loopback and show the mesh at work",
        _not_built("demo", "it arrives with the weather examples"),
    ),
    ("config", "validate the MESH_*/CONSUL_* environment and print the result", _config),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``meshlib`` command."""
    parser = argparse.ArgumentParser(
        prog="meshlib",
        description="meshlib: a proxyless service mesh for Python.",
    )
    parser.add_argument("--version", action="version", version=f"meshlib {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, help_text, handler in _COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if name == "serve":
            _serve_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshlib`` command; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "handler", None) is _serve:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
