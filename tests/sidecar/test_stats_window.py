"""`sidecar stats`'s last minute, pure: per peer and direction, success rate, requests per
second, latency quantiles within the buckets' 5 %, denials, and what falls out after 60 s."""

from __future__ import annotations

import random

from sidecar.telemetry.record import ExchangeRecord
from sidecar.telemetry.window import WINDOW, Window

CALLER = "spiffe://cluster.local/ns/shop/sa/web"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(direction="inbound", status=200, ms=1.0, **kw) -> ExchangeRecord:
    return ExchangeRecord(direction, status=status, ms=ms, peer=kw.pop("peer", CALLER), **kw)


def test_quantiles_success_rate_rate_and_denials():
    clock = Clock()
    w = Window(clock)
    rng = random.Random(3)
    latencies = sorted(rng.uniform(1, 100) for _ in range(1000))
    for i, ms in enumerate(latencies):
        clock.now = 1000 + i * 0.03  # 30 s of traffic
        w.write(rec(ms=ms, status=503 if i % 100 == 0 else 200))
    w.write(rec(status=403, decision="deny", ms=0.5))
    (row,) = w.snapshot()["peers"]
    assert row["direction"] == "inbound" and row["peer"] == CALLER
    assert row["requests"] == 1001
    assert row["success_rate"] == round(991 / 1001, 4)  # ten 503s; a 403 is an answer
    assert row["rps"] == round(1001 / WINDOW, 2)
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        true = latencies[int(q * 1000) - 1]
        assert abs(row[key] - true) / true < 0.06, (key, row[key], true)
    assert row["authz_denials"] == 1


def test_outbound_rows_by_service_and_sidecar_answers_count_as_failures():
    w = Window(Clock())
    w.write(rec("outbound", service="reviews.default", peer="spiffe://x/ns/d/sa/r"))
    w.write(rec("outbound", service="reviews.default", status=503, error="overloaded"))
    w.write(rec("outbound", service=None, status=404, error="unknown_service"))
    rows = {(r["direction"], r["peer"]): r for r in w.snapshot()["peers"]}
    assert rows[("outbound", "reviews.default")]["success_rate"] == 0.5
    assert rows[("outbound", "unknown")]["success_rate"] == 0.0


def test_the_window_forgets_what_is_a_minute_old():
    clock = Clock()
    w = Window(clock)
    w.write(rec())
    w.refused("inbound", "no_certificate")
    clock.now += WINDOW - 1
    w.write(rec())
    snap = w.snapshot()
    assert snap["peers"][0]["requests"] == 2 and snap["tls_handshake_failures"] == {"inbound": 1}
    clock.now += 2  # the first second is out
    snap = w.snapshot()
    assert snap["peers"][0]["requests"] == 1 and snap["tls_handshake_failures"] == {"inbound": 0}
    clock.now += WINDOW
    assert w.snapshot()["peers"] == []
