"""W3C Trace Context and x-request-id, pure: which traceparent is valid (the cases of the
W3C test suite, w3c/trace-context test/test.py), which tracestate is kept, how often a
new trace is sampled, which request ids are kept; and the one set of trace headers
each router writes into the head it forwards (no sockets)."""

from __future__ import annotations

import math
import uuid

import pytest
from routerfakes import Caller, Store

from meshca.config import parse_listen
from sidecar.config import InboundConfig, TracingConfig, parse_config
from sidecar.engines.http1.exchange import Exchange
from sidecar.errors import SidecarError
from sidecar.identity.peer import LOCAL_APP
from sidecar.routing.inbound import InboundRouter
from sidecar.routing.outbound import OutboundRouter
from sidecar.telemetry import tracing
from sidecar.telemetry.record import ExchangeRecord
from sidecar.telemetry.tracing import (
    keep_request_id,
    next_hop,
    parse_traceparent,
    parse_tracestate,
    sampling_threshold,
)

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
ALWAYS = sampling_threshold(1.0)
NEVER = sampling_threshold(0.0)


def tp(value: str) -> tracing.TraceParent | None:
    return parse_traceparent(value.encode())


# -- traceparent -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,flags",
    [
        (f"00-{TRACE}-{PARENT}-01", 1),
        (f"00-{TRACE}-{PARENT}-00", 0),
        (f"00-{TRACE}-{PARENT}-09", 9),  # flags as sent; reserved bits are zeroed on the way out
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 1),  # the spec's example
        (f" 00-{TRACE}-{PARENT}-01", 1),  # OWS around the value
        (f"\t00-{TRACE}-{PARENT}-01", 1),
        (f"00-{TRACE}-{PARENT}-01 ", 1),
        (f"\t 00-{TRACE}-{PARENT}-01 \t", 1),
        (f"cc-{TRACE}-{PARENT}-01", 1),  # a future version: its first four fields
        (f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like", 1),
        (f"01-{TRACE}-{PARENT}-00-", 0),
    ],
)
def test_valid_traceparent(value, flags):
    parent = tp(value)
    assert parent is not None
    assert parent == (
        value.strip()[3:35].encode(),
        value.strip()[36:52].encode(),
        flags,
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TRACE}-{PARENT}-01.",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{PARENT}-01-what-the-future-will-be-like",
        f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like",  # a field must follow a dash
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f".0-{TRACE}-{PARENT}-01",
        f"0.-{TRACE}-{PARENT}-01",
        f"000-{TRACE}-{PARENT}-01",
        f"0000-{TRACE}-{PARENT}-01",
        f"0-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-.{TRACE[1:]}-{PARENT}-01",
        f"00-{TRACE[:-1]}.-{PARENT}-01",
        f"00-{TRACE}3-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-.{PARENT[1:]}-01",
        f"00-{TRACE}-{PARENT[:-1]}.-01",
        f"00-{TRACE}-{PARENT}7-01",
        f"00-{TRACE}-{PARENT[:-1]}-01",
        f"00-{TRACE}-{PARENT}-.0",
        f"00-{TRACE}-{PARENT}-0.",
        f"00-{TRACE}-{PARENT}-001",
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE[:-3]}ABC-{PARENT}-01",  # uppercase hex is not hex here
        f"00-{TRACE}-{PARENT[:-1]}A-01",
        f"00-{TRACE}-{PARENT}-0A",
        f"0A-{TRACE}-{PARENT}-01",
        f"00_{TRACE}-{PARENT}-01",
        f"00-{TRACE}_{PARENT}-01",
        f"00-{TRACE}-{PARENT}_01",
        f"00-{TRACE[:-1]}-{PARENT}7-01",  # dashes in the wrong places
        f"00-{TRACE}-{PARENT[:-2]}-{'-' * 4}",
        f"00-+{TRACE[1:]}-{PARENT}-01",  # what int(x, 16) would accept
        f"00-{TRACE}-{PARENT}-0x",
    ],
)
def test_invalid_traceparent(value):
    assert tp(value) is None


# -- the next hop ------------------------------------------------------------------


def hop(*headers: tuple[str, str], threshold: int = ALWAYS) -> tracing.Hop:
    return next_hop([(k.encode(), v.encode()) for k, v in headers], threshold)


def test_valid_traceparent_is_continued_with_a_new_span_id():
    h = hop(("traceparent", f"00-{TRACE}-{PARENT}-01"), threshold=NEVER)
    assert h.trace_id == TRACE.encode() and h.parent_id == PARENT.encode()
    assert h.span_id != PARENT.encode() and h.sampled  # the caller's flag, not the ratio
    out = parse_traceparent(h.traceparent)
    assert out == (TRACE.encode(), h.span_id, 1)
    assert h.traceparent.startswith(b"00-")


def test_each_hop_gets_its_own_span_id():
    spans = {hop(("traceparent", f"00-{TRACE}-{PARENT}-00")).span_id for _ in range(100)}
    assert len(spans) == 100


@pytest.mark.parametrize(
    "sent,kept",
    [("00", "00"), ("01", "01"), ("02", "02"), ("03", "03"), ("09", "01"), ("ff", "03")],
)
def test_defined_flags_kept_reserved_flags_zeroed(sent, kept):
    h = hop(("traceparent", f"00-{TRACE}-{PARENT}-{sent}"))
    assert h.traceparent.endswith(b"-" + kept.encode())


def test_future_version_goes_on_as_version_00():
    h = hop(("traceparent", f"cc-{TRACE}-{PARENT}-01-future"), ("tracestate", "foo=1"))
    assert h.traceparent.startswith(b"00-%s-" % TRACE.encode()) and len(h.traceparent) == 55
    assert h.tracestate == b"foo=1"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", f"00-{'0' * 32}-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("traceparent", f"00-{TRACE}-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("traceparent", "garbage")],
    ],
)
def test_no_single_valid_traceparent_starts_a_new_trace(headers):
    h = hop(*headers, ("tracestate", "foo=1"))
    assert h.trace_id != TRACE.encode() and h.parent_id is None
    assert h.tracestate is None  # a restarted trace does not carry the old tracestate
    out = parse_traceparent(h.traceparent)
    assert out == (h.trace_id, h.span_id, h.flags)


def test_header_lines():
    h = hop(
        ("traceparent", f"00-{TRACE}-{PARENT}-01"),
        ("tracestate", "rojo=1"),
        ("x-request-id", "abc"),
    )
    assert h.header_lines() == (
        b"traceparent: 00-%s-%s-01\r\ntracestate: rojo=1\r\nx-request-id: abc\r\n"
        % (TRACE.encode(), h.span_id)
    )
    assert h.ids == (TRACE, "abc")
    assert b"tracestate" not in hop(("traceparent", f"00-{TRACE}-{PARENT}-01")).header_lines()


# -- tracestate --------------------------------------------------------------------

KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))


@pytest.mark.parametrize(
    "values,kept",
    [
        (["foo=1,bar=2"], "foo=1,bar=2"),
        (["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1,bar=2,rojo=1,congo=2,baz=3"),
        (["foo=1", ""], "foo=1"),  # empty headers and members are allowed
        (["", "foo=1"], "foo=1"),
        (["foo=1,,bar=2, ,"], "foo=1,bar=2"),
        (["foo=1 \t , \t bar=2, \t baz=3"], "foo=1,bar=2,baz=3"),  # OWS around members
        (["\t foo=1 \t"], "foo=1"),
        (["foo= 1"], "foo= 1"),  # a value's leading space is its own
        ([f"{KEY}={VALUE}"], f"{KEY}={VALUE}"),  # every allowed character
        ([f"{KEY}@a-z0-9_-*/={VALUE}"], f"{KEY}@a-z0-9_-*/={VALUE}"),
        (["0tenant@vendor=x"], "0tenant@vendor=x"),  # a tenant id may start with a digit
        (["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),  # longest key
        (["t" * 241 + "@" + "v" * 14 + "=1"], "t" * 241 + "@" + "v" * 14 + "=1"),
        (["k=" + "v" * 256], "k=" + "v" * 256),  # longest value
        ([",".join(f"bar{i:02}={i:02}" for i in range(1, 33))], None),  # 32 members: kept
    ],
)
def test_tracestate_kept(values, kept):
    out = parse_tracestate([v.encode() for v in values])
    if kept is None:
        kept = ",".join(f"bar{i:02}={i:02}" for i in range(1, 33))
    assert out == kept.encode()


@pytest.mark.parametrize(
    "values",
    [
        [""],
        [" , "],
        ["foo=1,foo=1"],  # a key twice
        ["foo=1,foo=2"],
        ["foo=1", "foo=2"],
        ["foo =1"],  # keys: lowercase letters, digits, _-*/ and one @
        ["FOO=1"],
        ["foo.bar=1"],
        ["1foo=1"],  # a simple key starts with a letter
        ["foo@=1,bar=2"],
        ["@foo=1,bar=2"],
        ["foo@@bar=1,bar=2"],
        ["foo@bar@baz=1,bar=2"],
        ["foo@1bar=1"],  # a system id starts with a letter
        ["foo=1", "z" * 257 + "=1"],
        ["foo=1", "t" * 242 + "@v=1"],
        ["foo=1", "t@" + "v" * 15 + "=1"],
        ["foo=bar=baz"],  # values: printable ASCII but , and =
        ["foo=,bar=3"],  # a value is not empty
        ["foo=a\tb"],
        ["foo=caf\xe9"],
        ["k=" + "v" * 257],
        ["foo"],
        [",".join(f"bar{i:02}={i:02}" for i in range(1, 34))],  # 33 members
    ],
)
def test_tracestate_dropped(values):
    assert parse_tracestate([v.encode("latin-1") for v in values]) is None


def test_tracestate_capped_at_512_bytes_big_members_first():
    big = "big=" + "x" * 130  # over 128: removed first
    small = [f"k{i:02}=" + "v" * 40 for i in range(12)]  # 44 bytes each
    out = parse_tracestate([",".join([small[0], big, *small[1:]]).encode()])
    assert out is not None and len(out) <= 512
    # 12 small ones are 539 bytes with their commas: without `big`, the last one goes too.
    assert out == ",".join(small[:11]).encode()


def test_tracestate_cap_keeps_a_big_member_if_it_fits():
    state = "big=" + "x" * 200 + ",a=1"
    assert parse_tracestate([state.encode()]) == state.encode()


def test_tracestate_exactly_512_bytes_kept():
    members = [f"k{i:02}=" + "v" * 59 for i in range(8)]  # 8 * 63 + 7 commas = 511
    members[0] += "v"
    state = ",".join(members)
    assert len(state) == 512
    assert parse_tracestate([state.encode()]) == state.encode()


# -- sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.25, 0.5, 0.9])
def test_new_traces_sampled_at_the_ratio(ratio):
    n = 20_000
    threshold = sampling_threshold(ratio)
    sampled = sum(hop(threshold=threshold).sampled for _ in range(n))
    sigma = math.sqrt(n * ratio * (1 - ratio))
    assert abs(sampled - n * ratio) < 5 * sigma, (sampled, n * ratio)


@pytest.mark.parametrize("ratio,expected", [(0.0, False), (1.0, True)])
def test_sampling_none_or_all(ratio, expected):
    threshold = sampling_threshold(ratio)
    assert {hop(threshold=threshold).sampled for _ in range(2000)} == {expected}


def test_sampling_decision_follows_the_trace_id():
    """The decision is a function of the new trace id (as OpenTelemetry's ratio sampler):
    every hop that starts traces at the same ratio agrees on the same id."""
    threshold = sampling_threshold(0.5)
    for _ in range(200):
        h = hop(threshold=threshold)
        assert h.sampled == (int(h.trace_id[16:], 16) < threshold)


# -- x-request-id ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        "x" * 128,
        "req 42 /with:any~printable!",
        "".join(map(chr, range(0x20, 0x7F)))[:128],
    ],
)
def test_request_id_kept(value):
    assert keep_request_id(value.encode()) == value.encode()
    h = hop(("x-request-id", value))
    assert h.request_id == value.encode() and h.ids[1] == value


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * 129, b"caf\xc3\xa9", b"a\tb", b"a\x00b", b"a\x7fb", b"line\r\nx-evil: 1"],
)
def test_request_id_replaced(value):
    assert keep_request_id(value) is None
    h = next_hop([(b"x-request-id", value)], ALWAYS)
    assert h.request_id != value and uuid.UUID(h.request_id.decode()).version == 4


def test_generated_request_ids_are_uuid4_and_distinct():
    ids = [hop().request_id.decode() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for rid in ids[:50]:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid


def test_first_request_id_wins():
    assert hop(("x-request-id", "one"), ("x-request-id", "two")).request_id == b"one"


def test_generated_trace_ids_are_distinct():
    assert len({hop().trace_id for _ in range(1000)}) == 1000


# -- the routers' heads ------------------------------------------------------------


class App:
    peer = LOCAL_APP
    transport = None


def inbound(sampling=1.0) -> InboundRouter:
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    return InboundRouter(cfg, Store(), tracing=TracingConfig(sampling=sampling))


def outbound(tmp_path, sampling=1.0) -> OutboundRouter:
    (tmp_path / "ca-root.pem").write_text("x")
    doc = {
        "ca": {"url": "https://127.0.0.1:8443", "bundle": "ca-root.pem", "token_file": "t"},
        "outbound": {
            "listen": "127.0.0.1:15001",
            "services": {
                "backend.default": {
                    "endpoints": ["127.0.0.1:16006"],
                    "identity": "spiffe://cluster.local/ns/default/sa/backend",
                }
            },
        },
    }
    cfg = parse_config(doc, tmp_path / "sidecar.yaml")
    return OutboundRouter(cfg.outbound, Store(), tracing=TracingConfig(sampling=sampling))


def head_lines(head: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in head.decode().split("\r\n")[1:] if line]


def exchange(direction: str, headers, target=b"/x") -> Exchange:
    # as the engines hand a head over: names lowercased by the parser
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    return Exchange(b"GET", target, raw, "1.1", True, ExchangeRecord(direction))


APP_HEADERS = [
    ("Host", "backend.default"),
    ("TraceParent", f"00-{TRACE}-{PARENT}-01"),
    ("tracestate", "congo=t61rcWkgMzE"),
    ("X-Request-ID", "req-1"),
    ("Accept", "*/*"),
]


def routed(router, direction, headers, conn):
    ex = exchange(direction, headers)
    _, head = router.route(conn, ex)
    lines = head_lines(head)
    names = [name.decode() for name in tracing.TRACE_HEADERS]
    return ex.record, {n: [v for k, v in lines if k.lower() == n] for n in names}, lines


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_router_replaces_the_trace_headers_once(side, tmp_path):
    router = inbound() if side == "inbound" else outbound(tmp_path)
    conn = Caller() if side == "inbound" else App()
    rec, named, lines = routed(router, side, APP_HEADERS, conn)
    assert len(named["traceparent"]) == 1 and len(named["tracestate"]) == 1
    assert len(named["x-request-id"]) == 1
    out = parse_traceparent(named["traceparent"][0].encode())
    assert out is not None and out[0] == TRACE.encode() and out[2] == 1
    assert out[1] != PARENT.encode()
    assert named["tracestate"] == ["congo=t61rcWkgMzE"] and named["x-request-id"] == ["req-1"]
    assert (rec.trace_id, rec.request_id) == (TRACE, "req-1")
    assert ("accept", "*/*") in lines


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_router_starts_a_trace(side, tmp_path):
    router = inbound(0.0) if side == "inbound" else outbound(tmp_path, 0.0)
    conn = Caller() if side == "inbound" else App()
    headers = [("Host", "backend.default"), ("traceparent", "bogus"), ("tracestate", "a=1")]
    rec, named, _ = routed(router, side, headers, conn)
    out = parse_traceparent(named["traceparent"][0].encode())
    assert out is not None and out[2] == 0  # sampling 0: not sampled
    assert rec.trace_id == out[0].decode()
    assert named["tracestate"] == []
    assert rec.request_id == named["x-request-id"][0]
    assert uuid.UUID(rec.request_id).version == 4


def test_inbound_underscore_spellings_of_trace_headers_never_reach_the_app():
    cfg = InboundConfig(
        parse_listen("127.0.0.1:0"),
        parse_listen("127.0.0.1:5000"),
        headers_with_underscores_action="ALLOW",
    )
    router = InboundRouter(cfg, Store())
    headers = [("X_Request_Id", "forged"), ("x_ok", "1")]
    _, named, lines = routed(router, "inbound", headers, Caller())
    assert "forged" not in named["x-request-id"] and ("x_ok", "1") in lines
    assert all(k.lower() != "x_request_id" for k, _ in lines)


def test_refused_requests_are_logged_with_their_ids(tmp_path):
    sent = [("Host", "payments.default"), ("traceparent", f"00-{TRACE}-{PARENT}-01")]
    ex = exchange("outbound", sent)  # no such service
    with pytest.raises(SidecarError):
        outbound(tmp_path).route(App(), ex)
    assert ex.record.trace_id == TRACE and uuid.UUID(ex.record.request_id).version == 4
    ex = exchange("inbound", [("x-request-id", "r-9")], target=b"/a;b")  # `;` refused
    with pytest.raises(SidecarError):
        inbound().route(Caller(), ex)
    assert ex.record.request_id == "r-9" and len(ex.record.trace_id) == 32
