"""Load balancing: every policy's distribution, weights, stickiness, and sharing by threads."""

from __future__ import annotations

import gc
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

import meshlib.balance
from meshlib._config import LB_POLICIES, LbPolicy, ServicePolicy
from meshlib._service import ServiceState
from meshlib.balance import (
    Balancer,
    EndpointState,
    LeastRequest,
    P2CEwma,
    PeakEwma,
    RingHash,
    RoundRobin,
    WeightedRandom,
    make_balancer,
)
from meshlib.balance._ring_hash import _MAX_NODES, _Ring
from meshlib.balance._round_robin import _GENERATION
from meshlib.discovery import Endpoint, Snapshot


def states(*weights: int, host: str = "10.0.0") -> list[EndpointState]:
    """One endpoint per weight, on ports 8001, 8002, ..."""
    return [
        EndpointState(Endpoint(f"{host}.{i}", 8000 + i, weight=weight))
        for i, weight in enumerate(weights, 1)
    ]


def counts(
    balancer: Balancer, candidates: Sequence[EndpointState], picks: int, key: str | None = None
) -> list[int]:
    """How many of ``picks`` went to each candidate, in candidate order."""
    got = Counter(balancer.pick(candidates, key) for _ in range(picks))
    return [got[state] for state in candidates]


def shares(numbers: list[int]) -> list[float]:
    total = sum(numbers)
    return [n / total for n in numbers]


def owners(balancer: Balancer, candidates: Sequence[EndpointState], keys: int) -> list[int]:
    """For keys ``user-0`` ... the port of the endpoint each is sent to."""
    return [balancer.pick(candidates, f"user-{i}").endpoint.port for i in range(keys)]


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make threads switch as often as possible, so races show up in a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


# --------------------------------------------------------------------------- every policy


def test_balance_exports_exactly_its_public_names() -> None:
    assert meshlib.balance.__all__ == [
        "Balancer",
        "EndpointState",
        "LeastRequest",
        "P2CEwma",
        "PeakEwma",
        "RingHash",
        "RoundRobin",
        "WeightedRandom",
        "make_balancer",
    ]
    for name in meshlib.balance.__all__:
        assert getattr(meshlib.balance, name).__doc__, name


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        ("round_robin", RoundRobin),
        ("least_request", LeastRequest),
        ("p2c_ewma", P2CEwma),
        ("random", WeightedRandom),
        ("ring_hash", RingHash),
    ],
)
def test_make_balancer_makes_the_named_policy(policy: LbPolicy, kind: type) -> None:
    assert isinstance(make_balancer(policy), kind)


def test_make_balancer_names_the_valid_policies_when_given_an_unknown_one() -> None:
    with pytest.raises(ValueError, match="'fastest': expected one of round_robin, least_request"):
        make_balancer("fastest")  # type: ignore[arg-type]


def test_make_balancer_makes_a_new_balancer_per_call() -> None:
    assert make_balancer("round_robin") is not make_balancer("round_robin")


@pytest.mark.parametrize("policy", LB_POLICIES)
@pytest.mark.parametrize("key", [None, "user-1"])
def test_every_policy_picks_the_only_candidate(policy: LbPolicy, key: str | None) -> None:
    balancer = make_balancer(policy)
    (only,) = states(3)
    assert all(balancer.pick([only], key) is only for _ in range(20))


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_every_policy_copes_with_candidates_that_change_between_calls(policy: LbPolicy) -> None:
    balancer = make_balancer(policy)
    endpoints = states(1, 2, 3, 1, 2, 3)
    rng = random.Random(7)
    seen: set[EndpointState] = set()
    for i in range(3000):
        candidates = rng.sample(endpoints, rng.randint(1, len(endpoints)))
        picked = balancer.pick(candidates, f"user-{i % 100}")
        assert any(picked is state for state in candidates)
        seen.add(picked)
    assert len(seen) == len(endpoints)


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_every_policy_can_be_shared_by_threads(policy: LbPolicy, busy_switching: None) -> None:
    balancer = make_balancer(policy)
    endpoints = states(1, 2, 3, 4)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(2000):
                candidates = rng.sample(endpoints, rng.randint(1, len(endpoints)))
                assert balancer.pick(candidates, f"user-{i % 50}") in candidates
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --------------------------------------------------------------------------- round_robin


def test_round_robin_gives_equal_endpoints_exactly_equal_shares() -> None:
    assert counts(RoundRobin(), states(1, 1, 1), 300) == [100, 100, 100]


def test_round_robin_gives_weighted_endpoints_exactly_their_shares() -> None:
    assert counts(RoundRobin(), states(1, 2, 3), 600) == [100, 200, 300]


def test_round_robin_interleaves_weighted_picks_smoothly() -> None:
    candidates = states(1, 2, 3)
    balancer = RoundRobin()
    names = {state: name for state, name in zip(candidates, "ABC", strict=True)}
    order = "".join(names[balancer.pick(candidates, None)] for _ in range(600))
    assert order[:6] == "CBACBC"  # nginx's smooth order, not "CCCBBA"
    # Any six consecutive picks hold exactly one A, two B and three C ...
    for start in range(len(order) - 6):
        assert sorted(order[start : start + 6]) == list("ABBCCC")
    # ... and no endpoint gets more than two in a row.
    assert "AA" not in order
    assert "BB" not in order
    assert "CCC" not in order


def test_round_robin_stays_exact_while_an_endpoint_sits_rounds_out() -> None:
    a, b, _ = candidates = states(1, 1, 1)
    balancer = RoundRobin()
    assert counts(balancer, candidates, 300) == [100, 100, 100]
    assert counts(balancer, [a, b], 200) == [100, 100]  # c ejected, say
    assert counts(balancer, candidates, 300) == [100, 100, 100]


def test_round_robin_counts_a_retry_in_the_round() -> None:
    candidates = states(1, 1, 1)
    balancer = RoundRobin()
    first = balancer.pick(candidates, None)
    retry = balancer.pick([s for s in candidates if s is not first], None)
    assert retry is not first
    rest = Counter(balancer.pick(candidates, None) for _ in range(298))
    assert sorted((rest + Counter([first, retry])).values()) == [100, 100, 100]


def test_round_robin_follows_a_weight_change() -> None:
    _, b = candidates = states(1, 1)
    balancer = RoundRobin()
    assert counts(balancer, candidates, 100) == [50, 50]
    b.rebind(Endpoint(b.endpoint.host, b.endpoint.port, weight=3))
    assert counts(balancer, candidates, 400) == [100, 300]


def test_round_robin_forgets_endpoints_the_service_no_longer_lists() -> None:
    steady = states(1, 1, 1)
    balancer = RoundRobin()
    for i in range(1000):  # a new short-lived endpoint every pick
        (passing,) = states(1, host=f"10.9.{i % 250}")
        balancer.pick([*steady, passing], None)
    del passing
    for _ in range(2 * _GENERATION):
        balancer.pick(steady, None)
    gc.collect()
    alive = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, EndpointState) and obj.endpoint.host.startswith("10.9.")
    ]
    assert alive == []


def test_round_robin_stays_exact_across_its_periodic_cleanup() -> None:
    rounds = 2 * _GENERATION // 6 + 1  # rounds of weights 1+2+3, past two cleanups
    assert counts(RoundRobin(), states(1, 2, 3), 6 * rounds) == [rounds, 2 * rounds, 3 * rounds]


def test_round_robin_shares_stay_exact_when_threads_pick_at_once(busy_switching: None) -> None:
    candidates = states(1, 1, 1)
    balancer = RoundRobin()
    totals: Counter[EndpointState] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        mine = Counter(balancer.pick(candidates, None) for _ in range(3000))
        with lock:
            totals.update(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [totals[state] for state in candidates] == [8000, 8000, 8000]


# --------------------------------------------------------------------------- least_request


def test_least_request_sends_to_the_endpoint_with_fewer_requests_in_flight() -> None:
    _, busy = candidates = states(1, 1)
    busy.in_flight = 5
    assert counts(LeastRequest(rng=random.Random(1)), candidates, 200) == [200, 0]


def test_least_request_never_picks_the_busiest_of_three() -> None:
    candidates = states(1, 1, 1)
    for state, in_flight in zip(candidates, [0, 2, 7], strict=True):
        state.in_flight = in_flight
    idle, _, busiest = counts(LeastRequest(rng=random.Random(1)), candidates, 3000)
    assert busiest == 0
    assert idle > 1800  # it wins every pair it is in: two pairs of three


def test_least_request_keeps_requests_in_flight_in_proportion_to_weight() -> None:
    candidates = states(1, 2, 3)
    balancer = LeastRequest(rng=random.Random(1))
    for _ in range(600):
        balancer.pick(candidates, None).started()  # none finish: sustained load
    in_flight = [state.in_flight for state in candidates]
    assert in_flight == pytest.approx([100, 200, 300], abs=5)


def test_least_request_shares_idle_endpoints_by_weight() -> None:
    got = counts(LeastRequest(rng=random.Random(1)), states(1, 2, 3), 60_000)
    assert shares(got) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.01)


# --------------------------------------------------------------------------- p2c_ewma


def test_p2c_ewma_moves_traffic_away_from_a_slow_endpoint() -> None:
    candidates = states(1, 1, 1)
    latency = dict(zip(candidates, [0.100, 0.001, 0.001], strict=True))
    balancer = P2CEwma(rng=random.Random(1))
    picks: Counter[EndpointState] = Counter()
    for _ in range(1000):
        state = balancer.pick(candidates, None)
        state.ewma.observe(latency[state])
        picks[state] += 1
    slow, fast, also_fast = (picks[state] for state in candidates)
    assert slow < 50
    assert fast > 400
    assert also_fast > 400


def test_p2c_ewma_avoids_an_endpoint_with_requests_piling_up() -> None:
    candidates = states(1, 1, 1)
    now = time.monotonic()
    for state in candidates:
        state.ewma.observe(0.010, now)
    candidates[0].in_flight = 10
    assert counts(P2CEwma(rng=random.Random(1)), candidates, 300)[0] == 0


def test_p2c_ewma_measures_an_unmeasured_endpoint_first() -> None:
    measured, _ = candidates = states(1, 1)
    measured.ewma.observe(0.010)
    assert counts(P2CEwma(rng=random.Random(1)), candidates, 50) == [0, 50]


def test_p2c_ewma_keeps_requests_in_flight_in_proportion_to_weight() -> None:
    candidates = states(1, 2, 3)
    now = time.monotonic()
    for state in candidates:
        state.ewma.observe(0.010, now)  # equal latency
    balancer = P2CEwma(rng=random.Random(1))
    for _ in range(600):
        balancer.pick(candidates, None).started()
    in_flight = [state.in_flight for state in candidates]
    assert in_flight == pytest.approx([100, 200, 300], abs=5)


def test_p2c_ewma_shares_idle_endpoints_by_weight() -> None:
    got = counts(P2CEwma(rng=random.Random(1)), states(1, 2, 3), 60_000)
    assert shares(got) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.01)


# --------------------------------------------------------------------------- slow start


def joined(costs: list[float], policy: ServicePolicy) -> tuple[ServiceState, EndpointState]:
    """A service whose endpoints measured ``costs``, then one more endpoint joins it."""
    service = ServiceState("weather", policy)
    endpoints = tuple(Endpoint("10.0.0.1", 8000 + i) for i in range(len(costs)))
    service.update(Snapshot("weather", endpoints))
    now = time.monotonic()
    for state, cost in zip(service.endpoints, costs, strict=True):
        state.ewma.observe(cost, now)
    service.update(Snapshot("weather", (*endpoints, Endpoint("10.0.0.2", 8000)), index=1))
    return service, service.endpoints[-1]


def test_a_new_endpoint_starts_at_its_peers_median_cost_and_a_tenth_of_its_share() -> None:
    """Slow start: a joining endpoint is neither probed by every request at once nor
    starved; it starts at its peers' median estimate and, under load, carries about a
    tenth of a peer's requests in flight (Envoy's 10% minimum), ramping from there."""
    service, new = joined([0.010, 0.020, 0.030], ServicePolicy(slow_start=10.0))
    assert new.ewma.cost() == pytest.approx(0.020, rel=0.05)
    assert all(state.ramp_until == 0.0 for state in service.endpoints[:3])  # not joining
    balancer = P2CEwma(rng=random.Random(1))
    for peer in service.endpoints[:3]:
        peer.ewma = PeakEwma(seed=0.020)  # all equal to it: only the ramp differs
    for _ in range(600):
        balancer.pick(service.endpoints, None).started()
    peers = sum(state.in_flight for state in service.endpoints[:3]) / 3
    assert 0.05 * peers <= new.in_flight <= 0.15 * peers, (new.in_flight, peers)


def test_the_first_endpoints_of_a_service_and_slow_start_off_do_not_ramp() -> None:
    service = ServiceState("weather", ServicePolicy(slow_start=10.0))
    service.update(Snapshot("weather", (Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.1", 8001))))
    assert all(state.ramp_until == 0.0 == state.warm_until for state in service.endpoints)
    _, new = joined([0.010, 0.020], ServicePolicy(slow_start=0.0))
    assert new.ramp_until == 0.0 == new.warm_until
    assert new.ewma.cost() == 0.0  # as before: unmeasured, so probed first


def test_slow_start_forgives_slow_first_answers_and_ends_with_its_window() -> None:
    """In its window an endpoint's estimate holds no peak and forgets with a tenth of the
    window as time constant: a 1.5 s cold answer is down to peers' 10 ms within ~5 s (at
    peak-EWMA's 10 s it would take ~50 s). After the window, peaks count again."""
    _, new = joined([0.010, 0.010], ServicePolicy(slow_start=10.0))
    start = new.warm_from
    new.ewma.observe(1.5, start + 0.5)
    assert new.ewma.cost(start + 0.5) < 1.5  # blended, not held at the peak
    assert new.ewma.cost(start + 6.0) < 0.010
    new.started()
    new.finished(time.monotonic() - 0.05)  # a sample inside the window: still forgiving
    assert new.ewma.peak is False
    new.warm_until = time.monotonic()  # the window is over
    new.started()
    new.finished(time.monotonic() - 0.3)
    assert new.ewma.peak is True
    assert new.ewma.cost() >= 0.3  # a slow answer now holds, as peak-EWMA does


def test_a_forgiven_estimate_stays_forgiven_when_the_window_ends() -> None:
    """A cold answer decayed at the slow-start time constant is not brought back by the
    normal one when the first sample after the window arrives (it came back as 0.64 s)."""
    ewma = PeakEwma(1.0, seed=0.001, peak=False, now=0.0)  # a 10 s window's constant
    ewma.observe(1.5, 1.5)  # the cold answer, forgiven over the next seconds
    ewma.settle(10.0)  # the window is over; the next sample comes now
    ewma.observe(0.001, 10.0)
    assert ewma.cost(10.0) < 0.01


def test_a_readmitted_endpoint_is_probed_first_and_its_first_answer_counts_whole() -> None:
    """Back from an ejection: unmeasured (probed first), and its first answer sets its
    estimate, not a blend of it into 0 that would draw every request to it at once."""
    state = EndpointState(Endpoint("10.0.0.1", 8000))
    state.begin_slow_start(time.monotonic(), 10.0)
    assert state.load(time.monotonic()) == 0.0
    state.started()
    state.finished(time.monotonic() - 0.02)
    assert state.ewma.cost() == pytest.approx(0.02, rel=0.2)


def test_a_failure_in_slow_start_still_costs_its_floor() -> None:
    """A failed attempt's floor (above the costliest peer, ``_pipeline._FAILURE_COST``) holds
    even while slow start forgives slow answers: failing fast never draws traffic."""
    _, new = joined([0.010, 0.010], ServicePolicy(slow_start=10.0))
    new.started()
    new.finished(time.monotonic(), floor=0.011)
    assert new.ewma.cost() == pytest.approx(0.011, rel=0.05)


# --------------------------------------------------------------------------- random


def test_random_shares_picks_by_weight() -> None:
    got = counts(WeightedRandom(rng=random.Random(1)), states(1, 2, 3), 60_000)
    assert shares(got) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.01)


def test_random_with_the_same_seed_picks_the_same_endpoints() -> None:
    candidates = states(1, 2, 3)
    first = [WeightedRandom(rng=random.Random(5)).pick(candidates, None) for _ in range(50)]
    again = [WeightedRandom(rng=random.Random(5)).pick(candidates, None) for _ in range(50)]
    assert first == again


# --------------------------------------------------------------------------- ring_hash


def test_ring_hash_sends_the_same_key_to_the_same_endpoint() -> None:
    candidates = states(1, 1, 1, 1)
    balancer = RingHash()
    before = owners(balancer, candidates, 200)
    assert owners(balancer, candidates, 200) == before
    assert owners(balancer, list(reversed(candidates)), 200) == before
    assert owners(RingHash(), candidates, 200) == before  # a new balancer (or process)


def test_ring_hash_places_keys_the_same_in_every_release() -> None:
    # Clients of one service, old and new versions alike, must agree on where a key goes:
    # changing the ring's layout is a breaking change (and Python's hash() would fail this).
    candidates = [EndpointState(Endpoint("10.0.0.1", 80, id=f"web-{i}")) for i in range(4)]
    placed = "".join(RingHash().pick(candidates, f"user-{i}").endpoint.id[-1] for i in range(24))
    assert placed == "132133332231300331122031"


def test_ring_hash_spreads_keys_over_the_endpoints() -> None:
    got = Counter(owners(RingHash(), states(1, 1, 1, 1), 1000))
    assert len(got) == 4
    assert all(150 <= n <= 350 for n in got.values()), got


def test_ring_hash_gives_heavier_endpoints_more_keys() -> None:
    candidates = states(1, 1, 2)
    got = Counter(owners(RingHash(), candidates, 4000))
    assert shares([got[s.endpoint.port] for s in candidates]) == pytest.approx(
        [0.25, 0.25, 0.5], abs=0.06
    )


def test_ring_hash_moves_only_the_keys_of_a_missing_endpoint() -> None:
    candidates = states(1, 1, 1, 1, 1)
    balancer = RingHash()
    before = owners(balancer, candidates, 1000)
    gone = candidates[2]
    after = owners(balancer, [s for s in candidates if s is not gone], 1000)
    port = gone.endpoint.port
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert moved, "the missing endpoint owned no keys"
    assert all(old == port for old, _ in moved)  # only its keys moved ...
    assert len(moved) == before.count(port)  # ... all of them ...
    assert len({new for _, new in moved}) >= 3  # ... and spread over the rest
    assert owners(balancer, candidates, 1000) == before  # back: its keys come back


def test_ring_hash_moves_only_the_keys_of_missing_endpoints_on_a_large_ring() -> None:
    # Enough weight that the ring is capped (fewer nodes per weight): a subset must still be
    # looked up on the same ring, not on one rebuilt with more nodes per weight.
    candidates = states(*[5] * 40)
    balancer = RingHash()
    before = owners(balancer, candidates, 2000)
    gone = {s.endpoint.port for s in candidates[::7]}
    after = owners(balancer, [s for s in candidates if s.endpoint.port not in gone], 2000)
    assert all(old in gone for old, new in zip(before, after, strict=True) if old != new)
    assert set(after).isdisjoint(gone)


def test_ring_hash_gives_a_new_endpoint_only_keys_it_takes_over() -> None:
    candidates = states(1, 1, 1, 1, 1)
    new = candidates[-1]
    balancer = RingHash()
    before = owners(balancer, candidates[:-1], 1000)
    after = owners(balancer, candidates, 1000)
    moved = [new_owner for old, new_owner in zip(before, after, strict=True) if old != new_owner]
    assert moved
    assert set(moved) == {new.endpoint.port}


def test_ring_hash_keeps_keys_on_an_endpoint_whose_weight_grows() -> None:
    _, b = candidates = states(1, 1)
    balancer = RingHash()
    before = owners(balancer, candidates, 2000)
    b.rebind(Endpoint(b.endpoint.host, b.endpoint.port, weight=3))
    after = owners(balancer, candidates, 2000)
    port_b = b.endpoint.port
    assert all(new == port_b for old, new in zip(before, after, strict=True) if old == port_b)
    assert after.count(port_b) / 2000 == pytest.approx(0.75, abs=0.06)


def test_ring_hash_without_a_key_shares_picks_by_weight() -> None:
    got = counts(RingHash(rng=random.Random(1)), states(1, 3), 40_000, key=None)
    assert shares(got) == pytest.approx([0.25, 0.75], abs=0.01)


def test_ring_hash_stays_small_and_fair_with_very_large_weights() -> None:
    # Consul weights can be large: the ring stays within its cap (memory, build time)
    # and shares still follow weight.
    candidates = states(10_000, 10_000, 20_000)
    assert len(_Ring(candidates).positions) <= _MAX_NODES + len(candidates)
    got = Counter(owners(RingHash(), candidates, 4000))
    assert shares([got[s.endpoint.port] for s in candidates]) == pytest.approx(
        [0.25, 0.25, 0.5], abs=0.06
    )
