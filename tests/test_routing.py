"""Routing chains compiled from Consul-shaped config entries, evaluated per request."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import httpx
import pytest

from meshlib.routing import Chain, compile_entries

RESOLVER = {
    "Kind": "service-resolver",
    "Name": "forecast",
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2"},
    },
    "Failover": {"*": {"Datacenters": ["dc2"]}},
    "ConnectTimeout": "2s",
}
SPLITTER = {
    "Kind": "service-splitter",
    "Name": "forecast",
    "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}],
}
ROUTER = {
    "Kind": "service-router",
    "Name": "forecast",
    "Routes": [
        {
            "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
            "Destination": {"ServiceSubset": "v2"},
        },
        {
            "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["POST"]}},
            "Destination": {
                "Service": "admin",
                "RequestTimeout": "500ms",
                "NumRetries": 0,
                "RetryOnStatusCodes": [500],
            },
        },
        {
            "Match": {"HTTP": {"QueryParam": [{"Name": "beta", "Present": True}]}},
            "Destination": {"ServiceSubset": "v2", "NumRetries": 5},
        },
    ],
}


def chain(*entries: dict[str, Any]) -> Chain:
    return compile_entries(list(entries))["forecast"]


def decide(c: Chain, **kwargs: Any) -> Any:
    request: dict[str, Any] = {"method": "GET", "path": "/", "headers": {}, "query": {}}
    request.update(kwargs)
    return c.decide(**request, rng=random.Random(1))


def test_a_weighted_split_sends_each_subset_its_share() -> None:
    c = chain(RESOLVER, SPLITTER)
    rng = random.Random(42)
    counts = Counter(c.decide("GET", "/", {}, {}, rng=rng).target.subset for _ in range(10_000))
    assert abs(counts["v2"] / 10_000 - 0.10) <= 0.02
    assert counts["v1"] + counts["v2"] == 10_000


def test_a_sticky_key_takes_one_split_always_and_the_keys_follow_the_weights() -> None:
    """The local file's chain splits by the key's hash, as Consul's compiled chain does."""
    c = chain(RESOLVER, SPLITTER)
    rng = random.Random(7)
    subsets = {
        user: {
            c.decide("GET", "/", {}, {}, rng=rng, sticky_key=user).target.subset for _ in range(5)
        }
        for user in (f"user-{i}" for i in range(2000))
    }
    assert all(len(seen) == 1 for seen in subsets.values())
    share = sum(seen == {"v2"} for seen in subsets.values()) / 2000
    assert abs(share - 0.10) <= 0.02


def test_a_header_pins_a_request_to_a_subset() -> None:
    c = chain(RESOLVER, SPLITTER, ROUTER)
    rng = random.Random(3)
    pinned = {
        c.decide("GET", "/", {"x-canary": "1"}, {}, rng=rng).target.subset for _ in range(200)
    }
    assert pinned == {"v2"}


def test_routes_match_path_method_and_query_and_carry_their_own_settings() -> None:
    c = chain(RESOLVER, SPLITTER, ROUTER)
    admin = decide(c, method="POST", path="/admin/reload")
    assert admin.target.service == "admin"
    assert (admin.request_timeout, admin.num_retries, admin.retry_on_status) == (
        0.5,
        0,
        frozenset({500}),
    )
    assert decide(c, method="GET", path="/admin/reload").target.service == "forecast"
    beta = decide(c, query={"beta": ""})
    assert (beta.target.subset, beta.num_retries) == ("v2", 5)


def test_the_resolver_gives_subset_filters_defaults_and_failover() -> None:
    c = chain(RESOLVER)
    target = decide(c).target
    assert target.subset == "v1"  # the default subset
    assert target.filter == "Service.Meta.version == v1"
    assert target.connect_timeout == 2.0
    assert [(t.service, t.subset, t.datacenter) for t in target.failover] == [
        ("forecast", "v1", "dc2")
    ]
    assert target.key == "v1.forecast."


def test_a_subsets_only_passing_goes_with_its_targets_failover_included() -> None:
    subsets = {
        "v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": True},
        "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": False},
    }
    c = chain({**RESOLVER, "Subsets": subsets})
    v1 = decide(c).target  # the default subset
    assert (v1.subset, v1.only_passing) == ("v1", True)
    assert [(t.datacenter, t.only_passing) for t in v1.failover] == [("dc2", True)]
    assert c.target("forecast", "v2").only_passing is False
    assert decide(chain(RESOLVER)).target.only_passing is False  # Consul's default
    assert Chain("geo").target("geo").only_passing is False  # no subset: false


def test_a_redirect_sends_to_another_service() -> None:
    entries = [
        {"Kind": "service-resolver", "Name": "forecast", "Redirect": {"Service": "weather"}},
        {"Kind": "service-resolver", "Name": "weather", "Subsets": {"a": {"Filter": "x == y"}}},
    ]
    assert compile_entries(entries)["forecast"].decide("GET", "/", {}, {}).target.service == (
        "weather"
    )


def test_without_entries_a_service_routes_to_itself() -> None:
    c = Chain("geo")
    assert decide(c).target.key == ".geo."


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"Kind": "service-splitter", "Name": "forecast", "Splits": [{"Weight": 50}]}],
            "add up to 50, not 100",
        ),
        ([{"Kind": "service-exporter", "Name": "forecast"}], "Kind 'service-exporter'"),
        ([{"Kind": "service-router"}], "Name must be a service name"),
        ([SPLITTER], "subset 'v1' of 'forecast' is not defined"),
        ([{**RESOLVER, "DefaultSubset": "v9"}], "DefaultSubset 'v9'"),
        ([{**RESOLVER, "Subsets": {"v1": {"Filter": "Service.Meta.version =="}}}], "Subsets.v1"),
        ([{**RESOLVER, "ConnectTimeout": "soon"}], "not a duration"),
        (
            [{**RESOLVER, "Subsets": {"v1": {"OnlyPassing": "yes"}}}],
            "Subsets.v1: OnlyPassing must be true or false",
        ),
        ([RESOLVER, RESOLVER], "defined twice"),
        (
            [
                {
                    "Kind": "service-router",
                    "Name": "forecast",
                    "Routes": [{"Destination": {"NumRetries": 99}}],
                }
            ],
            "NumRetries",
        ),
        (["not an entry"], "expected an object"),
    ],
)
def test_malformed_entries_are_refused_naming_the_entry_and_field(
    entries: list[Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_entries(entries)


def test_a_resolver_load_balancer_gives_ring_hash_and_a_key_from_its_hash_policies() -> None:
    resolver = {
        **RESOLVER,
        "LoadBalancer": {
            "Policy": "maglev",
            "HashPolicies": [
                {"Field": "header", "FieldValue": "X-User"},
                {"Field": "cookie", "FieldValue": "session", "Terminal": True},
                {"Field": "query_parameter", "FieldValue": "region"},
            ],
        },
    }
    c = chain(resolver)
    balancer = decide(c).target.load_balancer
    assert balancer.policy == "ring_hash"
    both = balancer.key({"x-user": "ada", "cookie": "session=s1"}, {"region": "eu"})
    assert both == balancer.key({"x-user": "ada", "cookie": "session=s1"}, {"region": "us"})
    assert both != balancer.key({"x-user": "bob", "cookie": "session=s1"}, {})
    assert balancer.key({}, {"region": "eu"}) is not None  # the terminal one found nothing
    assert balancer.key({}, {}) is None


@pytest.mark.parametrize(
    ("load_balancer", "problem"),
    [
        ({"Policy": "fastest"}, "Policy 'fastest' is not one of"),
        ({"HashPolicies": [{"Field": "body"}]}, "Field must be one of"),
        ({"HashPolicies": {"Field": "header"}}, "HashPolicies is not a list"),
    ],
)
def test_a_malformed_load_balancer_is_refused_naming_the_field(
    load_balancer: Any, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        chain({**RESOLVER, "LoadBalancer": load_balancer})


def test_a_prefix_rewrite_needs_a_path_match_and_replaces_an_exact_path_whole() -> None:
    with pytest.raises(ValueError, match="PrefixRewrite needs a PathPrefix or PathExact"):
        chain({**ROUTER, "Routes": [{"Destination": {"PrefixRewrite": "/v2"}}]})
    exact = {
        **ROUTER,
        "Routes": [
            {"Match": {"HTTP": {"PathExact": "/old"}}, "Destination": {"PrefixRewrite": "/new"}}
        ],
    }
    edits = decide(chain(exact), path="/old").edits
    request = httpx.Request("GET", "http://forecast/old?q=1")
    edits.apply_request(request)
    assert str(request.url) == "http://forecast/new?q=1"


def test_retry_on_conditions_are_read_and_unknown_ones_refused() -> None:
    def route(destination: dict[str, Any]) -> dict[str, Any]:
        return {**ROUTER, "Routes": [{"Destination": destination}]}

    decision = decide(chain(route({"RetryOn": ["reset"], "RetryOnConnectFailure": True})))
    assert decision.retry_on == {"reset", "connect-failure"}
    assert decide(chain(route({"NumRetries": 1}))).retry_on is None
    with pytest.raises(ValueError, match="RetryOn 'sometimes' is not one of"):
        chain(route({"RetryOn": ["sometimes"]}))
