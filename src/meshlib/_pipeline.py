"""One logical request through the mesh, as a sans-IO state machine.

The sync and async transports (client.py) are thin loops around ``Call``: they ask it for
an attempt, do the I/O, tell it what happened, and sleep as long as it says. Every policy
decision lives here, once. The stages, outermost first, and why they sit where they do:

1. **classify, route, limits** (``Admission``, which makes the Call):
   ``Mesh.lookup`` (waiting once for discovery of a service never called), then only mesh
   services go on; other hosts pass the egress policy and go through untouched but for
   their telemetry (``OutboundTelemetry.external``: a span, the duration, a log line).
   ``Mesh.route`` follows the discovery chain (router, splitter, resolver: the target
   and the route's timeout and retry settings the Call takes over) and applies Consul's
   ``MaxConcurrentRequests``; ``Mesh.pending`` its ``MaxConnections`` /
   ``MaxPendingRequests``. A refusal there (``NoHealthyEndpoints``, ``CircuitOpen``) is
   recorded as any failure is, one CLIENT span and one duration observation
   (``OutboundTelemetry.failed_early``). The transports only do its waits (``Wait``).
2. **deadline** (``Call.__init__``): one budget for the whole logical request, capped by the
   deadline of the inbound request being served, so no retry or backoff can outlive it.
   It is checked before every attempt and sent downstream with each. An attempt cut short
   by the *caller's* deadline (the inbound one) says nothing about the endpoint: it is no
   failure for ejection or the breaker, and its time is only a lower bound of latency
   (``Call.attempt_failed``), so a caller's short deadline cannot eject healthy upstreams.
3. **breaker** (the first ``Call.start_attempt``, and ``Call.finish``): a per-service gate
   on *requests*: it admits a request before its first attempt and hears the request's
   final outcome, after retries. Failing instances are the business of retries and
   ejection; the breaker opens only when the service as a whole keeps failing requests
   (counting attempts, it opened while two of three instances were healthy and only the
   third kept dying). Half-open, a bounded number of requests probe.
4. **retry** (``Call.attempt_failed`` / ``Call.attempt_responded``): sits *above* balance so
   each retry can land on a different endpoint, and above ejection so it sees every
   attempt, not only the last. Only retryable outcomes, only requests that are safe to
   resend, within the service's retry budget, never past the deadline.
   **Hedging** (opt-in, ``Call.start_hedge``) is the retry stage acting early: when the
   first attempt has not answered after the hedge delay, one more attempt starts on
   another endpoint while the first goes on; the first usable answer wins and the other
   is cancelled (``Call.attempt_cancelled``), which is neither a failure for ejection
   nor a second outcome for the breaker. Same safety rule and budget as retries.
5. **balance** (``Call.start_attempt``): choose among endpoints that are not ejected and, if
   possible, not yet tried by this request; panic mode uses all when too few remain.
6. **attempt** (the transport): per-attempt timeout, ``Host`` kept as the service name,
   the request sent on the pooled inner transport.
7. **outlier ejection** (after each attempt): per-endpoint consecutive failures eject the
   endpoint from balance for a growing time; a refused connection ejects it at once, for
   a short time (nothing listens there). A failure never lowers an endpoint's latency
   estimate below the service's costliest, so failing fast never attracts traffic.

**telemetry** wraps the whole Call (``telemetry/_outbound.py``): it is created first, so
its duration and span cover every attempt and backoff, hears of each attempt as it starts
and ends (attempt spans, ``traceparent``), and records the logical request in the
transports' ``finally``, whatever ended it. When the Call gives up on a failed attempt,
its error is the attempt's own, wrapped to say what was tried (``RequestFailed``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import httpx

from ._call_info import CallInfo
from ._exceptions import (
    CircuitOpen,
    DeadlineExceeded,
    MeshError,
    MeshRequestError,
    NoHealthyEndpoints,
    RequestFailed,
)
from ._runtime import Mesh, Pending
from ._service import ServiceState
from ._urls import with_endpoint
from .balance import EndpointState
from .resilience._deadline import DEADLINE_HEADER, Deadline, inbound_deadline
from .resilience._events import EVENTS
from .resilience._pending import POLL as PENDING_POLL
from .resilience._pending import Ticket
from .resilience._retry import (
    IDEMPOTENT_METHODS,
    OVERLOADED,
    REFUSED,
    Outcome,
    backoff,
    classify_error,
    classify_response,
    parse_retry_after,
    retryable_by_route,
)
from .routing import Decision
from .routing._rewrite import RouteEdits
from .routing._sticky import request_key
from .telemetry._outbound import OutboundTelemetry

__all__ = [
    "WAIT",
    "Admission",
    "Attempt",
    "Call",
    "CallInfo",
    "Wait",
    "clone_request",
    "request_options",
]

#: The per-request options key: ``client.post(url, extensions={"meshlib": {...}})``.
OPTIONS_KEY = "meshlib"
_OPTION_NAMES = frozenset({"retry_non_idempotent", "deadline", "retries", "hedge"})

#: Returned by ``Call.attempt_failed`` / ``attempt_responded`` instead of a delay when
#: another attempt of the request (a hedge) is still in flight: drop this outcome and wait
#: for that one. Only hedged requests ever see it.
WAIT: Final = -1.0
#: Hedged attempts per request beyond the first (gRPC allows up to 4, Finagle 1): one
#: already cuts most of the tail when the delay sits near p95, and each costs a full
#: attempt's load.
MAX_HEDGES: Final = 1


#: An attempt cut short by the inbound caller's deadline: no failure, not retried.
_CUT_SHORT: Final = Outcome(failure=False, retryable=False, sent=True, reason="caller_deadline")
#: How far before the deadline a timeout still counts as the deadline's (timer granularity).
_CUT_SHORT_SLACK: Final = 0.005


def request_options(request: httpx.Request) -> Mapping[str, Any]:
    """The per-request mesh options, validated (a typo raises ``ValueError`` at once)."""
    options = request.extensions.get(OPTIONS_KEY)
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"extensions[{OPTIONS_KEY!r}] must be a mapping, not {options!r}")
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ValueError(
            f"unknown meshlib request option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}"
        )
    return options


#: a failed attempt's latency floor, as a multiple of the service's costliest estimate
#: (above 1 so the failed endpoint is never the cheaper of two; see ``Call._record``)
_FAILURE_COST = 1.1


class Wait(NamedTuple):
    """What an ``Admission`` waits for before it can decide: the first answer of discovery
    for ``service`` (at most ``seconds``), or, with ``service`` empty, a turn for a
    connection (Consul's ``MaxConnections``), asked again after ``seconds``."""

    service: str
    seconds: float


class Admission:
    """Stage 1, sans-IO: which request is the mesh's, where it goes, and whether a limit
    lets it go now. The transports call ``next()`` and do each ``Wait`` it returns until it
    returns None; ``call`` is then the request's ``Call``, or None for a host that is no
    mesh service. ``close()`` in a ``finally`` gives back a turn still waited for."""

    __slots__ = ("_mesh", "_pending", "_request", "_route", "_started", "_ticket", "call")

    def __init__(self, mesh: Mesh, request: httpx.Request) -> None:
        self._mesh = mesh
        self._request = request
        self._started = time.perf_counter()
        self._pending: Pending | None = None
        self._ticket: Ticket | None = None
        self._route: tuple[ServiceState, Decision | None] | None = None
        self.call: Call | None = None

    def next(self) -> Wait | None:
        """The next wait, or None once decided (then see ``call``)."""
        mesh, request = self._mesh, self._request
        try:
            if self._route is None:
                if self._pending is None:
                    found = mesh.lookup(request.url.host)
                    if isinstance(found, Pending):  # a service never called: discovery first
                        self._pending = found
                        return Wait(found.service, mesh.wait_timeout())
                else:
                    found = mesh.resolve(self._pending)
                if found is None:
                    return None  # no mesh service: the transport bypasses the mesh
                self._route = mesh.route(found, request)
                self._ticket = mesh.pending(self._route[0], request)
            ticket = self._ticket
            if ticket is not None:  # Limits.MaxConnections reached: wait for a connection
                if not ticket.ready():
                    return Wait("", PENDING_POLL)
                self._ticket = None
                ticket.leave()
            service, route = self._route
            config = mesh.config
            self.call = Call(service, request, config.tls, route, config.service_name or "")
            return None
        except MeshRequestError as exc:  # refused before any attempt: recorded all the same
            OutboundTelemetry.failed_early(
                request, exc, self._started, mesh.config.service_name or ""
            )
            raise

    def close(self) -> None:
        """Give back the turn still waited for (the caller gave up while waiting)."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.leave()


class Attempt:
    """One try of a Call on one endpoint."""

    __slots__ = ("caller_bound", "span", "start", "state", "tls")

    def __init__(self, state: EndpointState, start: float, tls: bool, span: Any) -> None:
        self.state = state
        self.start = start
        #: Sent over mesh mTLS (so on the service's own connection pool).
        self.tls = tls
        #: The attempt's span (telemetry's handle; None without tracing).
        self.span = span
        #: Its timeout is the inbound caller's remaining deadline, shorter than MESH_TIMEOUT.
        self.caller_bound = False


class Call:
    """The policy of one logical request. Not thread-safe: one Call per request."""

    __slots__ = (
        "_admitted",
        "_caller_deadline",
        "_edits",
        "_hedges",
        "_in_flight",
        "_last_failed",
        "_method",
        "_original_extensions",
        "_original_timeout",
        "_original_url",
        "_tried",
        "_tried_at",
        "_why_not",
        "connect_timeout",
        "deadline",
        "hash_key",
        "hedge_delay",
        "info",
        "may_resend",
        "replayable",
        "retries_left",
        "retry_on",
        "retry_on_status",
        "service",
        "telemetry",
        "tls_mode",
    )

    def __init__(
        self,
        service: ServiceState,
        request: httpx.Request,
        tls_mode: str = "off",
        route: Decision | None = None,
        source: str = "",
    ) -> None:
        """``source``: the calling service (telemetry's ``service.name``; empty for a pure
        client)."""
        now = time.monotonic()
        policy = service.policy
        options = request_options(request)
        self.service = service
        self.info = CallInfo(service.name)
        self.telemetry = OutboundTelemetry(service.name, request, source=source)
        budget = policy.deadline
        retries = policy.retries
        self.retry_on_status: frozenset[int] = frozenset()
        #: the route's RetryOn conditions (None: meshlib's own rules)
        self.retry_on: frozenset[str] | None = None
        #: the resolver's ConnectTimeout for the chosen target (None: MESH_TIMEOUT's)
        self.connect_timeout: float | None = None
        if route is not None:  # the matching route's own settings (traffic management)
            budget = route.request_timeout or budget
            retries = policy.retries if route.num_retries is None else route.num_retries
            self.retry_on_status = route.retry_on_status
            self.retry_on = route.retry_on
            self.connect_timeout = route.target.connect_timeout
        deadline = Deadline.after(float(options.get("deadline", budget)), now)
        inbound = inbound_deadline.get()
        #: the deadline is the inbound caller's, not this request's own
        self._caller_deadline = False
        if inbound is not None and inbound.at < deadline.at:
            deadline, self._caller_deadline = inbound, True
        self.deadline = deadline
        self.retries_left = int(options.get("retries", retries))
        self.may_resend = (
            request.method in IDEMPOTENT_METHODS
            or "idempotency-key" in request.headers
            or bool(options.get("retry_non_idempotent", False))
        )
        # A body given as bytes can be sent again; a generator cannot (after it started).
        self.replayable = isinstance(request.stream, httpx.ByteStream)
        hedge = options.get("hedge")
        #: Seconds before a hedged attempt; 0.0: this request is never hedged.
        self.hedge_delay = policy.hedge_delay if hedge is None else _hedge_option(hedge)
        if self.hedge_delay and not (self.may_resend and self.replayable):
            self.hedge_delay = 0.0  # a hedge is a resend: the same rule as retries
        self._hedges = 0
        #: attempts started and not yet ended (two at most while a hedge races)
        self._in_flight: list[Attempt] = []
        self.hash_key = (
            None
            if policy.lb != "ring_hash"
            else route.hash_key
            if route is not None and route.hash_key is not None
            else _hash_key(service, request)
        )
        self._method = request.method
        self._tried: list[str] = []
        #: ``host:port`` of each attempt, in order (for the error when they all failed)
        self._tried_at: list[str] = []
        #: why the last failed attempt was not retried (``_retry_delay``)
        self._why_not = ""
        self._original_url = request.url
        self._original_timeout = request.extensions.get("timeout")
        self._original_extensions = dict(request.extensions)
        #: breaker admission: None (not yet), False (admitted), True (admitted as a probe)
        self._admitted: bool | None = None
        #: whether the last attempt failed (None before any attempt ended)
        self._last_failed: bool | None = None
        self.tls_mode = tls_mode
        self._edits: tuple[RouteEdits, ...] = (
            ()
            if route is None
            else tuple(e for e in (route.split_edits, route.edits) if e is not None)
        )
        service.budget.record_request(now)

    # ---------------------------------------------------------------- attempts

    def start_attempt(self, request: httpx.Request) -> Attempt:
        """Pick an endpoint and point ``request`` at it; raises if no attempt may start."""
        service = self.service
        now = time.monotonic()
        remaining = self.deadline.remaining(now)
        if remaining <= 0:
            raise DeadlineExceeded(
                f"service {service.name!r}: deadline passed after {self.info.attempts} attempt(s)",
                service=service.name,
                request=request,
            )
        if not service.routable():
            raise NoHealthyEndpoints(
                f"service {service.name!r} has no healthy endpoints",
                service=service.name,
                request=request,
            )
        if self._admitted is None:
            verdict = service.breaker.allow()
            if verdict is False:
                raise CircuitOpen(
                    f"service {service.name!r}: circuit breaker open after "
                    f"{service.breaker.failures} consecutive failed requests; next probe in "
                    f"{service.breaker.retry_in():.1f}s",
                    service=service.name,
                    request=request,
                )
            self._admitted = verdict is None
        state = service.balancer.pick(service.candidates(now, self._tried), self.hash_key)
        reasons = self.info.retry_reasons
        return self._start(request, state, remaining, reasons[-1] if reasons else "")

    def may_hedge(self) -> bool:
        """Whether a hedge may still be started for this request (it is on, and unspent)."""
        return self.hedge_delay > 0.0 and self._hedges < MAX_HEDGES

    def start_hedge(self, request: httpx.Request) -> Attempt | None:
        """Start a hedge on ``request`` while the attempt in flight goes on, or None.

        None when no endpoint other than those in flight is available, when the deadline
        leaves no time, or when the retry budget refuses (counted as budget exhaustion):
        the attempt in flight then simply goes on alone.
        """
        service = self.service
        now = time.monotonic()
        remaining = self.deadline.remaining(now)
        if not self.may_hedge() or remaining <= 0:
            return None
        busy = {attempt.state.endpoint.key for attempt in self._in_flight}
        others = [s for s in service.candidates(now, self._tried) if s.endpoint.key not in busy]
        if not others:
            return None  # a hedge on the endpoint that is already slow would not help
        self._hedges += 1
        if not service.budget.try_retry(now):
            self.telemetry.budget_exhausted()
            return None
        self.info.retry_reasons.append("hedge")
        state = service.balancer.pick(others, self.hash_key)
        return self._start(request, state, remaining, "hedge")

    def _start(
        self, request: httpx.Request, state: EndpointState, remaining: float, reason: str
    ) -> Attempt:
        endpoint = state.endpoint
        self._tried.append(endpoint.key)
        self._tried_at.append(endpoint.address)
        self.info.attempts += 1
        self.info.endpoint = endpoint.address
        tls = self._tls(endpoint.meta)
        request.url = with_endpoint(
            self._original_url, endpoint.host, endpoint.port, "https" if tls else None
        )
        timeout = min(self.service.policy.timeout, remaining)
        timeouts = _attempt_timeout(self._original_timeout, timeout)
        if self.connect_timeout is not None:
            timeouts["connect"] = min(timeouts["connect"] or timeout, self.connect_timeout)
        request.extensions["timeout"] = timeouts
        request.headers[DEADLINE_HEADER] = str(max(int(remaining * 1000), 1))
        span = self.telemetry.attempt_started(request, endpoint, self.info.attempts, reason)
        attempt = Attempt(state, state.started(), tls, span)
        attempt.caller_bound = self._caller_deadline and timeout < self.service.policy.timeout
        self._in_flight.append(attempt)
        return attempt

    def _tls(self, meta: Mapping[str, str]) -> bool:
        """Whether this attempt uses mesh mTLS: always when strict; when permissive, unless
        the endpoint registered that it serves plaintext only (``mesh-tls=off``)."""
        mode = self.tls_mode
        if mode == "off":
            return False
        return mode == "strict" or meta.get("mesh-tls") != "off"

    def attempt_failed(self, attempt: Attempt, exc: httpx.TransportError) -> float | None:
        """The attempt raised ``exc``. Returns the delay before retrying, None to re-raise,
        or ``WAIT`` when the error may be retried and another attempt is still in flight.

        Raises ``DeadlineExceeded`` (from ``exc``) when the deadline is what ended it.
        """
        outcome = classify_error(exc)
        if self.retry_on is not None and outcome.retryable:
            outcome = outcome._replace(retryable=retryable_by_route(self.retry_on, outcome, None))
        if (
            attempt.caller_bound
            and isinstance(exc, httpx.TimeoutException)
            and self.deadline.remaining() <= _CUT_SHORT_SLACK
        ):
            # cut short by the caller's deadline: the endpoint was not given its time
            outcome = _CUT_SHORT
        ejected = self._record(attempt, outcome)
        endpoint = attempt.state.endpoint
        self.info.endpoint = endpoint.address
        self.telemetry.attempt_ended(
            self.service, outcome, ejected, None, exc, attempt.span, endpoint, attempt.start
        )
        if outcome.retryable and self._in_flight:
            return WAIT
        delay = self._retry_delay(outcome, None)
        if delay is None and (outcome is _CUT_SHORT or self.deadline.remaining() <= 0):
            raise DeadlineExceeded(
                f"service {self.service.name!r}: deadline passed during attempt "
                f"{self.info.attempts} ({outcome.reason} on {self.info.endpoint})",
                service=self.service.name,
                request=exc.request if _has_request(exc) else None,
            ) from exc
        if delay is None and not isinstance(exc, MeshError):
            raise RequestFailed.wrapping(
                exc,
                service=self.service.name,
                endpoints=tuple(self._tried_at),
                reason=self._why_not,
            ) from exc
        return delay

    def attempt_responded(self, attempt: Attempt, response: httpx.Response) -> float | None:
        """The attempt got ``response`` (headers). Returns the delay before retrying, None
        to hand this response to the caller, or ``WAIT`` when the response may be retried and
        another attempt is still in flight."""
        outcome = classify_response(response)
        if self.retry_on is not None:
            status = response.status_code
            outcome = outcome._replace(retryable=retryable_by_route(self.retry_on, outcome, status))
        if response.status_code in self.retry_on_status and not outcome.retryable:
            outcome = outcome._replace(retryable=True)  # the route retries this status too
        ejected = self._record(attempt, outcome)
        self.info.endpoint = attempt.state.endpoint.address
        self.telemetry.attempt_ended(
            self.service,
            outcome,
            ejected,
            response.status_code,
            None,
            attempt.span,
            attempt.state.endpoint,
            attempt.start,
        )
        if not outcome.retryable:
            return None
        if self._in_flight:
            return WAIT
        if outcome is OVERLOADED:  # another instance may take it now: back off, no more
            return self._retry_delay(outcome, None)
        return self._retry_delay(outcome, parse_retry_after(response.headers.get("retry-after")))

    def attempt_cancelled(self, attempt: Attempt) -> None:
        """The attempt lost a hedge race (or the caller gave up): it is abandoned.

        Not an outcome: outlier ejection and the breaker hear nothing of it (cancelled is
        not failed). Its time so far is a lower bound of the endpoint's latency, so it
        feeds the latency estimate only when it is above it (a slow loser is then
        avoided; a hedge cut short early does not look fast).
        """
        if attempt not in self._in_flight:
            return
        self._in_flight.remove(attempt)
        state = attempt.state
        elapsed = time.monotonic() - attempt.start
        state.finished(attempt.start, latency=elapsed > state.ewma.cost())
        self.telemetry.attempt_cancelled(attempt.span)

    def deadline_passed(self, request: httpx.Request) -> DeadlineExceeded:
        """The deadline passed while attempts were in flight (a hedged request waits for
        its racing attempts only that long): the error to raise; they count as a failure."""
        for attempt in list(self._in_flight):
            self.attempt_cancelled(attempt)
        if not self._caller_deadline:  # the caller's deadline is no failure of the service
            self._last_failed = True
        return DeadlineExceeded(
            f"service {self.service.name!r}: deadline passed during attempt "
            f"{self.info.attempts} ({self.info.endpoint})",
            service=self.service.name,
            request=request,
        )

    def finish(self, request: httpx.Request, response: httpx.Response | None) -> None:
        """Put the request back as the caller made it; attach what the mesh did."""
        if self._in_flight:  # attempts that lost a race, or were cut short by an exception
            for attempt in list(self._in_flight):
                self.attempt_cancelled(attempt)
        request.url = self._original_url
        if self.info.attempts:  # each attempt set it; ``del`` scans the headers once, ``pop`` twice
            with contextlib.suppress(KeyError):
                del request.headers[DEADLINE_HEADER]
        request.extensions = self._original_extensions
        if response is not None:
            response.extensions[OPTIONS_KEY] = self.info
            for edits in self._edits:  # the split's ResponseHeaders, then the route's
                edits.apply_response(response)
        if self._admitted is not None:  # the breaker hears the request's final outcome
            breaker = self.service.breaker
            if self._last_failed is None:
                if self._admitted:
                    breaker.release()  # a probe that never got to make an attempt
            else:
                breaker.record(self._last_failed, probe=self._admitted)
        # Called from a ``finally``: without a response, an exception is on its way out.
        self.telemetry.finish(
            self.info, response, None if response is not None else sys.exc_info()[1]
        )

    # ---------------------------------------------------------------- policy

    def _record(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Feed the outcome to latency and ejection; True if it ejected the endpoint."""
        service = self.service
        state = attempt.state
        self._in_flight.remove(attempt)
        if outcome is _CUT_SHORT:  # a lower bound of latency, like a cancelled attempt
            state.finished(
                attempt.start, latency=time.monotonic() - attempt.start > state.ewma.cost()
            )
            return False
        self._last_failed = outcome.failure
        now = time.monotonic()
        if outcome.failure:
            if state.ejected_at:  # its ejection ran out, and this first attempt failed
                lasted = service.outlier.readmitted(state, now)
                if lasted is not None:
                    _log_readmission(service, state, lasted, outcome)
            if outcome is REFUSED:  # nothing listens: no latency at all, ejected at once
                state.finished(attempt.start, latency=False)
                ejected = service.outlier.refused(state, now)
            else:
                # A failure costs a little more than the costliest endpoint of the service, so
                # a fast failure never draws p2c_ewma's traffic. More, not equal: the retry
                # that follows refreshes another endpoint's estimate right after, and a failed
                # one merely equal to it had decayed a hair below by the next pick, and so won
                # every pick (seen: 100 of 100 first attempts on an instance answering 503).
                # A little more, not twice: a failing instance must still be tried often
                # enough for outlier ejection (and its alert) to see it fail; twice kept it
                # out of the picks for ~7 s at a time. No fixed penalty either (the attempt
                # timeout as one took ~80 s to decay, starving a restarted instance): the
                # floor decays as the service's own latencies do.
                floor = _FAILURE_COST * max(
                    (s.ewma.cost(now) for s in service.endpoints), default=0.0
                )
                state.finished(attempt.start, floor=floor)
                ejected = service.outlier.failure(state, now, service.endpoints)
            if ejected:
                _log_ejection(service, state, now, outcome)
            return ejected
        state.finished(attempt.start)
        service.outlier.success(state, now, attempt.start)  # may end an ejection early
        if state.ejected_at:
            lasted = service.outlier.readmitted(state, now)
            if lasted is not None:
                _log_readmission(service, state, lasted, outcome)
        return False

    def _retry_delay(self, outcome: Outcome, retry_after: float | None) -> float | None:
        """The delay before the next attempt, or None (and ``_why_not`` says why)."""
        if not outcome.retryable:
            self._why_not = f"{outcome.reason or 'this outcome'} is not retried"
            return None
        if self.retries_left <= 0:
            self._why_not = "no retries left"
            return None
        if outcome.sent and not (self.may_resend and self.replayable):
            # the server may have seen it: resending could do it twice
            self._why_not = (
                f"not resent: {self._method} is not idempotent"
                if not self.may_resend
                else "not resent: its body cannot be replayed"
            )
            return None
        policy = self.service.policy
        retry = self.info.attempts  # the first retry follows attempt 1
        delay = (
            retry_after
            if retry_after is not None
            else backoff(retry, policy.retry_backoff, policy.retry_backoff_max)
        )
        if delay >= self.deadline.remaining():
            self._why_not = "no time left before the deadline for another"
            return None
        if not self.service.budget.try_retry():
            self.telemetry.budget_exhausted()
            self._why_not = "the retry budget is spent"
            return None
        self.retries_left -= 1
        self.info.retry_reasons.append(outcome.reason)
        return delay


def clone_request(request: httpx.Request) -> httpx.Request:
    """A copy of ``request`` for one of several attempts in flight at once.

    Each attempt rewrites its request's URL, headers and extensions; a hedge must not
    rewrite the one its rival is sending. The body stream is shared: only requests whose
    body is in memory (``httpx.ByteStream``, iterable any number of times) are hedged.
    """
    return httpx.Request(
        request.method,
        request.url,
        headers=request.headers,  # copied by httpx.Request
        stream=request.stream,
        extensions=dict(request.extensions),
    )


def _hedge_option(value: Any) -> float:
    """The per-request ``hedge`` option: a delay in seconds, or False / 0 for no hedging."""
    if value is False:
        return 0.0
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(
        f"meshlib request option 'hedge' must be a delay in seconds or False, not {value!r}"
    )


def _attempt_timeout(original: Any, timeout: float) -> dict[str, float | None]:
    """httpx's timeout extension for one attempt: the mesh's, capped by the caller's."""
    result: dict[str, float | None] = {}
    for key in ("connect", "read", "write", "pool"):
        caller = original.get(key) if isinstance(original, Mapping) else None
        result[key] = timeout if caller is None else min(caller, timeout)
    return result


def _hash_key(service: ServiceState, request: httpx.Request) -> str | None:
    return request_key(service.policy.hash_on, request.headers)


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - the property raises when unset
    except RuntimeError:
        return False
    return True


def _log_ejection(
    service: ServiceState, state: EndpointState, now: float, outcome: Outcome
) -> None:
    address = state.endpoint.address
    seconds = state.ejected_until - now
    EVENTS.emit(
        logging.WARNING,
        "endpoint.ejected",
        service.name,
        f"endpoint {address} of {service.name!r} ejected for {seconds:.3g}s after "
        f"{service.outlier.consecutive_errors} consecutive failed attempts "
        f"(last: {outcome.reason})",
        endpoint=address,
        ejection_s=seconds,
        ejections=state.ejections,
        last_error=outcome.reason,
    )


def _log_readmission(
    service: ServiceState, state: EndpointState, lasted: float, outcome: Outcome
) -> None:
    address = state.endpoint.address
    result = "failed" if outcome.failure else "succeeded"
    EVENTS.emit(
        logging.INFO,
        "endpoint.readmitted",
        service.name,
        f"endpoint {address} of {service.name!r} readmitted after {lasted:.3g}s ejected; "
        f"its first attempt {result}",
        endpoint=address,
        ejection_s=lasted,
        first_attempt=result,
    )
