"""The environment -> configuration: every variable parsed, validated and documented."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshlib
from backends import free_port
from consul_agent import ConsulFactory
from meshlib._config import (
    VARIABLES,
    HashOn,
    HostPort,
    ServicePolicy,
    load_config,
    markdown_table,
    parse_duration,
)
from served import APPS, ServedFactory

#: One bad value per variable and a fragment its error must contain. A variable added to
#: the code without a bad case here fails test_every_variable_has_a_bad_value_case.
BAD_VALUES: dict[str, tuple[str, str]] = {
    "MESH_SERVICE_NAME": ("Weather Service", "a service name"),
    "MESH_SERVICE_VERSION": ("v 2", "a version label"),
    "MESH_DISCOVERY": ("zookeeper", "one of consul, static"),
    "MESH_STATIC_SERVICES": ("weather=127.0.0.1", "has no port"),
    "MESH_DISCOVERY_TIMEOUT": ("soon", "a duration"),
    "MESH_DISCOVERY_RESET_GRACE": ("forever", "a duration such as 30s or 2m, or off"),
    "MESH_CONFIG_FILE": ("/nonexistent/mesh.json", "the path of a readable JSON file"),
    "MESH_LB": ("fastest", "one of round_robin, least_request, p2c_ewma, random, ring_hash"),
    "MESH_LB_HASH_ON": ("query:user", "'header:<name>' or 'cookie:<name>'"),
    "MESH_SPLIT_HASH_ON": ("header:", "'header:<name>' or 'cookie:<name>'"),
    "MESH_PROPAGATE_HEADERS": ("x-debug,connection", "header names separated by commas"),
    "MESH_PROPAGATE_UNIDENTIFIED": ("trust", "one of ignore, honour"),
    "MESH_TIMEOUT": ("-1s", "a duration"),
    "MESH_DEADLINE": ("0", "a duration"),
    "MESH_RETRIES": ("11", "a whole number from 0 to 10"),
    "MESH_RETRY_BUDGET": ("lots", "a ratio from 0% to 1000%"),
    "MESH_RETRY_MIN_PER_SECOND": ("-3", "a whole number from 0 to 100000"),
    "MESH_RETRY_BACKOFF": ("25 ms", "a duration"),
    "MESH_RETRY_BACKOFF_MAX": ("1y", "a duration"),
    "MESH_HEDGE_DELAY": ("sometimes", "a number of seconds, or 'off'"),
    "MESH_OUTLIER_CONSECUTIVE_ERRORS": ("0", "a whole number from 1 to 1000"),
    "MESH_OUTLIER_EJECTION_TIME": ("nan", "a duration"),
    "MESH_OUTLIER_MAX_EJECTION": ("150%", "a ratio from 0% to 100%"),
    "MESH_PANIC_THRESHOLD": ("1.5", "a ratio from 0% to 100%"),
    "MESH_SLOW_START": ("soon", "a number of seconds, or 'off'"),
    "MESH_BREAKER_FAILURES": ("many", "a whole number from 1 to 100000"),
    "MESH_BREAKER_RESET": ("inf", "a duration"),
    "MESH_BREAKER_PROBES": ("0", "a whole number from 1 to 1000"),
    "MESH_TLS": ("on", "one of off, permissive, strict"),
    "MESH_SERVICE_ADDRESS": ("not an address", "an IP address or host name"),
    "MESH_SERVICE_PORT": ("70000", "a port number from 1 to 65535"),
    "MESH_SERVICE_TAGS": ("blue,has space", "tag 'has space' has characters"),
    "MESH_HEALTH_INTERVAL": ("often", "a duration"),
    "MESH_DEREGISTER_AFTER": ("never", "a duration"),
    "MESH_SHUTDOWN_DELAY": ("-1", "a duration"),
    "MESH_DRAIN_TIMEOUT": ("forever", "a duration"),
    "MESH_ACCESS_LOG": ("yes", "one of off, json"),
    "MESH_ACCESS_LOG_FILE": ("/no/such/dir/access.jsonl", "in an existing directory"),
    "MESH_METRICS_LABELS": ("endpoint,url", "labels separated by commas: endpoint, path or none"),
    "MESH_METRICS_ADDR": ("9464", "host:port ('9464' has no port)"),
    "MESH_ADMIN_ADDR": ("localhost", "host:port ('localhost' has no port)"),
    "MESH_ROLLOUT_PROMETHEUS_URL": ("prometheus:9090", "an http:// or https:// URL"),
    "OTEL_TRACES_EXPORTER": ("jaeger", "exporters separated by commas: otlp, console or none"),
    "OTEL_METRICS_EXPORTER": ("otlp,prometheus", "exporters separated by commas"),
    "MESH_TLS_CA": ("vault", "one of signer, consul, local"),
    "MESH_TLS_LEAF_TTL": ("a while", "a duration"),
    "MESH_DATACENTER": ("eu west", "a datacenter name"),
    "MESH_ALLOWED_CALLERS": ("gateway,Bad Name", "'Bad Name' is not a service name"),
    "MESH_DENIED_CALLERS": ("x y", "'x y' is not a service name"),
    "MESH_INTENTIONS_CACHE": ("0", "a duration"),
    "MESH_UNIDENTIFIED_CALLERS": ("deny", "one of intentions, allow"),
    "MESH_RATE_LIMIT": ("100 per second", "a rate as '<count>/s'"),
    "MESH_RATE_LIMIT_PER_SOURCE": ("5/s:burst=0", "burst in '5/s:burst=0' is not a whole"),
    "MESH_MAX_CONCURRENT_REQUESTS": ("0", "a whole number from 1 to 1000000"),
    "MESH_UNIDENTIFIED_DEADLINE": ("trust", "ignore, honour, or a duration"),
    "MESH_FAULT_DELAY": ("slow", "a duration"),
    "MESH_FAULT_DELAY_PERCENT": ("120", "a percentage from 0 to 100"),
    "MESH_FAULT_ABORT_STATUS": ("200", "an HTTP status from 400 to 599"),
    "MESH_FAULT_ABORT_PERCENT": ("half", "a percentage from 0 to 100"),
    "MESH_FAULT_HEADER": ("x-fault=", "a header name, or 'name=value'"),
    "MESH_EGRESS": ("maybe", "one of allow, deny"),
    "MESH_EGRESS_ALLOW": ("api.github.com,http://x", "'http://x' is not a host name"),
    "CONSUL_HTTP_ADDR": ("unix:///var/run/consul.sock", "host:port or http(s)://host[:port]"),
    "CONSUL_HTTP_TOKEN": ("token with spaces", "an ACL token of visible ASCII"),
    "CONSUL_HTTP_TOKEN_FILE": ("/nonexistent/token", "the path of a readable file"),
    "CONSUL_HTTP_SSL": ("maybe", "true or false"),
    "CONSUL_HTTP_SSL_VERIFY": ("sometimes", "true or false"),
    "CONSUL_CACERT": ("/nonexistent/ca.pem", "the path of a readable file"),
    "CONSUL_CLIENT_CERT": ("/nonexistent/c.pem", "the path of a readable file"),
    "CONSUL_CLIENT_KEY": ("/nonexistent/k.pem", "the path of a readable file"),
    "CONSUL_TLS_SERVER_NAME": ("not a host", "a host name"),
    "OTEL_SERVICE_NAME": ("My Service", "a service name"),
}
#: Variables that accept any value (so cannot be given a bad one).
ANY_VALUE = {"MESH_TLS_DIR", "MESH_TLS_SIGNER"}

#: CONSUL_* variables are read only when there is a Consul to talk to.
BASE_ENV = {"CONSUL_HTTP_ADDR": "127.0.0.1:8500"}


def test_every_variable_has_a_bad_value_case() -> None:
    assert {v.name for v in VARIABLES} == set(BAD_VALUES) | ANY_VALUE


@pytest.mark.parametrize(("name", "case"), sorted(BAD_VALUES.items()))
def test_bad_value_stops_start_up_with_one_line_naming_variable_value_and_expectation(
    name: str, case: tuple[str, str]
) -> None:
    value, expected = case
    env = {**BASE_ENV, name: value}
    with pytest.raises(meshlib.ConfigError) as info:
        load_config(env)
    message = str(info.value)
    assert "\n" not in message
    shown = "<redacted>" if name == "CONSUL_HTTP_TOKEN" else repr(value)  # a secret
    assert message.startswith(f"{name}={shown}")
    assert expected in message
    assert "expected" in message


def test_bad_values_are_all_reported_one_line_each() -> None:
    env = {"MESH_TIMEOUT": "soon", "MESH_LB": "fastest", "MESH_RETRIES__WEATHER": "x"}
    with pytest.raises(meshlib.ConfigError) as info:
        load_config(env)
    assert len(info.value.errors) == 3
    assert str(info.value).count("\n") == 2
    assert "MESH_RETRIES__WEATHER='x': expected a whole number from 0 to 10" in info.value.errors


def test_config_error_is_a_mesh_error_and_a_value_error() -> None:
    assert issubclass(meshlib.ConfigError, meshlib.MeshError)
    assert issubclass(meshlib.ConfigError, ValueError)


def test_client_and_middleware_refuse_to_start_on_bad_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_TIMEOUT", "soon")
    with pytest.raises(meshlib.ConfigError, match="MESH_TIMEOUT='soon'"):
        meshlib.Client()
    with pytest.raises(meshlib.ConfigError, match="MESH_TIMEOUT='soon'"):
        meshlib.AsyncClient()

    async def app(scope: object, receive: object, send: object) -> None: ...

    with pytest.raises(meshlib.ConfigError, match="MESH_TIMEOUT='soon'"):
        meshlib.ASGIMiddleware(app)
    with pytest.raises(meshlib.ConfigError, match="MESH_TIMEOUT='soon'"):
        meshlib.WSGIMiddleware(lambda environ, start_response: [])


def test_token_is_never_echoed_in_errors(tmp_path: Path) -> None:
    secret = "s3cr3t-token-value"
    with pytest.raises(meshlib.ConfigError) as info:
        load_config({"CONSUL_HTTP_ADDR": "bad addr", "CONSUL_HTTP_TOKEN": secret})
    assert secret not in str(info.value)
    config = load_config({"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN": secret})
    assert config.consul is not None
    assert config.consul.token == secret
    assert secret not in repr(config)


@pytest.mark.parametrize("name", [v.name for v in VARIABLES])
def test_a_control_character_is_refused_naming_the_variable_never_the_value(name: str) -> None:
    value = "planted-value-1234\n"
    with pytest.raises(meshlib.ConfigError) as info:
        load_config({**BASE_ENV, name: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: contains the control character U+000A")
    assert "planted-value" not in message


def test_an_unidentified_callers_deadline_is_ignored_honoured_or_floored() -> None:
    assert load_config({}).unidentified_deadline == math.inf
    assert load_config({"MESH_UNIDENTIFIED_DEADLINE": "ignore"}).unidentified_deadline == math.inf
    assert load_config({"MESH_UNIDENTIFIED_DEADLINE": "honour"}).unidentified_deadline == 0.0
    assert load_config({"MESH_UNIDENTIFIED_DEADLINE": "500ms"}).unidentified_deadline == 0.5


def test_the_admin_address_and_its_old_name() -> None:
    assert load_config({}).admin_addr is None  # a server then takes a free loopback port
    admin = {"MESH_ADMIN_ADDR": "127.0.0.1:9901"}
    assert load_config(admin).admin_addr == ("127.0.0.1", 9901)
    assert load_config({"MESH_METRICS_ADDR": "127.0.0.1:9464"}).admin_addr == ("127.0.0.1", 9464)
    assert load_config({**admin, "MESH_METRICS_ADDR": "127.0.0.1:9901"}).admin_addr == (
        "127.0.0.1",
        9901,
    )
    with pytest.raises(meshlib.ConfigError) as info:
        load_config({**admin, "MESH_METRICS_ADDR": "127.0.0.1:9464"})
    assert str(info.value).startswith("MESH_METRICS_ADDR='127.0.0.1:9464': expected it unset")


def test_a_token_file_with_a_control_character_inside_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("planted\x1b[2Jtoken\n")
    with pytest.raises(meshlib.ConfigError) as info:
        load_config({**BASE_ENV, "CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert "planted" not in str(info.value)
    assert "CONSUL_HTTP_TOKEN_FILE=" in str(info.value)
    token_file.write_text("planted-token\n")  # surrounding whitespace is not the token's
    config = load_config({**BASE_ENV, "CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert config.consul is not None
    assert config.consul.token == "planted-token"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("2", 2.0),
        ("0.25", 0.25),
        (" 3s ", 3.0),
    ],
)
def test_durations_accept_units_and_bare_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "2x", "1s2", "-1", "0", "0s", "nan", "inf", "1 s", "ms"])
def test_durations_reject_the_rest(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the plain parser raises ValueError
        parse_duration(text)


def test_defaults_with_an_empty_environment() -> None:
    config = load_config({})
    assert config.discovery == "static"
    assert config.tls == "off"
    assert config.consul is None
    assert config.service_name is None
    assert config.defaults == ServicePolicy()
    assert config.defaults.lb == "p2c_ewma"


def test_discovery_defaults_to_consul_when_consul_addr_is_set() -> None:
    config = load_config({"CONSUL_HTTP_ADDR": "127.0.0.1:8600"})
    assert config.discovery == "consul"
    assert config.consul is not None
    assert config.consul.address == "http://127.0.0.1:8600"
    assert (
        load_config({"CONSUL_HTTP_ADDR": "127.0.0.1:8600", "MESH_DISCOVERY": "static"}).discovery
        == "static"
    )


def test_consul_discovery_without_an_address_is_an_error() -> None:
    with pytest.raises(meshlib.ConfigError, match="expected CONSUL_HTTP_ADDR to be set"):
        load_config({"MESH_DISCOVERY": "consul"})


@pytest.mark.parametrize(
    ("addr", "env", "url"),
    [
        ("consul.internal", {}, "http://consul.internal:8500"),
        ("10.0.0.5:8501", {"CONSUL_HTTP_SSL": "true"}, "https://10.0.0.5:8501"),
        ("https://consul.internal", {}, "https://consul.internal:443"),
        ("http://[::1]:8500/", {}, "http://[::1]:8500"),
        ("[::1]:8500", {}, "http://[::1]:8500"),
    ],
)
def test_consul_address_forms(addr: str, env: dict[str, str], url: str) -> None:
    config = load_config({"CONSUL_HTTP_ADDR": addr, **env})
    assert config.consul is not None
    assert config.consul.address == url


def test_mesh_tls_needs_a_service_name_and_consul_ca_needs_consul() -> None:
    with pytest.raises(meshlib.ConfigError, match="expected MESH_SERVICE_NAME to be set"):
        load_config({"MESH_TLS": "strict"})
    with pytest.raises(meshlib.ConfigError, match="expected CONSUL_HTTP_ADDR to be set"):
        load_config({"MESH_TLS_CA": "consul"})
    assert load_config({"MESH_TLS": "strict", "MESH_SERVICE_NAME": "geo"}).tls_ca == "signer"


def test_consul_token_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc-123\n")
    config = load_config(
        {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    )
    assert config.consul is not None
    assert config.consul.token == "abc-123"


def test_static_services_with_weights_and_ipv6() -> None:
    config = load_config(
        {"MESH_STATIC_SERVICES": "weather=127.0.0.1:8001*3, localhost:8002 ; geo=[::1]:9001"}
    )
    assert config.static_services == {
        "weather": (HostPort("127.0.0.1", 8001, 3), HostPort("localhost", 8002, 1)),
        "geo": (HostPort("::1", 9001, 1),),
    }


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("weather=127.0.0.1:8001;weather=127.0.0.1:8002", "appears twice"),
        ("weather=", "has no endpoints"),
        ("127.0.0.1:8001", "does not start with a service name"),
        ("weather=127.0.0.1:8001*0", "weight"),
        ("weather=127.0.0.1:99999", "no valid port"),
        ("Weather=127.0.0.1:8001", "does not start with a service name"),
    ],
)
def test_static_services_errors_say_which_part_is_wrong(value: str, fragment: str) -> None:
    with pytest.raises(meshlib.ConfigError, match=fragment):
        load_config({"MESH_STATIC_SERVICES": value})


def test_per_service_overrides_apply_to_that_service_only() -> None:
    config = load_config(
        {
            "MESH_TIMEOUT": "2s",
            "MESH_TIMEOUT__WEATHER": "500ms",
            "MESH_LB__FORECAST_V2": "round_robin",
            "MESH_LB_HASH_ON__GEO": "cookie:session",
        }
    )
    assert config.policy("weather").timeout == 0.5
    assert config.policy("weather").lb == "p2c_ewma"
    assert config.policy("forecast-v2").lb == "round_robin"
    assert config.policy("forecast-v2").timeout == 2.0
    assert config.policy("geo").hash_on == HashOn("cookie", "session")
    assert config.policy("other").timeout == 2.0


def test_backoff_max_below_base_is_an_error() -> None:
    with pytest.raises(meshlib.ConfigError, match="MESH_RETRY_BACKOFF_MAX='10ms'"):
        load_config({"MESH_RETRY_BACKOFF": "50ms", "MESH_RETRY_BACKOFF_MAX": "10ms"})


def test_service_name_falls_back_to_otel_service_name() -> None:
    assert load_config({"OTEL_SERVICE_NAME": "forecast"}).service_name == "forecast"
    config = load_config({"OTEL_SERVICE_NAME": "forecast", "MESH_SERVICE_NAME": "geo"})
    assert config.service_name == "geo"


def test_unknown_mesh_variables_are_reported_with_a_suggestion(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="meshlib.config"):
        load_config({"MESH_TIMOUT": "2s", "MESH_TLS__WEATHER": "strict", "MESH_RETRIES__GEO": "1"})
    messages = [r.getMessage() for r in caplog.records]
    assert "unknown environment variable MESH_TIMOUT is ignored; did you mean MESH_TIMEOUT?" in (
        messages
    )
    assert (
        "unknown environment variable MESH_TLS__WEATHER is ignored; "
        "MESH_TLS cannot be set per service"
    ) in messages
    assert not any("MESH_RETRIES__GEO" in m for m in messages)


def test_docs_table_matches_the_code() -> None:
    """docs/configuration.md shows exactly the variables the code reads.

    To update the docs after changing VARIABLES: ``python scripts/config_docs.py``.
    """
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for owner in ("meshlib", "consul", "otel"):
        assert markdown_table(owner) in text, (
            f"the {owner} table in docs/configuration.md is stale; "
            "run `python scripts/config_docs.py` to regenerate it"
        )


# ---- a planted token never reaches anything a real run writes

PLANTED = "5ec7e7a0-d1ce-4c0d-b1a5-feedbeefcafe"
ACL = '-hcl=acl { enabled = true, default_policy = "allow", tokens { initial_management = "root-mgmt" } }'  # noqa: E501

#: A pure client: every log line of every library, then one call to a mesh service.
CLIENT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
import meshlib
with meshlib.Client() as client:
    print(client.get("http://hello/hello", timeout=5).text)
"""


def _client_run(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT],
        env={**os.environ, **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


def test_a_planted_token_never_appears_in_what_real_processes_write(
    consul_factory: ConsulFactory, serve: ServedFactory
) -> None:
    consul = consul_factory(extra_args=[ACL])
    base = {"CONSUL_HTTP_ADDR": consul.http_addr, "MESH_SERVICE_NAME": "hello"}
    outputs: dict[str, str] = {}

    # 1. the token read from a file with its newline: refused at load, in one line
    with_newline = {**base, "CONSUL_HTTP_TOKEN": PLANTED + "\n"}
    refused = subprocess.Popen(
        [sys.executable, "-m", "meshlib", "serve", "fastapi_app:app", "--port", "0"],
        cwd=APPS,
        env={**os.environ, **with_newline, "PYTHONPATH": str(APPS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        written, _ = refused.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it served: stop it and read what it wrote
        refused.kill()
        written, _ = refused.communicate()
    outputs["serve, token with a newline"] = written.decode(errors="replace")
    assert PLANTED not in outputs["serve, token with a newline"]
    assert refused.returncode not in (0, None, -9)
    assert (
        "CONSUL_HTTP_TOKEN: contains the control character U+000A"
        in (outputs["serve, token with a newline"])
    )
    outputs["client, token with a newline"] = _client_run(with_newline)
    assert "CONSUL_HTTP_TOKEN: contains" in outputs["client, token with a newline"]

    # 2. a token Consul does not know: every call to Consul is refused (403 ACL not found)
    unknown = {**base, "CONSUL_HTTP_TOKEN": PLANTED, "MESH_ACCESS_LOG": "json"}
    app = serve("fastapi_app:app", unknown)
    outputs["client, unknown token"] = _client_run(unknown)
    app.stop()
    outputs["serve, unknown token"] = app.output.decode(errors="replace")
    assert "could not register hello in Consul" in outputs["serve, unknown token"]
    assert "403" in outputs["serve, unknown token"] + outputs["client, unknown token"]

    # 3. no Consul there at all
    gone = {**unknown, "CONSUL_HTTP_ADDR": f"127.0.0.1:{free_port()}"}
    app = serve("fastapi_app:app", gone)
    outputs["client, unreachable Consul"] = _client_run(gone)
    app.stop()
    outputs["serve, unreachable Consul"] = app.output.decode(errors="replace")
    assert "could not register hello in Consul" in outputs["serve, unreachable Consul"]

    for run, output in outputs.items():
        assert output.strip(), run
        assert PLANTED not in output, f"{run} wrote the token:\n{output}"
        assert PLANTED[:8] not in output, f"{run} wrote part of the token:\n{output}"


# ----------------------------------------------------------------------------- one table

#: MeshConfig fields load_config sets by a rule of its own, not straight from one row
_DERIVED = {
    "service_name",  # MESH_SERVICE_NAME, else OTEL_SERVICE_NAME
    "discovery",  # consul when CONSUL_HTTP_ADDR is set
    "static_services",
    "tls_ca",  # consul with Consul discovery
    "admin_addr",  # MESH_ADMIN_ADDR or its old name
    "consul",  # the CONSUL_* rows together
    "faults",  # the MESH_FAULT_* rows together
    "defaults",  # the per-service rows
    "overrides",
}


def _shown(value: object) -> set[str]:
    """How the docs table may write a typed default."""
    if isinstance(value, bool) or value is None:
        return set()  # said in words ("unset (no limit)", "any caller")
    if isinstance(value, tuple | frozenset) and not value:
        return {"none", "empty"}
    if isinstance(value, float) and math.isinf(value):
        return {"ignore"}
    if isinstance(value, float):
        texts = {f"{value * 100:g}%"}
        for unit, seconds in (("h", 3600), ("m", 60), ("s", 1), ("ms", 0.001)):
            if value and (value / seconds) == int(value / seconds):
                texts.add(f"{int(value / seconds)}{unit}")
        return texts | ({"off"} if value == 0 else set())
    return {str(value), f"`{value}`"}


def test_each_row_sets_one_field_and_its_docs_default_is_the_fields_default() -> None:
    import dataclasses

    from meshlib._config import VARIABLES, MeshConfig, ServicePolicy

    config_fields = {f.name: f for f in dataclasses.fields(MeshConfig)}
    set_by_rows: set[str] = set()
    for var in VARIABLES:
        if not var.field:
            continue
        if var.per_service:
            typed = getattr(ServicePolicy(), var.field)
        else:
            assert var.field in config_fields, var.name
            assert var.field not in set_by_rows, f"{var.field} set by two rows"
            set_by_rows.add(var.field)
            field = config_fields[var.field]
            typed = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()  # type: ignore[misc]
            )
        shown = _shown(typed)
        if shown:  # a value, not a word: the table must say that very value
            assert var.default.split(" ", 1)[0] in shown, (var.name, var.default, typed)
    # every field is either a row's or one load_config derives: a new field needs a row
    assert set(config_fields) == set_by_rows | _DERIVED, set(config_fields) ^ (
        set_by_rows | _DERIVED
    )
