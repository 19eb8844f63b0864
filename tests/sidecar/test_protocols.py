"""Protocols beyond HTTP/1.1, the pure parts: which engine an ALPN name gets, the protocol
keys of the configuration, TCP policy decisions, `grpc-timeout`, and the HTTP/2 header
translation."""

from __future__ import annotations

import copy

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.engines.h2.downstream import _status, grpc_timeout
from sidecar.engines.h2.flow import h2_headers
from sidecar.engines.http1.framing import CHUNKED, NO_BODY, Framing, Kind, check_request_line
from sidecar.errors import SidecarError, grpc_status
from sidecar.policy.authz import Request, parse_policy
from sidecar.protocols import (
    CLIENT_ALPN,
    HTTP,
    HTTP2,
    MESH_H2,
    MESH_HTTP1,
    MESH_TCP,
    TCP,
    accepted_alpn,
    engine_for,
)

BASE = {
    "ca": {"url": "https://127.0.0.1:8443", "bundle": "ca-root.pem", "token_file": "token"},
    "inbound": {"listen": "0.0.0.0:15006", "app": "127.0.0.1:5000"},
    "outbound": {
        "services": {
            "backend.default": {
                "endpoints": ["127.0.0.1:16006"],
                "identity": "spiffe://cluster.local/ns/default/sa/backend",
            }
        },
    },
}
FRONT = "spiffe://cluster.local/ns/shop/sa/web"


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ca-root.pem").write_text("x")
    return tmp_path


def parse(folder, doc):
    return parse_config(doc, folder / "sidecar.yaml")


OTHER = "spiffe://cluster.local/ns/other/sa/x"


@pytest.mark.parametrize(
    "alpn,app,engine",
    [
        (None, HTTP, HTTP),  # a client without ALPN: as before
        ("http/1.1", HTTP, HTTP),
        (MESH_HTTP1, HTTP, HTTP),
        (MESH_H2, HTTP, HTTP2),  # translated to HTTP/1.1 for the app
        (MESH_TCP, HTTP, ""),  # an opaque tunnel to an HTTP app: refused
        ("h2", HTTP2, HTTP2),
        (MESH_H2, HTTP2, HTTP2),
        (MESH_HTTP1, HTTP2, HTTP),
        (MESH_TCP, TCP, TCP),
        (None, TCP, TCP),  # openssl s_client to a tcp app
        ("http/1.1", TCP, TCP),
        (MESH_HTTP1, TCP, ""),  # a sidecar sending HTTP to a tcp app: refused by name
        (MESH_H2, TCP, ""),
    ],
)
def test_engine_for_each_alpn_and_app_protocol(alpn, app, engine):
    assert engine_for(alpn, app) == engine


def test_plain_clients_get_h2_only_from_an_http2_app():
    assert "h2" not in accepted_alpn(HTTP)  # curl offers h2 first: it keeps HTTP/1.1
    # meshca-tcp is agreed with an HTTP app only to be refused by name
    assert MESH_TCP in accepted_alpn(HTTP) and MESH_TCP in accepted_alpn(HTTP2)
    assert accepted_alpn(HTTP2)[:1] == (MESH_H2,) and "h2" in accepted_alpn(HTTP2)
    assert accepted_alpn(TCP)[0] == MESH_TCP and "http/1.1" not in accepted_alpn(TCP)
    for proto, names in CLIENT_ALPN.items():  # a sidecar's offer is accepted by its peer
        assert names[0] in accepted_alpn(proto)


def with_service(**keys):
    doc = copy.deepcopy(BASE)
    doc["outbound"]["services"]["backend.default"].update(keys)
    return doc


def test_protocol_keys(folder):
    doc = with_service(protocol="tcp", listen="127.0.0.1:16379")
    doc["inbound"]["app_protocol"] = "grpc"
    cfg = parse(folder, doc)
    assert cfg.inbound.app_protocol == HTTP2
    svc = cfg.outbound.services["backend.default"]
    assert svc.protocol == TCP and svc.listen.port == 16379
    assert parse(folder, BASE).inbound.app_protocol == HTTP


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"protocol": "udp"}, "outbound.services.backend.default.protocol: must be one of"),
        ({"listen": "127.0.0.1:1"}, "listen: only a tcp service has a port of its own"),
        ({"protocol": "tcp", "listen": "0.0.0.0:1"}, "listen: must be a loopback address"),
        ({"protocol": "tcp", "timeout": 1}, "timeout: does not apply to protocol tcp"),
        ({"protocol": "tcp", "jwt_audience": "x"}, "jwt_audience: does not apply to protocol tcp"),
        ({"protocol": "tcp", "routes": []}, "routes: does not apply to protocol tcp"),
    ],
)
def test_bad_protocol_settings_name_their_key(folder, change, problem):
    with pytest.raises(ConfigError) as e:
        parse(folder, with_service(**change))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_a_bad_app_protocol_names_its_key(folder):
    doc = copy.deepcopy(BASE)
    doc["inbound"]["app_protocol"] = ["grpc"]
    with pytest.raises(ConfigError) as e:
        parse(folder, doc)
    assert any(p.startswith("inbound.app_protocol: must be one of") for p in e.value.problems)


POLICY = {
    "rules": [
        {"name": "web", "action": "ALLOW", "from": {"principals": [FRONT]}},
        {"name": "paths-only", "action": "ALLOW", "to": {"paths": ["/*"]}},
        {
            "name": "jwt-only",
            "action": "ALLOW",
            "from": {"principals": [OTHER], "request_principals": ["*"]},
        },
        {"name": "no-admin-from-other", "action": "DENY", "from": {"namespaces": ["other"]},
         "to": {"paths": ["/admin"]}},
    ]
}  # fmt: skip


def test_tcp_decisions_follow_istio():
    p = parse_policy(POLICY)
    assert p.decide_connection(FRONT).allowed
    # an ALLOW rule that names an HTTP attribute never matches a connection
    assert not p.decide_connection("spiffe://cluster.local/ns/shop/sa/db").allowed
    # a DENY rule that names one matches on its other fields: it refuses more, not less
    d = p.decide_connection(OTHER)
    assert not d.allowed and d.rule == "no-admin-from-other"
    assert not p.decide_connection(None).allowed
    assert parse_policy({"default": "allow-authenticated"}).decide_connection(FRONT).allowed
    assert not parse_policy({"default": "deny"}).decide_connection(FRONT).allowed


def test_a_missing_token_is_told_apart_from_a_missing_permission():
    p = parse_policy(
        {
            "rules": [
                {
                    "name": "with-jwt",
                    "action": "ALLOW",
                    "from": {"principals": [FRONT], "request_principals": ["iss/*"]},
                    "to": {"paths": ["/orders"]},
                }
            ]
        }
    )
    assert p.allows_with_token(Request(FRONT, "/orders", "GET")) == "with-jwt"
    assert p.allows_with_token(Request(FRONT, "/other", "GET")) is None  # no rule at all
    assert p.allows_with_token(Request(OTHER, "/orders", "GET")) is None


@pytest.mark.parametrize(
    "value,seconds",
    [(b"100m", 0.1), (b"5S", 5.0), (b"1H", 3600.0), (b"2M", 120.0), (b"500u", 0.0005),
     (b"12345678n", 0.012345678), (b"", None), (b"5", None), (b"5s", None), (b"m", None),
     (b"123456789S", None), (b"-1S", None), (None, None)],
)  # fmt: skip
def test_grpc_timeout(value, seconds):
    got = grpc_timeout(value)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_h2_headers_from_a_request_head():
    head = (
        b"POST /pkg.Svc/Call HTTP/1.1\r\nhost: orders.shop\r\ncontent-type: application/grpc\r\n"
        b"X-Mixed: Case\r\nconnection: keep-alive\r\nte: trailers"
    )
    fields, grpc = h2_headers(head, Framing(Kind.LENGTH, 7), b"https")
    assert grpc
    assert fields[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"orders.shop"),
        (b":path", b"/pkg.Svc/Call"),
    ]
    rest = dict(fields[4:])
    assert rest[b"x-mixed"] == b"Case" and b"connection" not in rest and b"host" not in rest
    assert rest[b"te"] == b"trailers" and rest[b"content-length"] == b"7"
    fields, grpc = h2_headers(b"GET / HTTP/1.1\r\nhost: a", CHUNKED, b"http")
    assert not grpc and b"content-length" not in dict(fields)
    assert h2_headers(b"GET / HTTP/1.1\r\nhost: a", NO_BODY, b"http")[0][2] == (b":authority", b"a")


@pytest.mark.parametrize(
    "code,status",
    [("jwt_required", 16), ("invalid_token", 16), ("forbidden", 7), ("app_unavailable", 14),
     ("upstream_timeout", 4), ("overloaded", 14), ("too_large", 8), ("unknown_service", 12),
     ("bad_request", 13), ("upstream_reset", 14), ("internal", 13)],
)  # fmt: skip
def test_grpc_status_of_each_refusal(code, status):
    assert grpc_status(SidecarError(code, "x")) == status


@pytest.mark.parametrize(
    "method,target,authority,ok",
    [
        (b"GET", b"/a?b=c", b"orders.shop:80", True),
        (b"POST", b"/pkg.Svc/Call", b"[::1]:50051", True),
        (b"OPTIONS", b"*", None, True),
        (b"GET", b"/a /admin", b"x", False),  # the app would read another request line
        (b"GET", b"/a\tb", b"x", False),
        (b"GET", b"/\x7f", b"x", False),
        (b"GET", b"/caf\xc3\xa9", b"x", False),
        (b"GET", b"relative", b"x", False),
        (b"GET", b"*", b"x", False),
        (b"OPTIONS", b"*x", None, False),
        (b"GET", b"", b"x", False),
        (b"GET /x", b"/", b"x", False),
        (b"", b"/", b"x", False),
        (b"GET", b"/", b"user@host", False),
        (b"GET", b"/", b"a b", False),
        (b"GET", b"/", b"", False),
    ],
)
def test_a_request_line_made_from_pseudo_headers_is_checked(method, target, authority, ok):
    if ok:
        check_request_line(method, target, authority)
    else:
        with pytest.raises(SidecarError) as e:
            check_request_line(method, target, authority)
        assert e.value.status == 400


@pytest.mark.parametrize(
    "value,code",
    [(b"0", 0), (b"16", 16), (b"7", 7), (b"17", None), (b"99", None), (b"007", None),
     (b"1" * 5000, None), (b"-1", None), (b"x", None), (b"", None)],
)  # fmt: skip
def test_grpc_status_from_a_peer_is_bounded(value, code):
    """It becomes a metrics label: a peer must not make new series (or crash the parse)."""
    assert _status([(b"grpc-status", value)]) == code


def test_jwt_with_a_tcp_app_is_refused(folder):
    doc = copy.deepcopy(BASE)
    doc["inbound"]["app_protocol"] = "tcp"
    doc["jwt"] = {"issuers": [{"issuer": "x", "audiences": ["y"], "jwks_file": "ca-root.pem"}]}
    with pytest.raises(ConfigError) as e:
        parse(folder, doc)
    assert any(p.startswith("jwt: inbound.app_protocol is tcp") for p in e.value.problems)
