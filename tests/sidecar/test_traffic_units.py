"""The pure parts of outbound traffic management: the balancers' choices, the retry budget and
rules, the outlier ejection clock, route matching and weighted splits, and the config keys
(each problem named by its dotted key)."""

from __future__ import annotations

import collections
import random

import pytest

from meshca.config import Listen
from sidecar.routing.routes import NO_ROUTE, choose, decide, matches
from sidecar.trafficconfig import (
    Destination,
    OutlierConfig,
    RetryConfig,
    parse_endpoints,
    parse_traffic,
)
from sidecar.upstream.balancer import LeastRequest, Random, RoundRobin
from sidecar.upstream.endpoint import Endpoint
from sidecar.upstream.outlier import OutlierDetector
from sidecar.upstream.retry import RetryBudget, RetryPolicy, replayable


def eps(*weights: int) -> list[Endpoint]:
    return [Endpoint("127.0.0.1", 9000 + n, {}, w) for n, w in enumerate(weights)]


# -- balancers -------------------------------------------------------------------------------


def test_round_robin_spreads_a_sequential_client_evenly():
    """The bug this replaces: a sequential client through one pooled connection got 600/0/0."""
    rr, three = RoundRobin(), eps(1, 1, 1)
    counts = collections.Counter(rr.pick(three).port for _ in range(600))
    assert sorted(counts.values()) == [200, 200, 200]


def test_round_robin_honours_weights():
    rr, two = RoundRobin(), eps(3, 1)
    counts = collections.Counter(rr.pick(two).port for _ in range(400))
    assert counts == {9000: 300, 9001: 100}


def test_random_honours_weights_within_tolerance():
    r, two = Random(random.Random(7)), eps(9, 1)
    counts = collections.Counter(r.pick(two).port for _ in range(10_000))
    assert 8800 < counts[9000] < 9200  # 90 % +- 2 points (about 6 sigma)


def test_least_request_prefers_the_less_loaded_of_two():
    lr = LeastRequest(random.Random(1))
    a, b = eps(1, 1)
    a.active, b.active = 5, 0
    picks = collections.Counter(lr.pick([a, b]).port for _ in range(1000))
    # b wins every draw that includes it: only a draw of (a, a) picks a, one in four
    assert 180 < picks[a.port] < 320 and picks[b.port] > 680


def test_least_request_weighs_active_requests_by_weight():
    lr = LeastRequest(random.Random(3))
    heavy, light = eps(4, 1)
    heavy.active, light.active = 3, 1  # 3/4 per unit of weight beats 1/1
    wins = collections.Counter(lr.pick([heavy, light]) is heavy for _ in range(1000))
    assert wins[True] > 900


def test_least_request_with_one_candidate():
    (only,) = eps(1)
    assert LeastRequest().pick([only]) is only


# -- retries ---------------------------------------------------------------------------------


def test_replayable_only_idempotent_without_body():
    assert replayable(b"GET", False) and replayable(b"PUT", False)
    assert not replayable(b"POST", False)
    assert not replayable(b"GET", True)


def test_budget_floor_then_share_of_active_requests():
    b = RetryBudget(percent=20, floor=3)
    b.active_requests = 5
    for _ in range(3):  # the floor: 3 retries even with few requests in flight
        assert b.allows()
        b.active_retries += 1
    assert not b.allows()
    b.active_requests = 100  # 20 % of 100 = 20
    assert b.allows()
    b.active_retries = 20
    assert not b.allows()


def test_retry_causes_and_statuses():
    p = RetryPolicy(RetryConfig(retry_on=frozenset({"connect-failure"}), statuses=frozenset({503})))
    assert p.retries_on("connect-failure") and not p.retries_on("reset")
    assert not p.retries_on("timeout")
    assert p.retries_status(503) and not p.retries_status(502) and not p.retries_status(500)
    gw = RetryPolicy(RetryConfig(retry_on=frozenset({"gateway-error"})))
    assert [s for s in (500, 502, 503, 504) if gw.retries_status(s)] == [502, 503, 504]
    assert gw.retries_on("timeout")
    all5 = RetryPolicy(RetryConfig(retry_on=frozenset({"5xx"})))
    assert all5.retries_status(500) and all5.retries_status(599)


def test_stale_connection_retry_is_once_and_only_when_safe():
    p = RetryPolicy()
    assert p.after_stale_connection(b"GET", False, retried=False)
    assert not p.after_stale_connection(b"GET", False, retried=True)
    assert not p.after_stale_connection(b"POST", False, retried=False)


# -- outlier detection -----------------------------------------------------------------------


def test_ejection_after_consecutive_errors_and_return_after_the_time():
    od = OutlierDetector(OutlierConfig(consecutive_errors=3, base_ejection_time=30))
    three = eps(1, 1, 1)
    bad = three[0]
    assert not od.failure(bad, three, now=100)
    od.success(bad)  # a success ends the run
    assert not od.failure(bad, three, now=101) and not od.failure(bad, three, now=102)
    assert od.failure(bad, three, now=103)
    assert od.ejected(bad, 110) and od.usable(three, 110) == three[1:]
    assert not od.ejected(bad, 133.1) and od.usable(three, 134) == three


def test_ejection_time_grows_and_decays():
    od = OutlierDetector(OutlierConfig(consecutive_errors=1, interval=10, base_ejection_time=30))
    three = eps(1, 1, 1)
    bad = three[0]
    assert od.failure(bad, three, now=0)
    assert bad.ejected_until == 30
    assert od.failure(bad, three, now=31)  # right back: ejected twice as long
    assert bad.ejected_until == 31 + 60
    # back in service for 40 s (4 intervals) before failing again: the count has decayed
    assert od.failure(bad, three, now=131)
    assert bad.ejected_until == 131 + 30


def test_never_more_than_max_ejection_percent_and_never_all():
    od = OutlierDetector(OutlierConfig(consecutive_errors=1, max_ejection_percent=50))
    four = eps(1, 1, 1, 1)
    assert [od.failure(ep, four, now=0) for ep in four] == [True, True, False, False]
    one = eps(1)
    assert not od.failure(one[0], one, now=0)  # a sole endpoint is never ejected
    # every candidate ejected (a subset of two, both out): all of them are used (panic)
    assert od.usable(four[:2], 1) == four[:2]


def test_disabled_detector_only_counts():
    od = OutlierDetector(OutlierConfig(enabled=False, consecutive_errors=1))
    two = eps(1, 1)
    assert not od.failure(two[0], two, now=0) and two[0].failures == 1


# -- routes ----------------------------------------------------------------------------------


def traffic(doc: dict):
    cfg, problems = parse_traffic({"endpoints": ["127.0.0.1:1"], **doc}, "svc")
    assert problems == []
    return cfg


def test_first_matching_route_wins_and_no_match_goes_everywhere():
    cfg = traffic(
        {
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            "routes": [
                {
                    "name": "canary",
                    "match": {"headers": {"x-canary": "true"}},
                    "to": [{"subset": "v2"}],
                },
                {"match": {"path_prefix": "/api", "methods": ["get"]}, "to": [{"subset": "v1"}]},
            ],
        }
    )
    rng = random.Random(0)
    hdr = [(b"X-Canary", b"true")]
    assert decide(cfg.routes, b"GET", b"/api/x", hdr, rng).subset == "v2"
    assert decide(cfg.routes, b"GET", b"/api/x", [], rng).subset == "v1"
    assert decide(cfg.routes, b"POST", b"/api/x", [], rng) is NO_ROUTE
    assert decide(cfg.routes, b"GET", b"/apix", [], rng).subset == "v1"  # a prefix of the path
    assert decide(cfg.routes, b"GET", b"/other", [(b"x-canary", b"True")], rng) is NO_ROUTE


def test_header_matches_exact_prefix_regex_and_absence():
    cfg = traffic(
        {
            "routes": [
                {"match": {"headers": {"x-a": {"prefix": "ab"}, "x-b": {"regex": "v[0-9]+"}}}},
            ]
        }
    )
    m = cfg.routes[0].match
    assert matches(m, b"GET", b"/", [(b"x-a", b"abc"), (b"x-b", b"v12")])
    assert not matches(m, b"GET", b"/", [(b"x-a", b"abc"), (b"x-b", b"v12x")])  # full match
    assert not matches(m, b"GET", b"/", [(b"x-a", b"abc")])  # x-b absent
    assert not matches(m, b"GET", b"/", [(b"x-a", b"xab"), (b"x-b", b"v1")])


def test_path_exact():
    cfg = traffic({"routes": [{"match": {"path_exact": "/a"}}]})
    m = cfg.routes[0].match
    assert matches(m, b"GET", b"/a", []) and not matches(m, b"GET", b"/a/", [])


def test_weighted_split_is_within_a_few_percent_over_a_thousand():
    to = (Destination("v1", 90), Destination("v2", 10))
    rng = random.Random(42)
    counts = collections.Counter(choose(to, rng.random()) for _ in range(1000))
    assert 870 <= counts["v1"] <= 930  # 90 % +- 3 points (about 3 sigma)
    assert choose(to, 0.0) == "v1" and choose(to, 0.95) == "v2"


def test_fault_percentages_and_forcing_header():
    cfg = traffic(
        {
            "routes": [
                {
                    "match": {"path_prefix": "/"},
                    "fault": {
                        "delay": {"percent": 10, "seconds": 0.5},
                        "abort": {"percent": 5, "status": 418},
                    },
                }
            ]
        }
    )
    rng = random.Random(5)
    got = [decide(cfg.routes, b"GET", b"/", [], rng) for _ in range(4000)]
    delays = sum(1 for d in got if d.delay == 0.5)
    aborts = sum(1 for d in got if d.abort == 418)
    assert 320 < delays < 480 and 130 < aborts < 270  # 10 % and 5 % of 4000, +- 4 sigma
    forced = decide(cfg.routes, b"GET", b"/", [(b"X-Sidecar-Fault", b"abort, delay")], rng)
    assert forced.abort == 418 and forced.delay == 0.5


def test_forcing_header_does_nothing_on_a_route_without_faults():
    cfg = traffic({"routes": [{"match": {"path_prefix": "/"}}]})
    d = decide(cfg.routes, b"GET", b"/", [(b"x-sidecar-fault", b"abort")], random.Random(1))
    assert d.abort is None and d.delay == 0


# -- config ----------------------------------------------------------------------------------


def test_endpoints_shapes():
    specs, problems = parse_endpoints(
        ["127.0.0.1:1", {"address": "127.0.0.2:2", "labels": {"version": "v2"}, "weight": 3}], "e"
    )
    assert problems == []
    assert specs[0].address == Listen("127.0.0.1", 1) and specs[0].weight == 1
    assert specs[1].labels == {"version": "v2"} and specs[1].weight == 3


@pytest.mark.parametrize(
    "doc, problem",
    [
        ({}, "svc: needs exactly one of endpoints, dns, endpoints_file"),
        ({"endpoints": ["a:1"], "dns": {"name": "x", "port": 1}}, "needs exactly one"),
        ({"endpoints": ["a:1", "a:1"]}, "svc.endpoints[1]: a:1 is listed twice"),
        ({"endpoints": [{"address": "a:1", "weight": 0}]}, "svc.endpoints[0].weight: must be"),
        ({"endpoints": [{"address": "a:1", "zone": "z"}]}, "svc.endpoints[0].zone: unknown key"),
        ({"endpoints": ["a:1"], "lb": "fastest"}, "svc.lb: must be one of"),
        ({"endpoints": ["a:1"], "timeout": 0}, "svc.timeout: must be a number"),
        ({"endpoints": ["a:1"], "retries": {"retry_on": ["teapot"]}}, "svc.retries.retry_on[0]"),
        ({"endpoints": ["a:1"], "retries": {"attempts": 11}}, "svc.retries.attempts: must be"),
        ({"endpoints": ["a:1"], "circuit_breaker": {"max_requests": 0}}, "max_requests: must be"),
        ({"endpoints": ["a:1"], "outlier_detection": {"interval": -1}}, "interval: must be"),
        ({"dns": {"name": "bad name!", "port": 80}}, "svc.dns.name: must be a DNS name"),
        ({"dns": {"name": "x.local"}}, "svc.dns.port: required"),
        ({"endpoints": ["a:1"], "routes": [{"to": [{"subset": "v9"}]}]}, "no subset named 'v9'"),
        (
            {
                "endpoints": ["a:1"],
                "subsets": {"a": {"v": "1"}, "b": {"v": "2"}},
                "routes": [{"to": [{"subset": "a"}, {"subset": "b"}]}],
            },
            "svc.routes[0].to[0].weight: required when a route splits traffic",
        ),
        (
            {"endpoints": ["a:1"], "routes": [{"match": {"headers": {"x": {"regex": "("}}}}]},
            "svc.routes[0].match.headers.x.regex",
        ),
        (
            {"endpoints": ["a:1"], "routes": [{"match": {"path_prefix": "api"}}]},
            "path_prefix: must be a path",
        ),
        (
            {"endpoints": ["a:1"], "routes": [{"fault": {"abort": {"status": 700}}}]},
            "svc.routes[0].fault.abort.status",
        ),
        (
            {"endpoints": ["a:1"], "routes": [{"fault": {"delay": {"percent": 5}}}]},
            "svc.routes[0].fault.delay.seconds: required",
        ),
    ],
)
def test_bad_traffic_settings_name_their_key(doc, problem):
    _, problems = parse_traffic(doc, "svc")
    assert any(problem in p for p in problems), problems
