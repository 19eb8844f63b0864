"""Resilience of an outbound service, seen by a client of the frontend's sidecar: balancing
across endpoints, retries and outlier ejection around a failing endpoint, no replay of a
POST that was sent, the circuit breaker, and timeouts (whole request and per try).

Three apps (a, b, c), each behind its own sidecar; the frontend's sidecar lists the
three inbound listeners as endpoints of every service. Each answer names the app that
gave it, each app records what it received and can be told to fail or to be slow, and
the frontend's access log says which endpoint answered (`upstream`) and which tries were
given up on (`retries`).
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
from e2e.traffic_rig import TrafficMesh, tolerance
from mesh import admin_get

RETRY = {"attempts": 2, "retry_on": ["connect-failure", "reset", 503]}
LB = {"least_request": "lr.default", "round_robin": "rr.default", "random": "random.default"}
EJECT = {"consecutive_errors": 2, "interval": 1, "base_ejection_time": 3}


def services(eps: list[dict]) -> dict:
    subsets = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
    return {
        **{svc: {"endpoints": eps, "lb": lb} for lb, svc in LB.items()},
        "spread.default": {"endpoints": eps, "retries": RETRY, "outlier_detection": EJECT},
        "posts.default": {
            "endpoints": eps,
            "lb": "round_robin",
            "retries": RETRY,
            "outlier_detection": False,
        },
        "breaker.default": {"endpoints": eps, "circuit_breaker": {"max_requests": 2}},
        "cut.default": {"endpoints": eps, "circuit_breaker": {"max_requests": 2}},
        "pinned.default": {
            "endpoints": eps,
            "subsets": subsets,
            "circuit_breaker": {"max_connections": 1},
            "routes": [
                {
                    "name": "canary",
                    "match": {"headers": {"x-canary": "true"}},
                    "to": [{"subset": "v2"}],
                },
                {"name": "rest", "to": [{"subset": "v1"}]},
            ],
        },
        "timeout.default": {"endpoints": eps, "timeout": 0.5},
        "pertry.default": {
            "endpoints": eps,
            "lb": "round_robin",
            "retries": {"attempts": 2, "per_try_timeout": 0.3, "retry_on": ["reset"]},
            "outlier_detection": False,
        },
        "reset.default": {
            "endpoints": eps,
            "lb": "round_robin",
            "retries": RETRY,
            "outlier_detection": False,
        },
    }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = TrafficMesh(tmp_path_factory.mktemp("traffic-resilience"), services)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(autouse=True)
def healthy(mesh):
    """Each test starts with every app answering at once and every sidecar running
    (whatever the test before did to them)."""
    mesh.healthy()


@pytest.fixture
def client(mesh):
    c = mesh.client()
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("lb", LB)
def test_sequential_client_spreads_over_three_endpoints(mesh, client, lb):
    """One client, one kept-alive connection, one request at a time: each endpoint gets
    its share (not one endpoint all of it)."""
    n = 300
    replies = [client.call(LB[lb], f"/{lb}/{i}") for i in range(n)]
    assert {r.status for r in replies} == {200}
    count = collections.Counter(r.name for r in replies)
    print(lb, dict(count))
    for name in "abc":
        assert count[name] / n >= 1 / 3 - tolerance(n, 1 / 3), count
    if lb == "round_robin":
        assert sorted(count.values()) == [100, 100, 100]


def test_failing_endpoint_retried_ejected_and_back(mesh, client):
    a, b, c = mesh.a, mesh.b, mesh.c
    # 1. c answers 503: retried elsewhere (the client sees no failure), then ejected.
    c.mode(status=503)
    before = c.count()
    bad_start = time.monotonic()
    replies = [client.call("spread.default", f"/spread/bad/{i}") for i in range(200)]
    bad_end = time.monotonic()
    assert [r.status for r in replies] == [200] * 200, collections.Counter(
        r.status for r in replies
    )
    assert {r.name for r in replies} == {"a", "b"}
    tried_on_c = c.count("/spread/bad/")
    assert 1 <= tried_on_c <= EJECT["consecutive_errors"], tried_on_c
    assert bad_end - bad_start < EJECT["base_ejection_time"], "too slow to see the ejection"
    _, doc = admin_get(mesh.frontend, "/endpoints")
    state = {e["address"]: e for e in doc["services"]["spread.default"]["endpoints"]}
    assert not state[c.inbound]["healthy"] and state[c.inbound]["ejections"] == 1, state
    assert state[a.inbound]["healthy"] and state[b.inbound]["healthy"]
    # The access log: every try given up on was on c, for its 503, and c never answered.
    lines = mesh.outbound_log("/spread/bad/", 200)
    retried = [x for r in lines for x in r.get("retries", [])]
    assert retried == [f"{c.inbound} 503"] * tried_on_c
    assert c.inbound not in {r["upstream"] for r in lines}

    # 2. c is healthy again but still ejected; once its ejection time is over it takes
    # traffic again (a fair share of it).
    c.mode()
    back_at = None
    while time.monotonic() < bad_end + EJECT["base_ejection_time"] + 3:
        r = client.call("spread.default", f"/spread/back/{time.monotonic():.3f}")
        assert r.status == 200
        if r.name == "c":
            back_at = time.monotonic()
            break
        time.sleep(0.02)
    assert back_at is not None, "c never took traffic again"
    print(f"c back after {back_at - bad_start:.2f} s (ejected for {EJECT['base_ejection_time']} s)")
    assert back_at - bad_start >= EJECT["base_ejection_time"]
    assert c.count() == before + tried_on_c + 1
    again = collections.Counter(
        client.call("spread.default", f"/spread/again/{i}").name for i in range(150)
    )
    print("after the ejection", dict(again))
    assert again["c"] / 150 >= 1 / 3 - tolerance(150, 1 / 3), again


def test_post_sent_is_not_retried_but_get_is(mesh, client):
    c = mesh.c
    c.mode(status=503)
    # GETs that reach c are dropped there and sent to another endpoint: every one succeeds.
    gets = [client.call("posts.default", f"/posts/get/{i}") for i in range(30)]
    assert [(r.status, r.name in ("a", "b")) for r in gets] == [(200, True)] * 30
    on_c = {r["path"] for r in c.log() if r["path"].startswith("/posts/get/")}
    print("GETs tried on c first:", len(on_c), "of 30")
    assert len(on_c) >= 5, on_c  # round robin: about a third try c first
    elsewhere = collections.Counter(
        r["path"] for x in (mesh.a, mesh.b) for r in x.log() if r["path"].startswith("/posts/get/")
    )
    assert elsewhere == collections.Counter(f"/posts/get/{i}" for i in range(30))
    lines = {r["path"]: r for r in mesh.outbound_log("/posts/get/", 30)}
    assert all(lines[p]["retries"] == [f"{c.inbound} 503"] for p in on_c)

    # POSTs with a body: the one c receives is answered by c's 503, never sent again.
    posts = {
        f"/posts/post/{i}": client.call(
            "posts.default", f"/posts/post/{i}", "POST", body=b"x" * 1000
        )
        for i in range(6)
    }
    failed = {p for p, r in posts.items() if r.status != 200}
    print("POSTs c received and answered 503:", sorted(failed))
    assert failed, "no POST went to c (round robin over three endpoints)"
    for p in failed:
        assert (posts[p].status, posts[p].name) == (503, "c"), posts[p].body
    assert all(r.name in ("a", "b") for p, r in posts.items() if p not in failed)
    got = collections.Counter(
        (x.name, r["path"], r["body_bytes"])
        for x in mesh.backends.values()
        for r in x.log()
        if r["path"].startswith("/posts/post/")
    )
    assert got == collections.Counter((posts[p].name, p, 1000) for p in posts), got
    lines = {r["path"]: r for r in mesh.outbound_log("/posts/post/", 6)}
    assert all(lines[p]["status"] == 503 and "retries" not in lines[p] for p in failed)

    # Every endpoint answers 503: a GET is tried 1 + attempts times, once on each, and
    # the last answer is the client's.
    for x in mesh.backends.values():
        x.mode(status=503)
    r = client.call("posts.default", "/posts/all-fail")
    assert r.status == 503 and r.name in ("a", "b", "c"), r.body
    assert [x.count("/posts/all-fail") for x in mesh.backends.values()] == [1, 1, 1]
    (line,) = mesh.outbound_log("/posts/all-fail", 1)
    assert len(line["retries"]) == RETRY["attempts"] and line["status"] == 503
    assert mesh.by_inbound()[line["upstream"]] == r.name


def test_circuit_breaker_refuses_past_max_requests_and_recovers(mesh):
    clients = [mesh.client() for _ in range(6)]
    for cl in clients:
        cl.conn.connect()
    go = threading.Barrier(6)
    replies: dict[int, object] = {}

    def call(i: int) -> None:
        go.wait()
        replies[i] = clients[i].call("breaker.default", f"/breaker/{i}?delay=1.5")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for cl in clients:
        cl.close()
    ok = [r for r in replies.values() if r.status == 200]
    refused = [r for r in replies.values() if r.status != 200]
    print("breaker", sorted((r.status, round(r.seconds, 2)) for r in replies.values()))
    assert len(ok) == 2 and len(refused) == 4
    assert all(r.seconds >= 1.5 for r in ok)
    assert all((r.status, r.doc["error"]) == (503, "overloaded") for r in refused)
    assert all(r.seconds < 0.75 for r in refused), "refused at once, not after the app's delay"
    assert sum(x.count("/breaker/") for x in mesh.backends.values()) == 2
    # Once they are done, new requests are admitted again.
    cl = mesh.client()
    try:
        after = [cl.call("breaker.default", f"/breaker/after/{i}") for i in range(4)]
    finally:
        cl.close()
    assert [r.status for r in after] == [200] * 4


def test_answers_cut_short_give_their_breaker_place_back(mesh, client):
    """max_requests 2; two answers break off halfway (the app drops the connection), one
    after the other: then nothing is in flight, and the next requests are admitted."""
    cut = [client.call("cut.default", f"/cut/{i}?cut=1") for i in range(2)]
    assert [(r.status, r.cut, len(r.body)) for r in cut] == [(200, True, 1000)] * 2
    _, doc = admin_get(mesh.frontend, "/endpoints")
    in_flight = doc["services"]["cut.default"]["active_requests"]
    after = [client.call("cut.default", f"/cut/after/{i}") for i in range(3)]
    print("in flight:", in_flight, "then:", [(r.status, r.body[:40]) for r in after])
    assert [r.status for r in after] == [200] * 3, [r.body for r in after]
    assert in_flight == 0


def test_whole_request_timeout_is_a_json_504(mesh, client):
    r = client.call("timeout.default", "/timeout/slow?delay=3")
    assert (r.status, r.doc["error"]) == (504, "upstream_timeout"), r.body
    print(f"504 after {r.seconds:.2f} s (timeout 0.5 s)")
    assert 0.5 <= r.seconds < 1.5
    assert sum(x.count("/timeout/slow") for x in mesh.backends.values()) == 1, "no retry past it"
    (line,) = mesh.outbound_log("/timeout/slow", 1)
    assert (line["status"], line["error"]) == (504, "upstream_timeout")
    assert client.call("timeout.default", "/timeout/fast").status == 200


def test_per_try_timeout_moves_on_from_a_slow_endpoint(mesh, client):
    c = mesh.c
    c.mode(delay=3)
    replies = {f"/pertry/{i}": client.call("pertry.default", f"/pertry/{i}") for i in range(9)}
    print("per try", {p: (r.name, round(r.seconds, 2)) for p, r in replies.items()})
    assert all((r.status, r.name in ("a", "b")) == (200, True) for r in replies.values())
    assert all(r.seconds < 1.5 for r in replies.values()), "not one waited for c's 3 s"
    on_c = {r["path"] for r in c.log() if r["path"].startswith("/pertry/")}
    assert len(on_c) >= 2, on_c  # round robin: about a third try c first
    assert all(replies[p].seconds >= 0.3 for p in on_c)
    lines = {r["path"]: r for r in mesh.outbound_log("/pertry/", 9)}
    assert all(lines[p]["retries"] == [f"{c.inbound} timeout"] for p in on_c)
    assert all("retries" not in lines[p] for p in set(replies) - on_c)


def test_at_max_connections_the_canary_still_goes_to_v2_only(mesh, client):
    first = client.call("pinned.default", "/pinned/v1")  # the one connection: to v1, then idle
    assert (first.status, first.name in ("a", "b")) == (200, True)
    r = client.call("pinned.default", "/pinned/canary", headers={"x-canary": "true"})
    assert (r.status, r.name) == (200, "c"), f"the canary went to {r.name}: {r.body!r}"


def test_reset_mid_request_get_retried_post_not_then_connect_failures_retried(mesh, client):
    """c's sidecar is killed while a GET and a POST wait on c's slow app: the GET is sent
    to another endpoint, the POST (it reached c) is answered 502; afterwards c's inbound
    port refuses connections, and those requests, POSTs too, go elsewhere."""
    a, b, c = mesh.a, mesh.b, mesh.c
    c.mode(delay=3)
    replies: dict[str, object] = {}

    def call(method: str, path: str) -> None:
        cl = mesh.client()
        try:
            replies[path] = cl.call(
                "reset.default", path, method, body=b"p" * 1000 if method == "POST" else None
            )
        finally:
            cl.close()

    # Round robin: of three requests at once, one goes to each endpoint.
    threads = [threading.Thread(target=call, args=("GET", f"/reset/get/{i}")) for i in range(3)]
    threads += [threading.Thread(target=call, args=("POST", f"/reset/post/{i}")) for i in range(3)]
    for t in threads[:3]:
        t.start()
    time.sleep(0.2)
    for t in threads[3:]:
        t.start()
    deadline = time.monotonic() + 5
    while {r["method"] for r in c.log() if r["path"].startswith("/reset/")} != {"GET", "POST"}:
        assert time.monotonic() < deadline, c.log()
        time.sleep(0.05)
    c.kill_sidecar()
    for t in threads:
        t.join(10)
    on_c = [r for r in c.log() if r["path"].startswith("/reset/")]
    (get_on_c,) = [r["path"] for r in on_c if r["method"] == "GET"]
    (post_on_c,) = [r["path"] for r in on_c if r["method"] == "POST"]
    print("on c:", get_on_c, post_on_c, {p: (r.status, r.name) for p, r in sorted(replies.items())})
    gets = [replies[f"/reset/get/{i}"] for i in range(3)]
    assert [(r.status, r.name in ("a", "b")) for r in gets] == [(200, True)] * 3
    assert replies[get_on_c].seconds < 2, "retried when the connection was reset"
    failed = replies[post_on_c]
    assert (failed.status, failed.doc["error"]) == (502, "upstream_reset")
    assert all(
        replies[p].status == 200 for p in replies if p.startswith("/reset/post/") and p != post_on_c
    )
    elsewhere = collections.Counter(
        r["path"] for x in (a, b) for r in x.log() if r["path"].startswith("/reset/")
    )
    assert elsewhere == collections.Counter(set(replies) - {post_on_c}), "each exactly once"
    lines = {r["path"]: r for r in mesh.outbound_log("/reset/", 6)}
    assert lines[get_on_c]["retries"] == [f"{c.inbound} reset"]
    assert lines[post_on_c]["status"] == 502 and "retries" not in lines[post_on_c]

    # c's sidecar is gone: connects to it fail, and every request (nothing was sent) is
    # sent elsewhere, POSTs included.
    after = [
        client.call(
            "reset.default", f"/gone/{i}", "POST" if i % 2 else "GET", body=b"q" if i % 2 else None
        )
        for i in range(30)
    ]
    assert [(r.status, r.name in ("a", "b")) for r in after] == [(200, True)] * 30
    got = collections.Counter(
        r["path"] for x in (a, b) for r in x.log() if r["path"].startswith("/gone/")
    )
    assert got == collections.Counter(f"/gone/{i}" for i in range(30))
    lines = mesh.outbound_log("/gone/", 30)
    retried = [x for r in lines for x in r.get("retries", [])]
    assert retried and set(retried) == {f"{c.inbound} connect-failure"}, retried
