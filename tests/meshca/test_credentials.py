"""Join tokens and Kubernetes SA tokens: what verifies, what is refused, what never leaks."""

import asyncio
import datetime as dt
import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshca.errors import BadRequest, Unauthenticated
from meshca.jwks import FileJwks
from meshca.spiffe import SpiffeId
from meshca.tokens import JoinTokens, K8sTokens, peek_issuer

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")


@pytest.fixture(scope="module")
def tokens():
    return JoinTokens(ec.generate_private_key(ec.SECP256R1()), "cluster.local")


def test_mint_and_verify(tokens):
    minted = tokens.mint(WEB, NOW, dt.timedelta(minutes=10), ["web.default.svc"])
    claims = tokens.verify(minted.token, NOW + dt.timedelta(minutes=9))
    assert claims.spiffe_id == WEB and claims.jti == minted.jti
    assert claims.dns_names == ("web.default.svc",)
    assert peek_issuer(minted.token) == tokens.issuer
    assert minted.token not in repr(minted) and "PRIVATE" not in repr(tokens)


def test_expired_join_token_has_no_leeway(tokens):
    minted = tokens.mint(WEB, NOW, dt.timedelta(seconds=10))
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.verify(minted.token, NOW + dt.timedelta(seconds=10))


def test_token_from_another_key(tokens):
    other = JoinTokens(ec.generate_private_key(ec.SECP256R1()), "cluster.local")
    with pytest.raises(Unauthenticated, match="signature"):
        tokens.verify(other.mint(WEB, NOW).token, NOW)


def test_token_from_another_trust_domain(tokens):
    other = JoinTokens(tokens._key, "other.org")
    with pytest.raises(Unauthenticated, match="issuer"):
        tokens.verify(other.mint(SpiffeId.parse("spiffe://other.org/ns/a/sa/b"), NOW).token, NOW)


@pytest.mark.parametrize("ttl", [dt.timedelta(0), dt.timedelta(hours=25)])
def test_mint_ttl_bounds(tokens, ttl):
    with pytest.raises(BadRequest, match="TTL"):
        tokens.mint(WEB, NOW, ttl)


def test_mint_refuses_foreign_id(tokens):
    with pytest.raises(BadRequest):
        tokens.mint(SpiffeId.parse("spiffe://evil.org/ns/a/sa/b"), NOW)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    verifier = K8sTokens("https://k8s", ["meshca"], FileJwks(path, check_every=0), "cluster.local")
    return key, verifier, path


def sa(key, **over):
    claims = {
        "iss": "https://k8s",
        "aud": ["meshca"],
        "sub": "system:serviceaccount:shop:orders",
        "iat": int(NOW.timestamp()),
        "exp": int(NOW.timestamp()) + 600,
        "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders"}},
    }
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def test_sa_token_maps_to_spiffe_id(k8s):
    key, verifier, _ = k8s
    sid = asyncio.run(verifier.verify(sa(key), NOW))
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/orders"


def test_sa_token_clock_leeway(k8s):
    key, verifier, _ = k8s
    token = sa(key)
    asyncio.run(verifier.verify(token, NOW + dt.timedelta(seconds=650)))  # within 60 s leeway
    with pytest.raises(Unauthenticated, match="expired"):
        asyncio.run(verifier.verify(token, NOW + dt.timedelta(seconds=661)))


def test_sa_namespace_cannot_inject_path(k8s):
    key, verifier, _ = k8s
    token = sa(
        key,
        sub="system:serviceaccount:a/sa/admin/ns/x:orders",
        **{"kubernetes.io": {"namespace": "a/sa/admin/ns/x", "serviceaccount": {"name": "orders"}}},
    )
    with pytest.raises(Unauthenticated, match="not a valid name"):
        asyncio.run(verifier.verify(token, NOW))


def test_bad_jwks_file_update_keeps_last_good_keys(k8s):
    key, verifier, path = k8s
    good = path.read_text()
    try:
        path.write_text("{broken")
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # surely seen as changed
        with pytest.raises(ValueError):
            FileJwks(path)  # a fresh start on the broken file fails closed
        assert str(asyncio.run(verifier.verify(sa(key), NOW))).endswith("/sa/orders")
    finally:
        path.write_text(good)


def test_jwt_issuer_repr_hides_the_key():
    from meshca.jwtsvid import JwtIssuer

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = JwtIssuer(key, "cluster.local")
    assert "PRIVATE" not in repr(issuer) and str(key.private_numbers().private_value) not in repr(
        issuer
    )
    minted = issuer.mint(WEB, "api", NOW)
    assert minted.token not in repr(minted)
