"""What the routers keep per request target or authority (to skip work on the next
request) stays small whatever a peer sends: distinct long targets, refused by the policy,
or Host values that name no service, pin no memory."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from routerfakes import Caller, Store

from meshca.config import parse_listen
from sidecar.config import InboundConfig, parse_config
from sidecar.engines.http1.exchange import Exchange
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP
from sidecar.policy.authz import parse_policy
from sidecar.policy.holder import PolicyHolder
from sidecar.routing.inbound import InboundRouter
from sidecar.routing.outbound import OutboundRouter
from sidecar.telemetry.record import ExchangeRecord

N, SIZE = 200, 20_000  # 4 MB of distinct targets in all


def held_after(route) -> int:
    """Bytes still allocated after N requests through `route`, each with a new long value."""
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(N):
            try:
                route(b"%d-" % i + b"a" * SIZE)
            except SidecarError:
                pass
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def test_long_targets_refused_by_policy_pin_nothing():
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    holder = PolicyHolder(None)
    holder.current = parse_policy({"default": "deny"})
    router = InboundRouter(cfg, Store(), policy=holder)  # type: ignore[arg-type]

    def route(value: bytes) -> None:
        ex = Exchange(b"GET", b"/" + value, [(b"host", b"x")], "1.1", True, ExchangeRecord("in"))
        router.route(Caller(), ex)  # type: ignore[arg-type]

    assert held_after(route) < 1_000_000


class App:
    peer = LOCAL_APP
    transport = None


@pytest.fixture
def outbound(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    (tmp_path / "token").write_text("x")
    doc = {
        "ca": {"url": "https://ca:8443", "bundle": "ca-root.pem", "token_file": "token"},
        "outbound": {
            "listen": "127.0.0.1:0",
            "services": {
                "api.default": {
                    "endpoints": ["127.0.0.1:1"],
                    "identity": "spiffe://cluster.local/ns/default/sa/api",
                }
            },
        },
    }
    cfg = parse_config(doc, tmp_path / "sidecar.yaml")
    return OutboundRouter(cfg.outbound, Store())  # type: ignore[arg-type]


def test_host_values_naming_no_service_pin_nothing(outbound):
    def route(value: bytes) -> None:
        ex = Exchange(b"GET", b"/", [(b"host", value)], "1.1", True, ExchangeRecord("out"))
        outbound.route(App(), ex)

    assert held_after(route) < 1_000_000
    ex = Exchange(b"GET", b"/", [(b"host", b"api.default")], "1.1", True, ExchangeRecord("out"))
    pool, head = outbound.route(App(), ex)
    assert pool.label == "api.default" and b"host: api.default" in head


def test_a_cached_target_is_never_taken_for_one_it_was_not_checked_as():
    """The normalized-target cache keeps only what `normalize` checked: `*` is OPTIONS's
    alone, so `GET *` after `OPTIONS *` is still refused, and a dot-segment path is
    forwarded as its normalized form from the cache too."""
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    router = InboundRouter(cfg, Store())  # type: ignore[arg-type]

    def request_line(method: bytes, target: bytes) -> bytes:
        ex = Exchange(method, target, [(b"host", b"x")], "1.1", True, ExchangeRecord("in"))
        _, head = router.route(Caller(), ex)  # type: ignore[arg-type]
        return head.split(b"\r\n", 1)[0]

    for _ in range(2):  # the second time from the cache
        assert request_line(b"OPTIONS", b"*") == b"OPTIONS * HTTP/1.1"
        with pytest.raises(SidecarError) as e:
            request_line(b"GET", b"*")
        assert e.value.code == "bad_path"
        assert request_line(b"GET", b"/a/../b?q=1") == b"GET /b?q=1 HTTP/1.1"
