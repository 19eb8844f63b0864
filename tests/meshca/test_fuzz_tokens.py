"""Bearer tokens at the CA under arbitrary input (hypothesis): garbage, JWT-shaped garbage, and
tokens correctly signed by a trusted key but carrying arbitrary claims and headers. Each is
verified or refused with a 401 MeshcaError; no other exception (a 500) and no acceptance of
a token whose claims are not what the verifier requires."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given
from hypothesis import strategies as st

from meshca.errors import MeshcaError
from meshca.jwks import JwksSource, parse_jwks
from meshca.spiffe import SpiffeId
from meshca.tokens import JoinTokens, K8sTokens, peek_issuer

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TS = int(NOW.timestamp())
CA_KEY = ec.generate_private_key(ec.SECP256R1())
JOIN = JoinTokens(CA_KEY, "cluster.local")
K8S_KEY = ec.generate_private_key(ec.SECP256R1())
K8S_ISSUER = "https://kubernetes.default.svc"


class Jwks(JwksSource):
    """The cluster's JWKS: one EC key, kid `k1`."""

    def __init__(self) -> None:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(K8S_KEY.public_key()))
        self.keys = parse_jwks(
            json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}).encode(), "the JWKS"
        )

    def get(self, kid):
        return next((k for k in self.keys if k.kid == kid), None)

    async def refresh(self) -> bool:
        return False


K8S = K8sTokens(K8S_ISSUER, ["meshca"], Jwks(), "cluster.local")


def refused_or_accepted(fn, *args):
    """fn(*args) (awaited if a coroutine), or None if refused with a 401 MeshcaError."""
    try:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return result
    except MeshcaError as e:
        assert e.status == 401, f"{type(e).__name__} {e.status}: {e.detail}"
        assert e.detail and e.code == "invalid_token"
        return None


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


ES256 = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256)


def sign(claims: object, key: ec.EllipticCurvePrivateKey, headers: dict) -> str:
    """A correctly ES256-signed JWS of any JSON (PyJWT's encode would refuse odd claims)."""
    head = {"alg": "ES256", "typ": "JWT", **headers}
    signing_input = b64(json.dumps(head).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(ES256.sign(signing_input.encode(), key))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
segment = st.one_of(
    st.binary(max_size=40).map(b64),
    json_values.map(lambda v: b64(json.dumps(v).encode())),
    st.text(max_size=20),
)
garbage = st.one_of(
    st.text(max_size=80),
    st.lists(segment, min_size=1, max_size=4).map(".".join),
)


@given(garbage)
@example("a.b.c")
@example("e30.e30.")
@example(b64(b'{"alg":"none"}') + "." + b64(b'{"iss":"meshca-join/cluster.local"}') + ".")
def test_garbage_tokens(token):
    iss = refused_or_accepted(peek_issuer, token)
    assert iss is None or isinstance(iss, str)
    assert refused_or_accepted(JOIN.verify, token, NOW) is None
    assert refused_or_accepted(K8S.verify, token, NOW) is None


def claim(name: str, good: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """The claim absent, well-formed, or any JSON value."""
    return st.one_of(
        st.just({}), good.map(lambda v: {name: v}), json_values.map(lambda v: {name: v})
    )


def merged(*parts: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


join_claims = merged(
    claim("iss", st.just(JOIN.issuer)),
    claim("aud", st.just("meshca")),
    claim("sub", st.sampled_from(["spiffe://cluster.local/ns/a/sa/b", "spiffe://other/ns/a/sa/b"])),
    claim("iat", st.just(TS - 10)),
    claim("exp", st.just(TS + 600)),
    claim("nbf", st.just(TS - 10)),
    claim("jti", st.just("abc")),
    claim("dns", st.just(["a.default.svc"])),
)


@given(join_claims, st.dictionaries(st.sampled_from(["kid", "typ", "cty", "crit"]), json_values))
@example(
    {"iss": JOIN.issuer, "aud": "meshca", "sub": "spiffe://cluster.local/ns/a/sa/b",
     "iat": TS, "exp": TS + 60, "jti": "j"},
    {},
)  # fmt: skip
def test_signed_join_tokens_with_any_claims(claims, headers):
    token = sign(claims, CA_KEY, headers)
    got = refused_or_accepted(JOIN.verify, token, NOW)
    if got is not None:  # accepted: only with every claim as the verifier requires
        assert claims["iss"] == JOIN.issuer and claims["aud"] == "meshca"
        assert got.spiffe_id == SpiffeId.parse(claims["sub"])
        assert got.spiffe_id.trust_domain == "cluster.local"
        assert claims["exp"] > TS and got.jti == claims["jti"]


k8s_claims = merged(
    claim("iss", st.just(K8S_ISSUER)),
    claim("aud", st.sampled_from(["meshca", ["meshca", "x"]])),
    claim("sub", st.just("system:serviceaccount:default:web")),
    claim("iat", st.just(TS - 10)),
    claim("exp", st.just(TS + 600)),
    claim(
        "kubernetes.io",
        st.fixed_dictionaries(
            {"namespace": st.just("default"), "serviceaccount": st.just({"name": "web"})}
        ),
    ),
)


@given(k8s_claims, st.sampled_from([{"kid": "k1"}, {}, {"kid": 7}, {"kid": "other"}]))
@example(
    {"iss": K8S_ISSUER, "aud": "meshca", "sub": "system:serviceaccount:default:web",
     "iat": TS, "exp": TS + 60, "kubernetes.io": {"namespace": "default",
                                                 "serviceaccount": {"name": "web"}}},
    {"kid": "k1"},
)  # fmt: skip
def test_signed_k8s_tokens_with_any_claims(claims, headers):
    token = sign(claims, K8S_KEY, headers)
    got = refused_or_accepted(K8S.verify, token, NOW)
    if got is not None:
        assert got == SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
        assert claims["iss"] == K8S_ISSUER and headers == {"kid": "k1"}


def test_the_signer_makes_tokens_the_verifiers_accept():
    """The fuzz tests above sign their tokens this way: a well-formed one passes both."""
    join = {
        "iss": JOIN.issuer,
        "aud": "meshca",
        "sub": "spiffe://cluster.local/ns/a/sa/b",
        "iat": TS,
        "exp": TS + 60,
        "jti": "j",
    }
    assert JOIN.verify(sign(join, CA_KEY, {}), NOW).jti == "j"
    k8s = {
        "iss": K8S_ISSUER,
        "aud": "meshca",
        "sub": "system:serviceaccount:default:web",
        "iat": TS,
        "exp": TS + 60,
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web"}},
    }
    got = asyncio.run(K8S.verify(sign(k8s, K8S_KEY, {"kid": "k1"}), NOW))
    assert str(got) == "spiffe://cluster.local/ns/default/sa/web"
