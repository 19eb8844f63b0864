"""Header handling on bytes: hop-by-hop removal, service names, XFCC, error bodies."""

import json

import pytest

from sidecar.engines.http1.framing import (
    Framing,
    client_head,
    error_response,
    response_head,
    strip_hop_by_hop,
)
from sidecar.errors import SidecarError
from sidecar.identity.peer import Peer, Verdict
from sidecar.routing.inbound import xfcc
from sidecar.routing.outbound import service_name


def test_strip_hop_by_hop_and_connection_tokens():
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, X-Private"),
        (b"keep-alive", b"timeout=5"),
        (b"x-private", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"3"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"x-forwarded-client-cert", b"spoof"),
        (b"accept", b"*/*"),
    ]
    out = strip_hop_by_hop(headers, frozenset({b"x-forwarded-client-cert"}))
    assert out == [(b"host", b"a"), (b"accept", b"*/*")]


@pytest.mark.parametrize(
    "authority,name",
    [
        (b"backend.default", "backend.default"),
        (b"Backend.Default:80", "backend.default"),
        (b"backend.default.svc", "backend.default"),
        (b"backend.default.svc.cluster.local.", "backend.default"),
        (b"[::1]:8080", "[::1]"),
    ],
)
def test_service_name(authority, name):
    assert service_name(authority) == name


def test_xfcc_format():
    peer = Peer("spiffe://td/ns/c/sa/d", Verdict.VERIFIED, "01", "ab12")
    v = xfcc("spiffe://td/ns/a/sa/b", peer)
    assert v == b"By=spiffe://td/ns/a/sa/b;Hash=ab12;URI=spiffe://td/ns/c/sa/d"


def test_error_response():
    raw = error_response(SidecarError("app_unavailable", "app is unavailable"), close=True)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"connection: close" in head and b"content-length: %d" % len(body) in head
    assert json.loads(body) == {"error": "app_unavailable", "detail": "app is unavailable"}


def test_credentials_repr_hides_the_key():
    import datetime as dt

    from meshca import pki
    from meshca.spiffe import SpiffeId
    from sidecar.identity.creds import Credentials

    now = dt.datetime.now(dt.UTC)
    root_key = pki.new_key()
    root = pki.build_root(root_key, now)
    int_key = pki.new_key()
    inter = pki.build_intermediate(int_key, root, root_key, now)
    key = pki.new_key()
    leaf = pki.build_leaf(
        key.public_key(), SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"), inter, int_key, now
    )
    creds = Credentials.build(
        pki.key_pem(key), pki.pem_join([leaf, inter]), pki.pem_join([root]), "cluster.local", now
    )
    text = repr(creds)
    assert "PRIVATE KEY" not in text and pki.key_pem(key).decode()[40:80] not in text
    assert "/ns/a/sa/b" in text


@pytest.mark.parametrize(
    "headers",
    [
        [(b"connection", b"close"), (b"close", b"x"), (b"x-a", b"1")],
        [(b"close", b"x"), (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5")],
        [(b"connection", b"close, x-secret"), (b"x-secret", b"s"), (b"x-a", b"1")],
        [(b"x-a", b"1"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
        [(b"x-a", b"1"), (b"te", b"trailers"), (b"upgrade", b"h2c"), (b"trailer", b"x")],
    ],
)
def test_one_pass_response_head_is_the_general_one(headers):
    """The client's response head built in one pass drops what the general path drops:
    hop-by-hop and framing headers, names listed in Connection; and the reserved name
    `close` (RFC 9110 16.3.2.2), which the general path drops only when Connection lists it."""
    framing = Framing.of_length(3)
    fast = client_head(200, b"OK", headers, framing, False, "1.1")
    kept = [h for h in strip_hop_by_hop(headers) if h[0] != b"close"]
    general = response_head(200, b"OK", kept, framing, False, "1.1")
    assert fast == general
    assert b"x-secret" not in fast and b"\r\nclose:" not in fast
    assert (b"x-a: 1" in fast) == ((b"x-a", b"1") in headers)
