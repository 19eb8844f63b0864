"""What the inbound router forwards to the app for header names with `_` (pure: no sockets).

Each `headers_with_underscores_action` mode, and in every mode: no spelling of a
header the sidecar owns (identity headers it writes, token headers it reads,
hop-by-hop and framing headers) reaches the app except its own.
"""

from __future__ import annotations

import time

import jwt
import pytest
from routerfakes import Caller, Store

from meshca.config import parse_listen
from sidecar.config import InboundConfig
from sidecar.engines.http1.exchange import Exchange
from sidecar.errors import SidecarError
from sidecar.policy.authn import Authenticator, IssuerRule
from sidecar.routing.inbound import InboundRouter, owned_headers
from sidecar.telemetry.record import ExchangeRecord

SECRET = b"s" * 32


def router(mode: str | None = None) -> InboundRouter:
    kw = {"headers_with_underscores_action": mode} if mode else {}
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"), **kw)
    authn = Authenticator(
        [
            IssuerRule(
                "test",
                (),
                None,
                algorithms=("HS256",),
                hmac_secret=SECRET,
                from_header=b"x-jwt-token",
                prefix=b"",
                claims_header=b"x-jwt-claims",
            )
        ]
    )
    return InboundRouter(cfg, Store(), authn)


def forwarded(r: InboundRouter, headers) -> list[tuple[str, str]]:
    """The header lines of the head the app would receive."""
    # as the engines hand a head over: names lowercased by the parser (HTTP/2: by the protocol)
    ex = Exchange(
        b"GET", b"/x", [(k.lower(), v) for k, v in headers], "1.1", True, ExchangeRecord("inbound")
    )
    _, head = r.route(Caller(), ex)
    lines = head.decode().split("\r\n")[1:]
    return [tuple(line.split(": ", 1)) for line in lines if line]


def token() -> str:
    return jwt.encode({"iss": "test", "sub": "me", "exp": int(time.time()) + 300}, SECRET)


# Client spellings of every header the sidecar writes or reads for the app.
FORGED = [
    (b"X_Forwarded_Client_Cert", b"By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin"),
    (b"x_forwarded_client_cert", b"forged"),
    (b"X-Forwarded_Client-Cert", b"forged"),
    (b"X_Forwarded_Proto", b"http"),
    (b"X_Jwt_Claims", b"eyJzdWIiOiJhZG1pbiJ9"),
    (b"x-jwt_claims", b"eyJzdWIiOiJhZG1pbiJ9"),
    (b"X_Jwt_Token", b"unverified"),
    (b"Transfer_Encoding", b"chunked"),
    (b"Content_Length", b"5"),
    (b"Proxy_Authorization", b"Basic x"),
    (b"Keep_Alive", b"timeout=5"),
]


@pytest.mark.parametrize("mode", ["ALLOW", "DROP_HEADER", None])
def test_owned_header_spellings_never_reach_the_app(mode):
    got = forwarded(router(mode), [(b"Host", b"a"), *FORGED, (b"X-Jwt-Token", token().encode())])
    names = [k.lower().replace("_", "-") for k, _ in got]
    assert names.count("x-forwarded-client-cert") == 1
    assert dict(got)["x-forwarded-client-cert"] == (
        "By=spiffe://cluster.local/ns/b/sa/me;Hash=feed;URI=spiffe://cluster.local/ns/a/sa/caller"
    )
    assert names.count("x-forwarded-proto") == 1 and dict(got)["x-forwarded-proto"] == "https"
    assert names.count("x-jwt-claims") == 1
    assert dict(got)["x-jwt-claims"] != "eyJzdWIiOiJhZG1pbiJ9"  # the sidecar's own
    assert names.count("x-jwt-token") == 1 and "x-jwt-token" in dict(got)  # verified, forwarded
    for name in ("transfer-encoding", "content-length", "proxy-authorization", "keep-alive"):
        assert name not in names


def test_reject_request_mode_refuses_any_underscore_header():
    r = router("REJECT_REQUEST")
    for name, value in [*FORGED, (b"X_Custom", b"1")]:
        with pytest.raises(SidecarError) as e:
            forwarded(r, [(b"Host", b"a"), (name, value)])
        assert e.value.status == 400 and e.value.code == "underscore_in_header_name"
    assert ("x-custom", "1") in forwarded(r, [(b"Host", b"a"), (b"X-Custom", b"1")])


@pytest.mark.parametrize("mode,kept", [("ALLOW", True), ("DROP_HEADER", False), (None, False)])
def test_other_underscore_headers_follow_the_mode(mode, kept):
    got = forwarded(router(mode), [(b"Host", b"a"), (b"X_Custom", b"1"), (b"X-Other", b"2")])
    assert (("x_custom", "1") in got) is kept  # names reach the app lowercase
    assert ("x-other", "2") in got and ("host", "a") in got


def test_owned_names_are_normalized():
    assert b"x-forwarded-client-cert" in owned_headers(None)
    assert b"x-jwt-claims" not in owned_headers(None)
    assert {b"x-jwt-claims", b"x-jwt-token"} <= router().owned


def test_a_peers_fault_forcing_header_never_reaches_the_app():
    """`x-sidecar-fault` forces this pod's outbound faults: a peer's copy (any spelling) is
    dropped, so an app that passes headers on cannot be made to force them."""
    got = forwarded(
        router("ALLOW"),
        [(b"Host", b"a"), (b"X-Sidecar-Fault", b"abort"), (b"x_sidecar_fault", b"1")],
    )
    assert [k for k, _ in got if "fault" in k.lower()] == []
