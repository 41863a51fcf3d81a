"""The table: every environment variable meshlib reads, declared once.

A row gives the variable's name, its default as the docs say it, an example, what a
valid value looks like, a description, its parser (``_parsers``), whether it may be set
per service, whose variable it is, the configuration field it sets and that field's typed
default (the docs default read by the parser, or ``value`` when the docs say a word such
as "unset"). ``MeshConfig`` and ``ServicePolicy`` take their defaults from here
(``default_of``), loading (``__init__``) sets their fields from here, and the docs table
(``markdown_table``) is printed from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ._parsers import (
    LB_POLICIES,
    _bool,
    _callers,
    _choice,
    _consul_addr,
    _duration,
    _duration_or_off,
    _existing_file,
    _exporters,
    _hash_on,
    _header_names,
    _host_name,
    _host_patterns,
    _http_url,
    _int_between,
    _listen_address,
    _log_destination,
    _metric_labels,
    _percent,
    _ratio,
    _service_name,
    _static_services,
    _tags,
    _text,
    _token,
    _unidentified_deadline,
    _version,
    parse_fault_header,
    parse_rate_limit,
)

# --------------------------------------------------------------------------- the table

#: ``Variable.value`` when the docs default is the value itself, to be parsed
_FROM_TEXT: Any = object()


@dataclass(frozen=True)
class Variable:
    """One environment variable meshlib reads."""

    name: str
    default: str
    example: str
    expected: str
    help: str
    parse: Callable[[str], Any] = field(repr=False, compare=False)
    #: May be overridden per service as ``<name>__<SERVICE>``.
    per_service: bool = False
    #: Whose variable it is: meshlib's own, or Consul's / OpenTelemetry's honoured as is.
    owner: Literal["meshlib", "consul", "otel"] = "meshlib"
    #: Never echo the value in an error message (tokens).
    secret: bool = False
    #: The ``MeshConfig`` field it sets (``ServicePolicy``'s, when ``per_service``), whose
    #: default is this row's ``typed_default``; empty for a variable ``load_config`` reads
    #: by a rule of its own.
    field: str = ""
    #: The typed default when ``default`` is a word ("unset", "none"), not a value its
    #: parser reads.
    value: Any = dataclasses.field(default=_FROM_TEXT, repr=False, compare=False)

    @property
    def typed_default(self) -> Any:
        """The default as the field holds it: ``value``, or ``default`` parsed."""
        if self.value is not _FROM_TEXT:
            return self.value
        return self.parse(self.default.strip("`"))


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "MESH_SERVICE_NAME",
        "`OTEL_SERVICE_NAME`, else unset",
        "forecast",
        "a service name: lowercase letters, digits and '-', starting with a letter, "
        "at most 63 characters",
        "The name this process serves as in the mesh (registration, identity, telemetry). "
        "A process that only calls other services may leave it unset.",
        _service_name,
    ),
    Variable(
        "MESH_SERVICE_VERSION",
        "unset",
        "v2",
        "a version label of letters, digits, '.', '_' or '-' (at most 63 characters)",
        "The version of this instance, registered in Consul's `Meta.version`; subsets and "
        "canaries select on it.",
        _version,
        field="service_version",
        value=None,
    ),
    Variable(
        "MESH_DISCOVERY",
        "`consul` if `CONSUL_HTTP_ADDR` is set, else `static`",
        "static",
        "one of consul, static",
        "Where endpoints come from: Consul's health API, or `MESH_STATIC_SERVICES`.",
        _choice("consul", "static"),
    ),
    Variable(
        "MESH_STATIC_SERVICES",
        "empty",
        "weather=127.0.0.1:8001,127.0.0.1:8002;geo=[::1]:9001*2",
        "'service=host:port,host:port;service=host:port' with an optional weight as 'host:port*3'",
        "Endpoints of each service for static discovery (the embedded default).",
        _static_services,
    ),
    Variable(
        "MESH_CONFIG_FILE",
        "unset",
        "/etc/meshlib/mesh.json",
        "the path of a readable JSON file",
        "The local config file (the embedded default's control plane): endpoints with "
        "metadata under `services`, and Consul-shaped `service-router`, `service-splitter` "
        "and `service-resolver` entries under `config_entries`. Re-read when it changes; a "
        "malformed version is refused and the last good one stays in force.",
        _existing_file,
        field="config_file",
        value=None,
    ),
    Variable(
        "MESH_DISCOVERY_TIMEOUT",
        "2s",
        "500ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long the first request to a service never seen before may wait for discovery "
        "to find it. Requests to known services never wait on discovery.",
        _duration,
        field="discovery_timeout",
    ),
    Variable(
        "MESH_DISCOVERY_RESET_GRACE",
        "30s",
        "2m",
        "a duration such as 30s or 2m, or off",
        "After Consul restarts or comes back (a dev agent comes back empty), how long a "
        "service that had instances and now has none keeps its last known ones, unless "
        "instances reappear sooner (as Eureka's self-preservation does).",
        _duration_or_off,
        field="discovery_reset_grace",
    ),
    Variable(
        "MESH_LB",
        "p2c_ewma",
        "round_robin",
        "one of " + ", ".join(LB_POLICIES),
        "Load-balancing policy: power of two choices over peak-EWMA latency (`p2c_ewma`), "
        "`least_request` (P2C on in-flight requests), `round_robin`, `random`, or "
        "`ring_hash` (sticky by `MESH_LB_HASH_ON`). All honour endpoint weights.",
        _choice(*LB_POLICIES),
        per_service=True,
        field="lb",
    ),
    Variable(
        "MESH_LB_HASH_ON",
        "unset (a random key per request)",
        "header:x-user-id",
        "'header:<name>' or 'cookie:<name>'",
        "What `ring_hash` hashes to pick an endpoint, so one user sticks to one instance.",
        _hash_on,
        per_service=True,
        field="hash_on",
        value=None,
    ),
    Variable(
        "MESH_SPLIT_HASH_ON",
        "unset (each request split at random)",
        "cookie:session",
        "'header:<name>' or 'cookie:<name>'",
        "Makes the service's splits sticky: a request carrying this header or cookie takes "
        "the split its value hashes to, the same in every process, so one user stays on one "
        "version while all users follow the weights. Requests without it split at random.",
        _hash_on,
        per_service=True,
        field="split_hash_on",
        value=None,
    ),
    Variable(
        "MESH_TIMEOUT",
        "5s",
        "800ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Timeout of one attempt (connect, write, and each read).",
        _duration,
        per_service=True,
        field="timeout",
    ),
    Variable(
        "MESH_DEADLINE",
        "15s",
        "3s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Budget of the whole request: every attempt and backoff. The remaining budget is sent "
        "downstream in `x-mesh-deadline-ms` so the callee can give up early.",
        _duration,
        per_service=True,
        field="deadline",
    ),
    Variable(
        "MESH_RETRIES",
        "2",
        "3",
        "a whole number from 0 to 10",
        "Retries after the first attempt, for retryable outcomes only (connect failures, "
        "resets before a response, 502/503/504); non-idempotent requests only by opt-in.",
        _int_between(0, 10),
        per_service=True,
        field="retries",
    ),
    Variable(
        "MESH_RETRY_BUDGET",
        "20%",
        "0.1",
        "a ratio from 0% to 1000%, as '20%' or '0.2'",
        "Retries allowed as a share of recent requests (over 10 s), on top of "
        "`MESH_RETRY_MIN_PER_SECOND`, so a dead service does not get a retry storm.",
        _ratio(0.0, 10.0),
        per_service=True,
        field="retry_budget",
    ),
    Variable(
        "MESH_RETRY_MIN_PER_SECOND",
        "10",
        "5",
        "a whole number from 0 to 100000",
        "Retries always allowed per second regardless of the ratio, so low-traffic services "
        "can still retry.",
        _int_between(0, 100_000),
        per_service=True,
        field="retry_min_per_second",
    ),
    Variable(
        "MESH_RETRY_BACKOFF",
        "25ms",
        "50ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Base of the exponential backoff between attempts (full jitter).",
        _duration,
        per_service=True,
        field="retry_backoff",
    ),
    Variable(
        "MESH_RETRY_BACKOFF_MAX",
        "250ms",
        "1s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Longest backoff between two attempts; a `Retry-After` longer than the remaining "
        "deadline is not waited for.",
        _duration,
        per_service=True,
        field="retry_backoff_max",
    ),
    Variable(
        "MESH_HEDGE_DELAY",
        "off",
        "50ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds, or 'off'",
        "Hedged requests: when an idempotent request with a replayable body has had no answer "
        "after this delay, send one more attempt to another endpoint and take whichever "
        "answers first (the other is cancelled). Each hedge spends the retry budget. Set it "
        "near the service's p95 latency; per request, the `hedge` option overrides it.",
        _duration_or_off,
        per_service=True,
        field="hedge_delay",
    ),
    Variable(
        "MESH_OUTLIER_CONSECUTIVE_ERRORS",
        "5",
        "3",
        "a whole number from 1 to 1000",
        "Consecutive gateway errors (502/503/504, connect failures, resets) or 5xx that eject "
        "an endpoint from load balancing.",
        _int_between(1, 1000),
        per_service=True,
        field="outlier_consecutive_errors",
    ),
    Variable(
        "MESH_OUTLIER_EJECTION_TIME",
        "30s",
        "5s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Base ejection time; an endpoint ejected again stays out that many times longer "
        "(capped at 10 times the base).",
        _duration,
        per_service=True,
        field="outlier_ejection_time",
    ),
    Variable(
        "MESH_OUTLIER_MAX_EJECTION",
        "50%",
        "34%",
        "a ratio from 0% to 100%, as '50%' or '0.5'",
        "Most of a service's endpoints that may be ejected at once (at least one always may).",
        _ratio(0.0, 1.0),
        per_service=True,
        field="outlier_max_ejection",
    ),
    Variable(
        "MESH_PANIC_THRESHOLD",
        "50%",
        "0",
        "a ratio from 0% to 100%, as '50%' or '0.5'",
        "When fewer than this share of endpoints are available, balance across all of them "
        "(ejected ones and those failing their health checks too) rather than overload the "
        "few left. `0` disables panic mode.",
        _ratio(0.0, 1.0),
        per_service=True,
        field="panic_threshold",
    ),
    Variable(
        "MESH_SLOW_START",
        "10s",
        "30s",
        "a duration such as 250ms, 2s, 1m or a number of seconds, or 'off'",
        "Slow start under `p2c_ewma` (Envoy's `slow_start_window`; Envoy has it off unless "
        "set): for this long after an endpoint joins (new, healthy again, or readmitted after "
        "an ejection) its slow answers are forgiven within about a tenth of it, so a cold "
        "start does not cost it tens of seconds of traffic, and a new one starts at its "
        "peers' typical latency and ramps from 10% of its share. `off` disables it.",
        _duration_or_off,
        per_service=True,
        field="slow_start",
    ),
    Variable(
        "MESH_BREAKER_FAILURES",
        "20",
        "10",
        "a whole number from 1 to 100000",
        "Consecutive failed requests to a service (after retries) that open its circuit "
        "breaker; while open, requests fail fast with `meshlib.CircuitOpen`.",
        _int_between(1, 100_000),
        per_service=True,
        field="breaker_failures",
    ),
    Variable(
        "MESH_BREAKER_RESET",
        "10s",
        "30s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long an open breaker stays open before letting probes through (half-open).",
        _duration,
        per_service=True,
        field="breaker_reset",
    ),
    Variable(
        "MESH_BREAKER_PROBES",
        "1",
        "3",
        "a whole number from 1 to 1000",
        "Requests let through at once while half-open; the rest fail fast until a probe "
        "succeeds (closing the breaker) or fails (re-opening it).",
        _int_between(1, 1000),
        per_service=True,
        field="breaker_probes",
    ),
    Variable(
        "MESH_SERVICE_ADDRESS",
        "the address served on (a wildcard: the Consul node's address)",
        "10.0.3.7",
        "an IP address or host name",
        "The address registered in Consul for this instance.",
        _host_name,
        field="service_address",
        value=None,
    ),
    Variable(
        "MESH_SERVICE_PORT",
        "the port `meshlib serve` listens on, else unset",
        "8001",
        "a port number from 1 to 65535",
        "The port registered in Consul when the app runs under a server other than "
        "`meshlib serve` (which sets it itself). Without it such an app is not registered.",
        _int_between(1, 65535),
        field="service_port",
        value=None,
    ),
    Variable(
        "MESH_SERVICE_TAGS",
        "none",
        "blue,eu-west",
        "tags separated by commas (letters, digits, '.', '_', '-', ':', '=')",
        "Tags registered in Consul for this instance.",
        _tags,
        field="service_tags",
        value=(),
    ),
    Variable(
        "MESH_HEALTH_INTERVAL",
        "2s",
        "5s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How often Consul checks `/mesh/health` of this instance.",
        _duration,
        field="health_interval",
    ),
    Variable(
        "MESH_DEREGISTER_AFTER",
        "1m",
        "10m",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Consul's `DeregisterCriticalServiceAfter`: an instance whose check stays critical "
        "this long (it crashed without deregistering) is removed.",
        _duration,
        field="deregister_after",
    ),
    Variable(
        "MESH_SHUTDOWN_DELAY",
        "1s",
        "3s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "On shutdown, how long to keep serving after deregistering, so callers' discovery "
        "drops this instance before it stops accepting connections.",
        _duration,
        field="shutdown_delay",
    ),
    Variable(
        "MESH_DRAIN_TIMEOUT",
        "20s",
        "60s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "On shutdown, the longest wait for in-flight requests to finish.",
        _duration,
        field="drain_timeout",
    ),
    Variable(
        "MESH_ACCESS_LOG",
        "off",
        "json",
        "one of off, json",
        "`json`: one JSON line per inbound and per outbound request on the loggers "
        "`meshlib.access.inbound` / `meshlib.access.outbound` (to stderr unless the app gave "
        "`meshlib.access` a handler).",
        _choice("off", "json"),
        field="access_log",
    ),
    Variable(
        "MESH_ACCESS_LOG_FILE",
        "stderr",
        "access.jsonl",
        "stderr, stdout, or the path of a file in an existing directory",
        "Where `MESH_ACCESS_LOG=json` lines go when the app gave `meshlib.access` no handler: "
        "`stdout` keeps them apart from server logs and tracebacks (on stderr); a path "
        "appends them to that file.",
        _log_destination,
        field="access_log_file",
    ),
    Variable(
        "MESH_ADMIN_ADDR",
        "a server: `127.0.0.1:0` (a free loopback port, printed by `meshlib serve` and given "
        "to Consul's check); a pure client: unset (none)",
        "127.0.0.1:9901",
        "host:port",
        "The admin listener (plaintext HTTP, one per process): `/mesh/health`, "
        "`/mesh/health/ready`, `/mesh/health/live`, `/mesh/metrics` (also `/metrics`) and "
        "`/mesh/status` (loopback peers only). The app's own port never serves them. Bind it "
        "beyond loopback only for a scraper or prober that cannot reach loopback.",
        _listen_address,
    ),
    Variable(
        "MESH_METRICS_ADDR",
        "unset",
        "127.0.0.1:9464",
        "host:port",
        "Deprecated alias of `MESH_ADMIN_ADDR` (its listener now serves every admin route).",
        _listen_address,
    ),
    Variable(
        "MESH_METRICS_LABELS",
        "none",
        "endpoint,path",
        "labels separated by commas: endpoint, path or none",
        "Opt in to metrics with unbounded labels, kept off by default so a scrape stays "
        "small: `endpoint` adds `meshlib_client_attempt_duration_seconds` per endpoint "
        "address; `path` adds `meshlib_client_path_duration_seconds` by URL path and "
        "`meshlib_server_route_duration_seconds` by route (the framework's route template, "
        "else the path; an unmatched 404 takes no slot). Each label keeps at most 500 "
        "distinct values per process; more become `_OTHER`.",
        _metric_labels,
        field="metrics_labels",
    ),
    Variable(
        "MESH_ROLLOUT_PROMETHEUS_URL",
        "`http://127.0.0.1:9090`; without Consul and with `MESH_CONFIG_FILE`: unset (the "
        "instances' own `/mesh/metrics`)",
        "http://prometheus.internal:9090",
        "an http:// or https:// URL",
        "The Prometheus whose HTTP API `meshlib rollout` reads the canary's success rate and "
        "p99 from (the `--prometheus` flag overrides it). A rollout of the local config file "
        "without it scrapes each instance's admin listener at each check instead.",
        _http_url,
        field="rollout_prometheus_url",
        value=None,
    ),
    Variable(
        "MESH_TLS",
        "off",
        "strict",
        "one of off, permissive, strict",
        "Mesh TLS: `off` is plain HTTP; `permissive` serves mTLS and plaintext (to migrate a "
        "fleet without downtime); `strict` requires mTLS both ways.",
        _choice("off", "permissive", "strict"),
        field="tls",
    ),
    Variable(
        "MESH_TLS_CA",
        "`consul` with Consul discovery, else `signer`",
        "signer",
        "one of signer, consul, local",
        "Where certificates come from: `signer` asks the local CA's signer (`meshlib ca serve`) "
        "at `MESH_TLS_SIGNER` for a leaf for this service only, so the process never holds a "
        "key that can sign; `consul` is Consul Connect's CA; `local` (development only) signs "
        "in process with the root key read from `MESH_TLS_DIR`, so every process could mint "
        "any identity.",
        _choice("signer", "consul", "local"),
    ),
    Variable(
        "MESH_TLS_DIR",
        "`~/.local/share/meshlib/ca`",
        "/etc/meshlib/ca",
        "a directory path",
        "The local CA's directory (`meshlib ca init` creates it; keys are mode 0600). Read by "
        "`meshlib ca serve`, and by services only with `MESH_TLS_CA=local`.",
        _text,
        field="tls_dir",
    ),
    Variable(
        "MESH_TLS_SIGNER",
        "`/run/meshlib/signer.sock`",
        "/run/meshlib/signer.sock",
        "a Unix socket path",
        "The Unix socket of the signer (`meshlib ca serve`) that issues this service's leaf "
        "with `MESH_TLS_CA=signer`; it gives a process only the service names its user is "
        "entitled to in the signer's policy file.",
        _text,
        field="tls_signer",
    ),
    Variable(
        "MESH_TLS_LEAF_TTL",
        "8h",
        "1h",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Lifetime of the leaf certificate the process asks the local CA's signer for (at most "
        "the signer's `--leaf-ttl`); it is renewed after two thirds of it.",
        _duration,
        field="tls_leaf_ttl",
    ),
    Variable(
        "MESH_DATACENTER",
        "dc1",
        "eu-west-1",
        "a datacenter name of letters, digits, '.', '_' or '-'",
        "The datacenter in this process's SPIFFE ID with the local CA (Consul's CA says its own).",
        _version,
        field="datacenter",
    ),
    Variable(
        "MESH_ALLOWED_CALLERS",
        "any caller",
        "gateway,web",
        "service names separated by commas, or '*'",
        "Without Consul: the only services allowed to call this one (by their verified "
        "identity). With Consul, its intentions decide, and this list applies as well.",
        _callers,
        field="allowed_callers",
        value=None,
    ),
    Variable(
        "MESH_DENIED_CALLERS",
        "none",
        "batch",
        "service names separated by commas, or '*'",
        "Services never allowed to call this one; wins over `MESH_ALLOWED_CALLERS`.",
        _callers,
        field="denied_callers",
        value=frozenset(),
    ),
    Variable(
        "MESH_INTENTIONS_CACHE",
        "2s",
        "10s",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "How long a Consul intention decision for one caller is reused.",
        _duration,
        field="intentions_cache",
    ),
    Variable(
        "MESH_UNIDENTIFIED_CALLERS",
        "intentions",
        "allow",
        "one of intentions, allow",
        "With Consul intentions: how a caller without a client certificate (plaintext, "
        "`MESH_TLS=permissive`) is judged. `intentions`: like the `*` source of the "
        "intentions, so Consul's default intention policy holds; `allow`: let it through "
        "unchecked, as meshlib did before (a warning is logged at start).",
        _choice("intentions", "allow"),
        field="unidentified_callers",
    ),
    Variable(
        "MESH_EGRESS",
        "allow",
        "deny",
        "one of allow, deny",
        "Calls to hosts outside the mesh: `allow` all, or `deny` all but "
        "`MESH_EGRESS_ALLOW` (refused before any connection opens).",
        _choice("allow", "deny"),
        field="egress",
    ),
    Variable(
        "MESH_EGRESS_ALLOW",
        "none",
        "api.github.com,*.example.com",
        "host names separated by commas, each exact or '*.' and a domain",
        "External hosts allowed when `MESH_EGRESS=deny`.",
        _host_patterns,
        field="egress_allow",
        value=(),
    ),
    # ---- inbound traffic controls (server/_limits.py, server/_faults.py)
    Variable(
        "MESH_RATE_LIMIT",
        "unset (no limit)",
        "100/s:burst=200",
        "a rate as '<count>/s', '<count>/m' or '<count>/h', optionally with ':burst=<count>'",
        "Requests this process serves, in all (a token bucket; the burst defaults to one "
        "second's worth, at least 1). Beyond it: 429 with `Retry-After`, before the handler.",
        parse_rate_limit,
        field="rate_limit",
        value=None,
    ),
    Variable(
        "MESH_RATE_LIMIT_PER_SOURCE",
        "unset (no limit)",
        "20/s",
        "a rate as '<count>/s', '<count>/m' or '<count>/h', optionally with ':burst=<count>'",
        "Requests this process serves per calling service (its verified mTLS identity; "
        "callers without one share a single bucket). Beyond it: 429 with `Retry-After`.",
        parse_rate_limit,
        field="rate_limit_per_source",
        value=None,
    ),
    Variable(
        "MESH_MAX_CONCURRENT_REQUESTS",
        "unset (no limit)",
        "64",
        "a whole number from 1 to 1000000",
        "Requests this process handles at once; beyond it a request is shed with 503 and "
        "`Retry-After: 1` before the handler runs. `/mesh/health` is never limited.",
        _int_between(1, 1_000_000),
        field="max_concurrent_requests",
        value=None,
    ),
    Variable(
        "MESH_PROPAGATE_HEADERS",
        "none",
        "x-debug,baggage",
        "header names separated by commas",
        "Headers carried from the request a process is serving onto every mesh call it makes "
        "while serving it (unless the call sets them itself), so a router rule on them (a "
        "debug or canary pin) holds on every hop. Taken only from an identified mesh caller "
        "unless `MESH_PROPAGATE_UNIDENTIFIED=honour`; never sent to hosts outside the mesh.",
        _header_names,
        field="propagate_headers",
        value=(),
    ),
    Variable(
        "MESH_PROPAGATE_UNIDENTIFIED",
        "ignore",
        "honour",
        "one of ignore, honour",
        "Whether `MESH_PROPAGATE_HEADERS` are carried on from a caller without a verified "
        "mesh identity. `ignore`: an edge's own code sets them on its outbound calls; "
        "`honour`: for plaintext meshes (`MESH_TLS=off`) behind an edge that strips them.",
        _choice("ignore", "honour"),
        field="propagate_unidentified",
    ),
    Variable(
        "MESH_UNIDENTIFIED_DEADLINE",
        "ignore",
        "1s",
        "ignore, honour, or a duration such as 250ms, 2s, 1m (the shortest budget honoured)",
        "What a server does with the `x-mesh-deadline-ms` of a caller without a verified mesh "
        "identity (plaintext, or mTLS without a service identity): `ignore` it, `honour` it "
        "as from a mesh caller, or honour it but never below this duration. With "
        "`MESH_TLS=off` every caller is unidentified: set `honour` there to keep deadlines "
        "propagating between plaintext services.",
        _unidentified_deadline,
        field="unidentified_deadline",
    ),
    Variable(
        "MESH_FAULT_DELAY",
        "unset (no delay)",
        "200ms",
        "a duration such as 250ms, 2s, 1m or a number of seconds",
        "Fault injection: delay chosen requests this long before the handler (counts "
        "against the caller's deadline). For resilience tests only; logged loudly.",
        _duration,
    ),
    Variable(
        "MESH_FAULT_DELAY_PERCENT",
        "100 (when `MESH_FAULT_DELAY` is set)",
        "10",
        "a percentage from 0 to 100, as '10' or '10%'",
        "Share of eligible requests that `MESH_FAULT_DELAY` delays.",
        _percent,
    ),
    Variable(
        "MESH_FAULT_ABORT_STATUS",
        "503 (when `MESH_FAULT_ABORT_PERCENT` is set)",
        "500",
        "an HTTP status from 400 to 599",
        "Fault injection: answer chosen requests with this status instead of running the "
        "handler. For resilience tests only; logged loudly.",
        _int_between(400, 599),
    ),
    Variable(
        "MESH_FAULT_ABORT_PERCENT",
        "100 (when `MESH_FAULT_ABORT_STATUS` is set)",
        "5",
        "a percentage from 0 to 100, as '5' or '5%'",
        "Share of eligible requests aborted with `MESH_FAULT_ABORT_STATUS`.",
        _percent,
    ),
    Variable(
        "MESH_FAULT_HEADER",
        "unset (every request is eligible)",
        "x-mesh-fault=on",
        "a header name, or 'name=value'",
        "Only requests carrying this header (with this value, when given) are eligible "
        "for the faults above; others are never touched.",
        parse_fault_header,
    ),
    # ---- Consul's own variables, honoured as the consul CLI reads them
    Variable(
        "CONSUL_HTTP_ADDR",
        "unset (no Consul)",
        "127.0.0.1:8500",
        "host:port or http(s)://host[:port]",
        "Address of the local Consul agent. Setting it makes Consul the default discovery.",
        _consul_addr,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_TOKEN",
        "unset",
        "(an ACL token)",
        "an ACL token of visible ASCII characters (no spaces)",
        "ACL token sent to Consul as `X-Consul-Token`. Never logged, never shown in an "
        "error message.",
        _token,
        owner="consul",
        secret=True,
    ),
    Variable(
        "CONSUL_HTTP_TOKEN_FILE",
        "unset",
        "/run/secrets/consul-token",
        "the path of a readable file",
        "File holding the ACL token (used when `CONSUL_HTTP_TOKEN` is unset).",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_SSL",
        "false",
        "true",
        "true or false",
        "Talk to Consul over HTTPS when `CONSUL_HTTP_ADDR` has no scheme.",
        _bool,
        owner="consul",
    ),
    Variable(
        "CONSUL_HTTP_SSL_VERIFY",
        "true",
        "false",
        "true or false",
        "Verify Consul's HTTPS certificate.",
        _bool,
        owner="consul",
    ),
    Variable(
        "CONSUL_CACERT",
        "unset (system trust)",
        "/etc/consul.d/ca.pem",
        "the path of a readable file",
        "CA bundle that signs Consul's HTTPS certificate.",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_CLIENT_CERT",
        "unset",
        "/etc/consul.d/client.pem",
        "the path of a readable file",
        "Client certificate for Consul's HTTPS API (with `CONSUL_CLIENT_KEY`).",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_CLIENT_KEY",
        "unset",
        "/etc/consul.d/client-key.pem",
        "the path of a readable file",
        "Key of `CONSUL_CLIENT_CERT`.",
        _existing_file,
        owner="consul",
    ),
    Variable(
        "CONSUL_TLS_SERVER_NAME",
        "unset",
        "consul.example.internal",
        "a host name",
        "Server name to verify Consul's certificate against.",
        _host_name,
        owner="consul",
    ),
    # ---- OpenTelemetry's: the SDK reads all OTEL_*; meshlib itself reads this one
    Variable(
        "OTEL_SERVICE_NAME",
        "unset",
        "forecast",
        "a service name",
        "Used as `MESH_SERVICE_NAME` when that is unset. All other `OTEL_*` variables are "
        "honoured by the OpenTelemetry SDK as documented there.",
        _text,
        owner="otel",
    ),
    Variable(
        "OTEL_TRACES_EXPORTER",
        "`otlp` if an OTLP endpoint is set, else none",
        "console",
        "exporters separated by commas: otlp, console or none",
        "Where spans go when the application has not installed a tracer provider itself.",
        _exporters,
        owner="otel",
        field="traces_exporter",
        value=None,
    ),
    Variable(
        "OTEL_METRICS_EXPORTER",
        "`otlp` if an OTLP endpoint is set, else none",
        "none",
        "exporters separated by commas: otlp, console or none",
        "Where metrics are pushed (every `OTEL_METRIC_EXPORT_INTERVAL`) besides the "
        "Prometheus text on `/mesh/metrics`, which is always there.",
        _exporters,
        owner="otel",
        field="metrics_exporter",
        value=None,
    ),
)

_BY_NAME: Mapping[str, Variable] = MappingProxyType({v.name: v for v in VARIABLES})


def default_of(name: str) -> Any:
    """The typed default of the variable ``name`` (what its field starts as)."""
    return _BY_NAME[name].typed_default


def override_key(service: str) -> str:
    """The suffix of a per-service override: ``forecast-v2`` -> ``FORECAST_V2``."""
    return service.upper().replace("-", "_").replace(".", "_")


def markdown_table(owner: Literal["meshlib", "consul", "otel"]) -> str:
    """The docs table of one owner's variables, as docs/configuration.md shows it."""
    lines = [
        "| Variable | Default | Example | Per service | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for var in VARIABLES:
        if var.owner != owner:
            continue
        per_service = "yes" if var.per_service else ""
        text = f"{var.help} Expected: {var.expected}.".replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{var.name}` | {var.default} | `{var.example}` | {per_service} | {text} |")
    return "\n".join(lines) + "\n"
