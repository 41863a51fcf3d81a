"""Subset filters evaluate as Consul evaluates them."""

from __future__ import annotations

import pytest

from meshlib.routing._filter import EndpointView, compile_filter

V1 = EndpointView("forecast", "f-1", "10.0.0.1", 8001, "n1", {"version": "v1"}, ("blue",))
V2 = EndpointView(
    "forecast", "f-2", "10.0.0.2", 8001, "n2", {"version": "v2", "zone": "a"}, ("canary",)
)


@pytest.mark.parametrize(
    ("expression", "matches"),
    [
        ("Service.Meta.version == v1", {"f-1"}),
        ('Service.Meta.version == "v2"', {"f-2"}),
        ("Service.Meta.version != v1", {"f-2"}),
        ('"canary" in Service.Tags', {"f-2"}),
        ("canary not in Service.Tags", {"f-1"}),
        ("Service.Tags contains blue", {"f-1"}),
        ("Service.Meta.zone is empty", {"f-1"}),
        ("Service.Meta.zone is not empty", {"f-2"}),
        ('Service.ID matches "^f-[12]$"', {"f-1", "f-2"}),
        ("Service.ID not matches 2", {"f-1"}),
        ("Service.Meta.version == v2 and canary in Service.Tags", {"f-2"}),
        ("Service.Meta.version == v1 or canary in Service.Tags", {"f-1", "f-2"}),
        ("not (Service.Meta.version == v1)", {"f-2"}),
        ("Node.Node == n1", {"f-1"}),
        ("Service.Meta.missing == x", set()),
    ],
)
def test_filters_select_the_endpoints_consul_would(expression: str, matches: set[str]) -> None:
    predicate = compile_filter(expression)
    assert {e.id for e in (V1, V2) if predicate(e)} == matches


@pytest.mark.parametrize(
    "expression", ["Service.Meta.version ==", "(a == b", "a ~~ b", "a is full", '"unclosed']
)
def test_bad_filters_are_refused_with_a_reason(expression: str) -> None:
    with pytest.raises(ValueError, match="filter"):
        compile_filter(expression)
