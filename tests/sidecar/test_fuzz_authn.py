"""The inbound JWT check under arbitrary input (hypothesis): any change to a valid token's
bytes is refused or yields the very same claims (a change that is only another spelling of
the same signed token), and tokens correctly signed by the trusted key but carrying any
header and claims are accepted only when every claim is what the issuer's rule requires.
A refusal is InvalidToken (or NeedKeys for an unknown kid), never another exception, and
its message never contains the token."""

from __future__ import annotations

import base64
import json

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshca.jwks import JwksSource, parse_jwks
from sidecar.policy.authn import Authenticator, InvalidToken, IssuerRule, NeedKeys

ISS = "https://issuer.test"
NOW = 1_800_000_000.0
KEY = ec.generate_private_key(ec.SECP256R1())


class Jwks(JwksSource):
    """One EC key, kid `k1`."""

    def __init__(self) -> None:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key()))
        self.keys = parse_jwks(json.dumps({"keys": [{**jwk, "kid": "k1"}]}).encode(), "JWKS")

    def get(self, kid):
        keys = self.keys
        if kid is None:
            return keys[0]
        return next((k for k in keys if k.kid == kid), None)


JWKS = Jwks()


def authenticator() -> Authenticator:
    return Authenticator([IssuerRule(ISS, ("api",), JWKS, leeway=30)], clock=lambda: NOW)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: object, claims: object) -> str:
    """A correctly ES256-signed JWS of any JSON (pyjwt's encode would refuse odd ones)."""
    si = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    r, s = decode_dss_signature(KEY.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
    return si + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


CLAIMS = {"iss": ISS, "aud": ["api"], "sub": "u1", "iat": int(NOW), "exp": int(NOW) + 600}
TOKEN = sign({"alg": "ES256", "kid": "k1", "typ": "JWT"}, CLAIMS)


def refused_or_claims(token: str) -> dict | None:
    """The verified claims, or None if refused the way a refusal must look."""
    try:
        return authenticator().verify(token).claims
    except NeedKeys:
        return None
    except InvalidToken as e:
        reason = str(e)
        assert len(token) < 12 or token not in reason
        for part in token.split("."):
            assert len(part) < 12 or part not in reason, reason
        return None


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
odd_chars = st.sampled_from(list(ALPHABET + ".=+/ \t\n\0") + ["\u00e9", "\u2028"])


@st.composite
def mutations(draw) -> str:
    """TOKEN with a few characters replaced, inserted or deleted, or cut short."""
    token = TOKEN
    for _ in range(draw(st.integers(1, 3))):
        if not token:
            break
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "flip-bit"]))
        i = draw(st.integers(0, len(token) - 1))
        if op == "replace":
            token = token[:i] + draw(odd_chars) + token[i + 1 :]
        elif op == "insert":
            token = token[:i] + draw(odd_chars) + token[i:]
        elif op == "delete":
            token = token[:i] + token[i + 1 :]
        elif op == "truncate":
            token = token[:i]
        elif token[i] in ALPHABET:  # the neighbouring value: the lowest bit changes
            token = token[:i] + ALPHABET[ALPHABET.index(token[i]) ^ 1] + token[i + 1 :]
    return token


@settings(max_examples=300, deadline=None)
@given(mutations())
@example(TOKEN + "==")  # whole padding: the same token (pyjwt takes it too)
@example(TOKEN[:-1] + ALPHABET[ALPHABET.index(TOKEN[-1]) ^ 1])  # an unused bit
@example(TOKEN.replace(".", "..", 1))
@example(TOKEN.split(".")[1] + "." + TOKEN.split(".")[0] + "." + TOKEN.split(".")[2])
def test_any_change_to_a_valid_token_is_refused_or_the_same(token):
    claims = refused_or_claims(token)
    assert claims is None or claims == CLAIMS
    if claims is not None:
        assert token.rstrip("=") == TOKEN  # the only other spelling: padding


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


def claim(name: str, good: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """The claim absent, well-formed, or any JSON value."""
    return st.one_of(
        st.just({}), good.map(lambda v: {name: v}), json_values.map(lambda v: {name: v})
    )


def merged(*parts: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


T = int(NOW)
any_claims = merged(
    claim("iss", st.sampled_from([ISS, ISS + "/"])),
    claim("aud", st.sampled_from(["api", ["x", "api"], "x", ["api", 1]])),
    claim("sub", st.just("u1")),
    claim("exp", st.sampled_from([T + 600, T - 29, T - 30, T + 0.5, float(T + 60)])),
    claim("nbf", st.sampled_from([T - 10, T + 30, T + 31])),
    claim("iat", st.sampled_from([T - 10, T + 30, T + 31])),
    claim("jti", st.just("j")),
)
any_header = merged(
    claim("alg", st.sampled_from(["ES256", "none", "HS256", "RS256", "ES384"])),
    claim("kid", st.sampled_from(["k1", "k2"])),
    claim("typ", st.just("JWT")),
    claim("crit", st.just(["exp"])),
    claim("b64", st.just(True)),
)


@settings(max_examples=300, deadline=None)
@given(any_header, any_claims)
@example({"alg": "ES256", "kid": "k1"}, CLAIMS)
@example({"alg": "ES256"}, {**CLAIMS, "aud": "api", "exp": T - 29})
def test_signed_tokens_with_any_header_and_claims(header, claims):
    got = refused_or_claims(sign(header, claims))
    if got is not None:  # accepted: only with every claim as the rule requires
        assert got == claims
        assert header["alg"] == "ES256" and header.get("kid", "k1") == "k1"
        assert "crit" not in header and header.get("b64", True) is True
        assert claims["iss"] == ISS
        aud = claims["aud"]
        assert aud == "api" or (isinstance(aud, list) and "api" in aud)
        assert all(isinstance(a, str) for a in ([aud] if isinstance(aud, str) else aud))
        for name in ("exp", "nbf", "iat"):
            assert name not in claims or type(claims[name]) in (int, float)
        assert NOW < claims["exp"] + 30
        assert claims.get("nbf", 0) <= NOW + 30 and claims.get("iat", 0) <= NOW + 30
        assert isinstance(claims.get("sub", ""), str) and isinstance(claims.get("jti", ""), str)


def test_the_token_the_fuzzers_start_from_is_valid():
    assert refused_or_claims(TOKEN) == CLAIMS
