"""Property-based tests for every parser of outside input: no crash, a clear error.

Each parser here reads something meshlib does not control (the environment, a header
another process sent, Consul's JSON). Hypothesis feeds it arbitrary input and the tests
assert the contract a user relies on: the value parses into something sane, or it is
refused in the one way the caller handles (``ConfigError``, ``None``, ``_BadAnswer``), never
with another exception from deep inside. Examples are few enough that this file runs in a
few seconds with the default suite.
"""

from __future__ import annotations

import json
import math
import string
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshlib import ConfigError
from meshlib._config import _POLICY_FIELDS, VARIABLES, MeshConfig, load_config, parse_duration
from meshlib.consul import BadAnswer as _BadAnswer
from meshlib.consul._engine import _next_index
from meshlib.discovery import Endpoint
from meshlib.discovery._health import endpoints as _endpoints
from meshlib.resilience._deadline import parse_deadline_header
from meshlib.resilience._retry import parse_retry_after

PROPERTIES = settings(max_examples=150, deadline=None)

# ----------------------------------------------------------------------------- text

# Environment values and header values cannot hold NUL; everything else is fair game,
# including non-ASCII digits ("²", "٣") that str.isdigit() accepts and int() may not.
_any_text = st.text(st.characters(blacklist_characters="\x00"), max_size=40)
_latin1_text = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=40)
_near_misses = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1",
        "10",
        "65535",
        "65536",
        "1e309",
        "nan",
        "inf",
        "-inf",
        "0.5",
        ".5",
        "250ms",
        "1m30s",
        "1h",
        "2s ",
        "5x",
        "ms",
        "20%",
        "150%",
        "-5%",
        "%",
        "true",
        "FALSE",
        "yes",
        "maybe",
        "static",
        "consul",
        "strict",
        "p2c_ewma",
        "ring_hash",
        "header:x-user",
        "cookie:",
        "header:bad name",
        "127.0.0.1:8500",
        "[::1]:8500",
        "[::1",
        "https://consul:8501",
        "ftp://x",
        "http://h/path",
        "weather=127.0.0.1:8001,127.0.0.1:8002*3;geo=[::1]:9001",
        "weather=",
        "weather=h:1*0",
        "a=b:1;a=c:2",
        "blue,eu-west",
        "bad tag",
        "²",
        "٣",
        "/",
        "/etc/hostname",
    ]
)
_env_value = st.one_of(_near_misses, _any_text)

_NAMES = [v.name for v in VARIABLES]
_env_name = st.one_of(
    st.sampled_from(_NAMES),
    st.builds(
        lambda base, suffix: f"{base}__{suffix}",
        st.sampled_from(sorted(_POLICY_FIELDS)),
        st.text(string.ascii_uppercase + string.digits + "_-", max_size=8),
    ),
    st.builds(lambda rest: "MESH_" + rest, st.text(string.ascii_uppercase + "_", max_size=12)),
)


@PROPERTIES
@given(st.dictionaries(_env_name, _env_value, max_size=8))
def test_any_environment_either_loads_or_raises_config_error(env: dict[str, str]) -> None:
    try:
        config = load_config(env)
    except ConfigError as exc:
        message = str(exc)
        assert message
        assert "CONSUL_HTTP_TOKEN=" not in message or "<redacted>" in message
        return
    assert isinstance(config, MeshConfig)
    for policy in (config.defaults, *config.overrides.values()):
        assert policy.timeout > 0
        assert policy.deadline > 0
        assert 0 <= policy.retries <= 10
        assert policy.retry_backoff <= policy.retry_backoff_max


@PROPERTIES
@given(st.one_of(_near_misses, _any_text))
def test_a_duration_parses_to_a_positive_finite_number_or_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds)
    assert seconds > 0


# ----------------------------------------------------------------------------- headers


@PROPERTIES
@given(st.one_of(st.none(), _near_misses, _latin1_text, _any_text, st.integers().map(str)))
@example("²")  # latin-1 (ASGI's header encoding), isdigit() is True, int() refuses it
@example("9" * 9)
@example("0")
def test_the_deadline_header_parses_to_a_bounded_budget_or_none(value: str | None) -> None:
    budget = parse_deadline_header(value)
    if budget is not None:
        assert 0 <= budget <= 86_400


def _timezones() -> list[Any]:
    import datetime

    return [datetime.UTC, datetime.timezone(datetime.timedelta(hours=-5))]


def _http_date(when: Any) -> str:
    import email.utils

    if when.tzinfo is None:
        return when.strftime("%a, %d %b %Y %H:%M:%S")
    return email.utils.format_datetime(when)


@PROPERTIES
@given(
    st.one_of(
        st.none(),
        _near_misses,
        _latin1_text,
        _any_text,
        st.integers(min_value=0).map(str),
        st.datetimes(timezones=st.sampled_from([None, *_timezones()])).map(_http_date),
    )
)
@example("²")
@example("Wed, 21 Oct 2015 07:28:00 GMT")
@example("Wed, 21 Oct 99999 07:28:00 GMT")
@example("Wed, 21 Oct 2015 07:28:00 +9999")
def test_retry_after_parses_to_a_non_negative_delay_or_none(value: str | None) -> None:
    delay = parse_retry_after(value, now=1_700_000_000.0)
    if delay is not None:
        assert delay >= 0


# ----------------------------------------------------------------------------- Consul JSON

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=10),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a well-formed value, sometimes any JSON at all, sometimes absent."""
    return st.one_of(good, good, _json)


_service = st.fixed_dictionaries(
    {},
    optional={
        "ID": _field(st.text(max_size=12)),
        "Service": _field(st.text(max_size=12)),
        "Address": _field(st.sampled_from(["", "127.0.0.1", "::1", "host.internal"])),
        "Port": _field(st.integers(min_value=-1, max_value=70_000)),
        "Weights": _field(
            st.fixed_dictionaries(
                {},
                optional={
                    "Passing": _field(st.integers(-5, 2**40)),
                    "Warning": _field(st.integers(-5, 2**40)),
                },
            )
        ),
        "Meta": _field(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)),
        "Tags": _field(st.lists(st.text(max_size=6), max_size=3)),
    },
)
_node = st.fixed_dictionaries(
    {},
    optional={
        "Node": _field(st.text(max_size=12)),
        "Address": _field(st.sampled_from(["", "10.0.0.1", "::1"])),
    },
)
_checks = _field(
    st.lists(
        st.fixed_dictionaries(
            {}, optional={"Status": _field(st.sampled_from(["passing", "warning", "critical"]))}
        ),
        max_size=3,
    )
)
_entry = st.one_of(
    st.fixed_dictionaries(
        {"Service": _field(_service), "Node": _field(_node)}, optional={"Checks": _checks}
    ),
    _json,
)
_health_answer = st.one_of(st.lists(_entry, max_size=5), _json)


@settings(max_examples=80, deadline=None)  # each example is a nested document: keep it brisk
@given(_health_answer)
@example([{"Service": {"Port": 80, "Address": "h"}, "Node": {}, "Checks": [{"Status": []}]}])
def test_any_consul_health_json_gives_endpoints_or_a_bad_answer(body: Any) -> None:
    try:
        healthy, unhealthy = _endpoints(body)
    except _BadAnswer:
        return
    for endpoints in (healthy, unhealthy):
        assert isinstance(endpoints, tuple)
        for endpoint in endpoints:
            assert isinstance(endpoint, Endpoint)
            assert 0 < endpoint.port < 65536
            assert endpoint.host
            assert 1 <= endpoint.weight <= 128
        keys = [(e.node, e.id, e.host, e.port) for e in endpoints]
        assert keys == sorted(keys)


@PROPERTIES
@given(st.integers(-(2**64), 2**64), st.integers(-(2**64), 2**64))
def test_the_next_blocking_index_is_never_below_one_unless_it_resets(last: int, new: int) -> None:
    index = _next_index(last, new)
    if new < last:
        assert index == 0  # went backwards: ask again without blocking
    else:
        assert index >= 1
        assert index == max(new, 1)


@pytest.mark.parametrize("value", ["²", "³", "¹"])
def test_superscript_digits_in_headers_are_refused_not_crashing(value: str) -> None:
    # Found by the properties above: "²".isdigit() is True, but int("²") raises.
    assert parse_deadline_header(value) is None
    assert parse_retry_after(value) is None


# ----------------------------------------------------------------------------- config entries

_ROUTING_KINDS = ["service-router", "service-splitter", "service-resolver", "service-defaults"]
_small_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 700), st.text(max_size=8)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_config_entry = st.fixed_dictionaries(
    {
        "Kind": _field(st.sampled_from(_ROUTING_KINDS)),
        "Name": _field(st.sampled_from(["web", "api"])),
    },
    optional={
        "Routes": _field(
            st.lists(
                st.fixed_dictionaries(
                    {}, optional={"Match": _field(st.fixed_dictionaries({"HTTP": _small_json}))}
                ),
                max_size=2,
            )
        ),
        "Splits": _field(
            st.lists(
                st.fixed_dictionaries({"Weight": _field(st.sampled_from([0, 50, 100]))}),
                max_size=2,
            )
        ),
        "Subsets": _field(
            st.dictionaries(
                st.text(max_size=4),
                st.fixed_dictionaries({"Filter": _field(st.text(max_size=20))}),
                max_size=2,
            )
        ),
        "Failover": _small_json,
        "Redirect": _small_json,
        "ConnectTimeout": _small_json,
    },
)


@PROPERTIES
@given(st.lists(_config_entry, max_size=3))
@example([{"Kind": "service-resolver", "Name": "web", "Failover": [None]}])
def test_any_config_entries_compile_or_raise_value_error(entries: list[Any]) -> None:
    from meshlib.routing._entries import compile_entries

    try:
        chains = compile_entries(entries)
    except ValueError:
        return
    assert set(chains) == {entry["Name"] for entry in entries}  # one chain per named service


@PROPERTIES
@given(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            [
                'Service.Meta.version == "v1"',
                "Service.Tags contains canary",
                'not (Service.Meta.zone == "a")',
                "((((",
                "Service.Meta.version ==",
                '"',
                "and or not",
            ]
        ),
    )
)
def test_a_subset_filter_compiles_or_raises_value_error(text: str) -> None:
    from meshlib.routing._filter import compile_filter

    try:
        compile_filter(text)
    except ValueError:
        return


# ----------------------------------------------------------------------------- inbound headers

# What an HTTP/1.1 server hands an app as a header value: visible latin-1 and tabs.
_header_value = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))
    .map(str.strip)
    .filter(bool),
    st.sampled_from(
        [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-xyz-b7ad6b7169203331-01",
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "²",
        ]
    ),
)


@settings(max_examples=60, deadline=None)
@given(traceparent=_header_value, tracestate=_header_value, deadline=_header_value)
def test_inbound_trace_and_deadline_headers_never_break_a_request(
    traceparent: str, tracestate: str, deadline: str
) -> None:
    import asyncio

    import httpx

    import meshlib

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call() -> int:
        config = load_config({"MESH_UNIDENTIFIED_DEADLINE": "honour"})
        middleware = meshlib.ASGIMiddleware(app, config=config)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {
                "traceparent": traceparent.encode("latin-1"),
                "tracestate": tracestate.encode("latin-1"),
                "x-mesh-deadline-ms": deadline.encode("latin-1"),
            }
            response = await client.get("/work", headers=headers)
            return response.status_code

    status = asyncio.run(call())
    gone = deadline.isascii() and deadline.isdigit() and len(deadline) <= 9 and int(deadline) == 0
    assert status == (504 if gone else 200)  # 504: a budget of 0 ms is already spent


# ----------------------------------------------------------------------------- the local file

_instance = st.fixed_dictionaries(
    {},
    optional={
        "address": _field(st.sampled_from(["127.0.0.1:8001", "[::1]:9001", "host", "h:99999"])),
        "meta": _field(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
        "tags": _field(st.lists(st.text(max_size=4), max_size=2)),
        "weight": _field(st.integers(-1, 5)),
        "id": _small_json,
    },
)
_local_document = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "services": _field(
                st.dictionaries(
                    st.sampled_from(["web", "api"]), _field(st.lists(_instance, max_size=3))
                )
            ),
            "config_entries": _field(st.lists(_config_entry, max_size=2)),
        },
    ),
    _small_json,
)


@PROPERTIES
@given(st.one_of(_local_document.map(json.dumps), st.text(max_size=30)))
@example('{"services": [null]}')  # found by this test: raised AttributeError
def test_any_local_config_file_parses_or_raises_value_error(text: str) -> None:
    from meshlib.routing._local import LocalConfig, parse

    try:
        config = parse(text)
    except ValueError:
        return
    assert isinstance(config, LocalConfig)
    for endpoints in config.services.values():
        assert all(0 < endpoint.port < 65536 and endpoint.weight >= 1 for endpoint in endpoints)
