"""Routes of an outbound service, seen by a client of the frontend's sidecar: a weighted
split across subsets, a header route to a canary, and injected faults (abort, delay, and
faults forced with `x-sidecar-fault`).

Three apps (a and b labelled v1, c labelled v2), each behind its own sidecar; the
frontend's sidecar lists the three inbound listeners as endpoints of every service.
Each answer names the app that gave it, each app records what it received, and the
frontend's access log says which endpoint answered (`upstream`) and which fault was
injected (`fault`).
"""

from __future__ import annotations

import collections
import time

import pytest
from e2e.traffic_rig import TrafficMesh, tolerance


def services(eps: list[dict]) -> dict:
    subsets = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
    return {
        "shop.default": {
            "endpoints": eps,
            "subsets": subsets,
            "routes": [
                {
                    "name": "canary",
                    "match": {"headers": {"x-canary": "true"}},
                    "to": [{"subset": "v2"}],
                },
                {
                    "name": "split",
                    "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                },
            ],
        },
        "faulty.default": {
            "endpoints": eps,
            "routes": [
                {
                    "name": "abort20",
                    "match": {"path_prefix": "/abort/"},
                    "fault": {"abort": {"percent": 20, "status": 503}},
                },
                {
                    "name": "slow",
                    "match": {"path_prefix": "/delay/"},
                    "fault": {"delay": {"percent": 100, "seconds": 0.3}},
                },
                {
                    "name": "teapot",
                    "match": {"path_prefix": "/rare/"},
                    "fault": {"abort": {"percent": 1, "status": 418}},
                },
                {
                    "name": "on-demand",
                    "match": {"path_prefix": "/on-demand/"},
                    "fault": {"abort": {"percent": 0, "status": 500}},
                },
                {"name": "plain", "match": {"path_prefix": "/plain/"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = TrafficMesh(tmp_path_factory.mktemp("traffic-routing"), services)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def client(mesh):
    c = mesh.client()
    try:
        yield c
    finally:
        c.close()


def received(mesh: TrafficMesh, prefix: str) -> collections.Counter:
    """How many times the apps (all three) received each path under `prefix`."""
    got: collections.Counter = collections.Counter()
    for b in mesh.backends.values():
        got.update(r["path"] for r in b.log() if r["path"].startswith(prefix))
    return got


def test_weighted_split_90_10(mesh, client):
    n = 1000
    names = {}
    for i in range(n):
        r = client.call("shop.default", f"/split/{i}")
        assert r.status == 200, r.body
        names[f"/split/{i}"] = r.name
    count = collections.Counter(names.values())
    v2 = count["c"] / n
    print(f"split over {n}: {dict(count)}; v2 share {v2:.3f}")
    assert abs(v2 - 0.10) <= tolerance(n, 0.10), count  # 4.5 sd: 0.10 +- 0.043
    # v1 is two endpoints: both take part.
    assert count["a"] > n * 0.3 and count["b"] > n * 0.3, count
    # The access log names the endpoint that answered each request.
    where = mesh.by_inbound()
    lines = mesh.outbound_log("/split/", n)
    assert {r["path"]: where[r["upstream"]] for r in lines} == names
    assert {r["status"] for r in lines} == {200} and all("retries" not in r for r in lines)


def test_header_route_sends_the_canary_to_v2_only(mesh, client):
    canary = [
        client.call("shop.default", f"/canary/{i}", headers={"x-canary": "true"}) for i in range(50)
    ]
    assert [(r.status, r.name) for r in canary] == [(200, "c")] * 50
    assert [r.doc["headers"].get("x-canary") for r in canary] == ["true"] * 50
    # Not an exact match, or no header: the split route (mostly v1).
    other = [
        client.call("shop.default", f"/other/{i}", headers={"x-canary": "TRUE"}) for i in range(40)
    ]
    other += [client.call("shop.default", f"/other/n{i}") for i in range(40)]
    names = collections.Counter(r.name for r in other)
    assert {r.status for r in other} == {200}
    assert names["a"] + names["b"] >= 55, names  # 90 % of 80 is 72; P(< 55) ~ 1e-7
    assert received(mesh, "/canary/").total() == 50 == mesh.c.count("/canary/")


def test_abort_20_percent_never_reaches_the_apps(mesh, client):
    n = 500
    replies = {f"/abort/{i}": client.call("faulty.default", f"/abort/{i}") for i in range(n)}
    aborted = {p for p, r in replies.items() if r.status != 200}
    share = len(aborted) / n
    print(f"aborted {len(aborted)} of {n}: {share:.3f}")
    assert abs(share - 0.20) <= tolerance(n, 0.20), share  # 4.5 sd: 0.20 +- 0.08
    for p in aborted:
        r = replies[p]
        assert (r.status, r.doc["error"]) == (503, "fault_abort"), (p, r.body)
    # The apps received every request that was not aborted, once, and none that was.
    got = received(mesh, "/abort/")
    assert got == collections.Counter(set(replies) - aborted)
    lines = mesh.outbound_log("/abort/", n)
    assert {r["path"] for r in lines if r.get("fault") == "abort"} == aborted
    assert all(
        r["status"] == 503 and r["error"] == "fault_abort" for r in lines if r["path"] in aborted
    )


def test_delay_holds_every_request(mesh, client):
    plain = [client.call("faulty.default", f"/plain/{i}") for i in range(5)]
    slow = [client.call("faulty.default", f"/delay/{i}") for i in range(3)]
    assert [r.status for r in plain + slow] == [200] * 8
    print(
        "plain",
        [round(r.seconds, 3) for r in plain],
        "delayed",
        [round(r.seconds, 3) for r in slow],
    )
    assert all(0.3 <= r.seconds < 2 for r in slow)
    assert sorted(r.seconds for r in plain)[2] < 0.3  # without the route's delay: at once
    lines = [
        r
        for r in mesh.outbound_log("/delay/", 3)
        if r["path"] in {"/delay/0", "/delay/1", "/delay/2"}
    ]
    assert [r.get("fault") for r in lines] == ["delay"] * 3
    assert all(r["ms"] >= 300 for r in lines)


def test_forced_abort_and_the_header_never_reaches_the_app(mesh, client):
    forced = [
        client.call("faulty.default", f"/rare/{i}", headers={"x-sidecar-fault": "abort"})
        for i in range(20)
    ]
    assert [(r.status, r.doc["error"]) for r in forced] == [(418, "fault_abort")] * 20
    assert not received(mesh, "/rare/")
    # A forced delay is forwarded (after the delay), without the header; on a route
    # without faults the header changes nothing and is not forwarded either.
    start = time.monotonic()
    r = client.call("faulty.default", "/delay/forced", headers={"x-sidecar-fault": "delay"})
    assert r.status == 200 and time.monotonic() - start >= 0.3
    r = client.call("faulty.default", "/plain/forced", headers={"x-sidecar-fault": "abort, delay"})
    assert r.status == 200
    (line,) = mesh.outbound_log("/plain/forced", 1)
    assert "fault" not in line  # neither delayed nor aborted (the access log says which)
    for b in mesh.backends.values():
        for rec in b.log():
            assert "x-sidecar-fault" not in rec["headers"], (b.name, rec)
    assert received(mesh, "/delay/forced").total() == received(mesh, "/plain/forced").total() == 1


def test_forced_abort_on_a_route_whose_fault_is_at_0_percent(mesh, client):
    """docs/sidecar.md: the header gets the route's configured faults "regardless of the
    percentages"; a fault at 0 % is the way to inject it only on demand."""
    r = client.call("faulty.default", "/on-demand/1", headers={"x-sidecar-fault": "abort"})
    assert (r.status, r.doc.get("error")) == (500, "fault_abort"), (r.status, r.body)


def test_forced_abort_on_a_route_with_only_a_delay(mesh, client):
    """docs/sidecar.md: the header gets "the route's configured faults"; this route
    configures a delay and no abort, so the request is delayed and forwarded."""
    r = client.call("faulty.default", "/delay/no-abort", headers={"x-sidecar-fault": "abort"})
    assert r.status == 200 and r.name in ("a", "b", "c"), (r.status, r.body)
    assert r.seconds >= 0.3
