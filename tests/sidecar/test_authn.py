"""JWT verification rules, without sockets: algorithms, HMAC only with a secret, cache."""

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.jwks import FileJwks
from sidecar.policy.authn import Authenticator, InvalidToken, IssuerRule, NeedKeys

ISS = "https://issuer.test"


@pytest.fixture
def keys(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, FileJwks(path, check_every=0)


def make(keys, clock=time.time, **rule):
    return Authenticator([IssuerRule(ISS, ("api",), keys[1], **rule)], clock=clock)


def token(key, alg="ES256", kid="k1", **claims):
    now = int(time.time())
    body = {"iss": ISS, "aud": "api", "sub": "u1", "exp": now + 60, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def test_find_token_sources(keys):
    a = make(keys)
    assert a.find_token([(b"Authorization", b"Bearer abc")]) == "abc"
    assert a.find_token([(b"authorization", b"bearer   abc ")]) == "abc"
    assert a.find_token([(b"Authorization", b"Basic dXNlcjpw")]) is None  # another scheme
    assert a.find_token([(b"X-Other", b"x")]) is None
    with pytest.raises(InvalidToken, match="more than one"):
        a.find_token([(b"Authorization", b"Bearer a"), (b"Authorization", b"Bearer b")])


def test_verify_and_cache_until_expiry(keys):
    now = [time.time()]
    a = make(keys, clock=lambda: now[0], leeway=0)
    t = token(keys[0])
    ident = a.verify(t)
    assert ident.request_principal == f"{ISS}/u1"
    assert a.verify(t) is ident  # cached
    now[0] += 120
    with pytest.raises(InvalidToken, match="expired"):
        a.verify(t)


def test_unknown_kid_asks_for_keys(keys):
    with pytest.raises(NeedKeys):
        make(keys).verify(token(keys[0], kid="k2"))


def test_hmac_only_with_a_configured_secret(keys):
    secret = b"s" * 32
    t = token(secret, alg="HS256")
    with pytest.raises(InvalidToken, match="HS256 is not accepted"):
        make(keys).verify(t)
    a = make(keys, algorithms=("HS256",), hmac_secret=secret)
    assert a.verify(t).claims["sub"] == "u1"
    with pytest.raises(InvalidToken, match="signature"):
        a.verify(token(b"x" * 32, alg="HS256"))


def test_none_is_never_accepted_even_if_listed(keys):
    a = make(keys, algorithms=("ES256", "none"))
    t = jwt.encode({"iss": ISS, "aud": "api", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(InvalidToken, match="'none'"):
        a.verify(t)


def test_cached_token_goes_when_its_key_leaves_the_jwks(keys, tmp_path):
    """A token cached as verified is verified again once its key set changes; a key that
    left the set (a successful reload without it) takes the token with it."""
    key, source = keys
    a = make(keys)
    t = token(key)
    a.verify(t)
    other = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other.public_key()))
    jwk["kid"] = "k2"
    source.path.write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(NeedKeys):
        a.verify(t)


def test_cached_token_stays_while_the_jwks_cannot_be_read(keys):
    key, source = keys
    a = make(keys)
    t = token(key)
    ident = a.verify(t)
    source.path.write_text("not json")  # a bad document never replaces the last good one
    assert a.verify(t) is ident
    source.path.unlink()
    assert a.verify(t) is ident
