"""The ``meshlib`` command: serve, ca, rollout, status, top, dashboard, demo and config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from ._check import run_checks, settings_table
from ._config import load_config, parse_duration
from ._exceptions import ConfigError

if TYPE_CHECKING:
    from . import rollout
    from .security import LocalCA

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


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
        if exc.detail:
            print(exc.detail, end="", file=sys.stderr)
        print(f"meshlib serve: {exc}", file=sys.stderr)
    return 1


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the app, as module:attribute (e.g. main:app)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (0: any free port)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")


def _ca(args: argparse.Namespace) -> int:
    """Manage the local CA in MESH_TLS_DIR."""
    import datetime as dt
    import os
    from pathlib import Path

    from .security import LocalCA

    directory = Path(args.dir or os.environ.get("MESH_TLS_DIR") or "~/.local/share/meshlib/ca")
    ca = LocalCA(directory.expanduser())
    if args.action == "serve":
        return _ca_serve(ca, args)
    try:
        if args.action == "init":
            ca.init(args.trust_domain)
            print(f"created a CA for trust domain {args.trust_domain} in {ca.directory}")
        elif args.action == "rotate":
            ca.rotate(drop_old=args.drop_old, grace=args.grace, leaf_ttl=args.leaf_ttl)
            print(
                "dropped retired roots"
                if args.drop_old
                else f"rotated: a new root is trusted now and signs in {args.grace:g}s"
            )
        info = ca.load_info()
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"meshlib ca: {exc}", file=sys.stderr)
        return 1
    now = dt.datetime.now(dt.UTC)
    print(f"directory:    {info.directory}")
    print(f"trust domain: {info.trust_domain}")
    if info.signing_after > now.timestamp():
        switch = dt.datetime.fromtimestamp(info.signing_after, dt.UTC)
        print(f"rotation:     the newest root signs from {switch:%Y-%m-%d %H:%M:%S} UTC")
    for cert in info.roots:
        role = "signing" if cert == info.signer else "trusted"
        left = cert.not_valid_after_utc - now
        print(
            f"root ({role}): {cert.subject.rfc4514_string()}  serial {cert.serial_number:x}  "
            f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({left.days} days)"
        )
    print("leaves:       issued by `meshlib ca serve` to each service, lifetime MESH_TLS_LEAF_TTL")
    return 0


def _ca_serve(ca: LocalCA, args: argparse.Namespace) -> int:
    """Run the signer: leaves for the services the policy file entitles each user to."""
    import os
    import signal
    import threading

    from .security._signer import SignerPolicy, SignerServer

    if not args.policy:
        print(
            "meshlib ca serve: expected --policy FILE (user service ... per line)", file=sys.stderr
        )
        return 2
    socket_path = args.socket or os.environ.get("MESH_TLS_SIGNER") or "/run/meshlib/signer.sock"
    try:
        policy = SignerPolicy.load(args.policy)
        ca.check_private()
        server = SignerServer(ca, policy, socket_path, max_ttl=args.leaf_ttl)
    except (OSError, ValueError) as exc:
        print(f"meshlib ca serve: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(
        f"meshlib ca: signing for {server.trust_domain} on {socket_path} pid {os.getpid()}",
        flush=True,
    )
    stop.wait()
    server.close()
    return 0


def _ca_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("init", "show", "rotate", "serve"), help="what to do")
    parser.add_argument(
        "--socket", help="serve: the signer's Unix socket (default: MESH_TLS_SIGNER)"
    )
    parser.add_argument(
        "--policy", help="serve: file of `user service [service ...]` lines (who may hold what)"
    )
    parser.add_argument("--dir", help="the CA directory (default: MESH_TLS_DIR)")
    parser.add_argument(
        "--trust-domain", default="meshlib.local", help="trust domain for init (meshlib.local)"
    )
    parser.add_argument(
        "--drop-old", action="store_true", help="rotate: stop trusting retired roots"
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        help="rotate: how long every process trusts the new root before it signs (10s)",
    )
    parser.add_argument(
        "--leaf-ttl",
        type=_seconds,
        default=8 * 3600.0,
        help="rotate --drop-old: the longest leaf lifetime in use; serve: the longest it "
        "grants (8h)",
    )


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 250ms, 2s, 1m"
        ) from None


def _top(args: argparse.Namespace) -> int:
    """The service graph from Prometheus: requests/s, success rate and p99 per edge."""
    from .telemetry._top import run

    return run(args.prometheus, once=args.once, interval=args.interval, window=args.window)


def _top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prometheus",
        default="http://127.0.0.1:9090",
        help="Prometheus base URL (default http://127.0.0.1:9090)",
    )
    parser.add_argument("--once", action="store_true", help="print once and exit")
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws (default 2)"
    )
    parser.add_argument(
        "--window", default="1m", help="PromQL range for rates and p99 (default 1m)"
    )


def _status(args: argparse.Namespace) -> int:
    """What a running process's mesh sees: its ``/mesh/status``, as a table or JSON."""
    import json
    import ssl

    import httpx

    from ._status import render

    # host:port alone is the admin listener's address as MESH_ADMIN_ADDR and `meshlib serve`
    # print it: plaintext, whatever MESH_TLS says
    url = httpx.URL(args.url if "://" in args.url else f"http://{args.url}")
    if url.path in ("", "/"):
        url = url.copy_with(path="/mesh/status")
    verify: ssl.SSLContext | bool = True
    if url.scheme == "https":
        # a strict-mTLS server asks for a mesh certificate: present this environment's
        from .security import Security

        security = Security(load_config())
        tls = security.tls
        verify = tls.client if tls is not None else True
        security.close()  # the context holds the leaf: renewal is not needed for one call
    try:
        response = httpx.get(url, timeout=args.timeout, verify=verify)
        if response.status_code in (400, 404) and (
            "x-mesh-tls-required" in response.headers or url.path.startswith("/mesh/")
        ):
            print(
                f"meshlib status: {url.netloc.decode()} does not serve {url.path} (HTTP "
                f"{response.status_code}): is it the app's port? /mesh/status is on the "
                "admin listener, MESH_ADMIN_ADDR ('admin on …' when `meshlib serve` is up)",
                file=sys.stderr,
            )
            return 1
        response.raise_for_status()
        report = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"meshlib status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render(report))
    return 0


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        help="a process's admin listener (MESH_ADMIN_ADDR, printed by `meshlib serve`, "
        "e.g. 127.0.0.1:9901 or http://127.0.0.1:9901); /mesh/status is read from it",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--timeout", type=_seconds, default=5.0, help="default 5s")


def _rollout(args: argparse.Namespace) -> int:
    """Drive a canary, blue/green or A/B release through Consul's routing entries."""
    from . import rollout
    from ._config import ConsulSettings

    action = getattr(args, "action", None)
    if action is None:
        args.rollout_parser.print_help()
        return 2
    try:
        config = load_config()
    except ConfigError as exc:
        for line in exc.errors:
            print(f"meshlib rollout: {line}", file=sys.stderr)
        return 1
    # Without Consul, the local config file is the control plane; otherwise, like Consul's
    # own CLI, an unset CONSUL_HTTP_ADDR means the local agent.
    api: rollout.ConsulAPI | None = None
    plane: rollout.ControlPlane
    if config.consul is None and config.config_file:
        plane = rollout.FilePlane(config.config_file)
    else:
        api = rollout.ConsulAPI(config.consul or ConsulSettings(address="http://127.0.0.1:8500"))
        plane = rollout.ConsulPlane(api)
    try:
        if action == "status":
            return rollout.status(plane, args.service, json_lines=args.json)
        view = rollout.make_view(json_lines=args.json)
        if action != "start":
            return rollout.run_command(plane, args.service, args.action, view)
        prometheus = args.prometheus or config.rollout_prometheus_url
        source: rollout.PrometheusSource | rollout.AdminScrapeSource
        if prometheus is None and api is None:  # no Prometheus given, no Consul: scrape
            source = rollout.AdminScrapeSource()
        else:
            source = rollout.PrometheusSource(prometheus or "http://127.0.0.1:9090")
        try:
            return rollout.start(plane, source, args.service, _rollout_options(args), view)
        finally:
            source.close()
    except rollout.RolloutError as exc:
        print(f"meshlib rollout: {exc}", file=sys.stderr)
        return 1
    finally:
        if api is not None:
            api.close()


def _rollout_options(args: argparse.Namespace) -> rollout.Options:
    from . import rollout

    match = None
    if args.header or args.cookie:
        kind, text = ("header", args.header) if args.header else ("cookie", args.cookie)
        name, _, value = text.partition("=")
        match = rollout.Match(kind, name.strip(), value.strip())
    return rollout.Options(
        canary=args.canary,
        mode=args.mode,
        stable=args.stable,
        step=args.step,
        max_weight=args.max_weight,
        interval=args.interval,
        window=args.window,
        iterations=args.iterations,
        min_success_rate=args.min_success_rate,
        max_p99=args.max_p99,
        threshold=args.threshold,
        match=match,
        pre_rollout=tuple(args.pre_rollout or ()),
        confirm_promotion=tuple(args.confirm_promotion or ()),
        hook_timeout=args.hook_timeout,
    )


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip().removesuffix("%"))
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a number from {low:g} to {high:g}"
            )
        return value

    return parse


def _match(text: str) -> str:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=value")
    return text


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(rollout_parser=parser)
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action")
    start = actions.add_parser(
        "start",
        help="start a rollout (or resume the one in progress) and drive it to the end",
        description="Step the canary's share of the service-splitter, checking its metrics "
        "each interval; promote when the last check passes, roll back after --threshold "
        "failed checks or --threshold inconclusive checks in a row. Before any weight moves, "
        "Prometheus must scrape the canary's and the stable version's instances, and "
        "--interval and --window must span at least four of its scrapes. Without Consul, "
        "with MESH_CONFIG_FILE, the splitter is that file's and, without --prometheus, "
        "each check scrapes the instances' own /mesh/metrics. Exit status 0 when "
        "promoted, 1 when rolled back on failed checks, aborted or refused, 3 when rolled "
        "back because the checks stayed inconclusive (no data).",
    )
    start.add_argument("service", help="the service (its service-resolver names the subsets)")
    start.add_argument("--canary", required=True, help="the resolver subset of the new version")
    start.add_argument(
        "--stable",
        help="the subset serving now (default: the splitter's largest, else DefaultSubset)",
    )
    start.add_argument(
        "--mode", choices=("canary", "blue-green", "ab"), default="canary", help="(canary)"
    )
    start.add_argument(
        "--step", type=_bounded(int, 1, 100), default=10, help="canary: percent per step (10)"
    )
    start.add_argument(
        "--max-weight",
        type=_bounded(int, 1, 100),
        default=100,
        help="canary: the last step's weight before promotion (100)",
    )
    start.add_argument(
        "--iterations",
        type=_bounded(int, 1, 10_000),
        default=10,
        help="blue-green, ab: checks that must pass before the switch (10)",
    )
    start.add_argument(
        "--interval",
        type=_seconds,
        default=30.0,
        help="time between checks, at least four scrapes (30s)",
    )
    start.add_argument(
        "--window",
        type=_seconds,
        help="range the metrics cover, at least four scrapes (default: the interval)",
    )
    start.add_argument(
        "--min-success-rate",
        type=_bounded(float, 0, 100),
        default=99.0,
        help="percent of the canary's requests that must not be 5xx (99)",
    )
    start.add_argument(
        "--max-p99", type=_seconds, default=0.5, help="the canary's p99 latency limit (500ms)"
    )
    start.add_argument(
        "--threshold",
        type=_bounded(int, 1, 1000),
        default=2,
        help="failed checks, or inconclusive checks in a row, before rolling back (2)",
    )
    pin = start.add_mutually_exclusive_group()
    pin.add_argument(
        "--header", type=_match, help="ab (or blue-green test traffic): route name=value to it"
    )
    pin.add_argument("--cookie", type=_match, help="like --header, on a cookie")
    start.add_argument(
        "--prometheus", help="Prometheus base URL (default MESH_ROLLOUT_PROMETHEUS_URL)"
    )
    start.add_argument(
        "--pre-rollout",
        action="append",
        metavar="HOOK",
        help="a URL (POSTed the rollout as JSON; 2xx passes) or a command (exit 0 passes) "
        "asked before the first weight moves; asked each interval until it passes, the "
        "rollout does not start after --threshold failures (repeatable)",
    )
    start.add_argument(
        "--confirm-promotion",
        action="append",
        metavar="HOOK",
        help="like --pre-rollout, asked when a check would promote: until it passes the "
        "weight holds and the checks go on (repeatable)",
    )
    start.add_argument(
        "--hook-timeout", type=_seconds, default=30.0, help="each hook's time limit (30s)"
    )
    for name, help_text in (
        ("status", "show where the rollout is and which controller drives it"),
        ("promote", "send all traffic to the canary now"),
        ("abort", "send all traffic back to the stable subset now"),
        ("pause", "hold the current weight; checks stop until resume"),
        ("resume", "continue a paused rollout"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("service", help="the service")
        sub.set_defaults(json=False)
    for sub in actions.choices.values():
        sub.add_argument("--json", action="store_true", help="one JSON object per event/line")


def _dashboard(args: argparse.Namespace) -> int:
    """The mesh as a live web page: the service graph, instances, TLS and rollouts."""
    import threading

    from . import dashboard
    from .rollout import ConsulAPI

    try:
        config = load_config()
    except ConfigError as exc:
        for line in exc.errors:
            print(f"meshlib dashboard: {line}", file=sys.stderr)
        return 1
    consul = ConsulAPI(config.consul) if config.consul is not None else None
    if args.admin:
        targets = dashboard.static_targets(args.admin)
    elif args.prometheus:
        targets = dashboard.prometheus_targets(args.prometheus)
    elif consul is not None:
        targets = dashboard.consul_targets(consul)
    else:
        print(
            "meshlib dashboard: nothing to show: give --admin HOST:PORT (each process's "
            "admin listener), --prometheus URL, or set CONSUL_HTTP_ADDR",
            file=sys.stderr,
        )
        return 1
    collector = dashboard.Collector(
        targets, prometheus=args.prometheus, consul=consul, window=args.window
    )
    try:
        server = dashboard.DashboardServer(collector, args.host, args.port, args.interval)
    except OSError as exc:
        print(
            f"meshlib dashboard: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 1
    server.start()
    print(f"meshlib dashboard on {server.url} (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if consul is not None:
            consul.close()
    return 0


def _dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=9900, help="port (default 9900; 0: any)")
    parser.add_argument(
        "--admin",
        action="append",
        metavar="HOST:PORT",
        help="an admin listener to read (repeat; default: Prometheus's targets or Consul's "
        "registered Meta.admin-port)",
    )
    parser.add_argument(
        "--prometheus", help="Prometheus base URL: edges from its queries, as `meshlib top`"
    )
    parser.add_argument(
        "--interval", type=_seconds, default=2.0, help="seconds between polls (default 2s)"
    )
    parser.add_argument(
        "--window", type=_seconds, default=30.0, help="range of rates and p99 (default 30s)"
    )


def _demo(args: argparse.Namespace) -> int:
    """The weather system on loopback, with the mesh at work (about a minute)."""
    from ._demo import run

    return run(args.duration)


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
    print()
    sys.stdout.write(settings_table(config))
    if not args.check:
        return 0
    print()
    checks = run_checks(config)
    for check in checks:
        print(check)
    return 0 if all(check.ok for check in checks) else 1


_COMMANDS: tuple[tuple[str, str, Handler], ...] = (
    (
        "serve",
        "run an ASGI app (uvicorn) or a WSGI app (gunicorn) in the mesh: registration, "
        "health, graceful drain",
        _serve,
    ),
    (
        "ca",
        "manage the local certificate authority: init, show, rotate",
        _ca,
    ),
    (
        "rollout",
        "drive a canary, blue/green or A/B release (start, status, promote, abort, pause, resume)",
        _rollout,
    ),
    (
        "status",
        "show what a running process's mesh sees: services, endpoints, ejections, breakers",
        _status,
    ),
    (
        "top",
        "the service graph from Prometheus: each edge with requests/s, success rate and p99",
        _top,
    ),
    (
        "dashboard",
        "the mesh as a live web page: service graph, instances, TLS, rollouts",
        _dashboard,
    ),
    (
        "demo",
        "run the weather system on loopback and show the mesh at work",
        _demo,
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
        if name == "top":
            _top_arguments(sub)
        if name == "status":
            _status_arguments(sub)
        if name == "dashboard":
            _dashboard_arguments(sub)
        if name == "serve":
            _serve_arguments(sub)
        elif name == "ca":
            _ca_arguments(sub)
        elif name == "rollout":
            _rollout_arguments(sub)
        elif name == "config":
            sub.add_argument(
                "--check",
                action="store_true",
                help="also check the TLS material, Consul's reachability and the ACL token",
            )
        elif name == "demo":
            sub.add_argument(
                "--duration",
                type=_seconds,
                default=50.0,
                help="how long to drive traffic (default 50s; start and stop add a few)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshlib`` command; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "handler", None) in (
        _serve,
        _ca,
        _demo,
        _status,
        _rollout,
        _dashboard,
    ):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
