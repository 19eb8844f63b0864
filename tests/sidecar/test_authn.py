"""JWT verification rules, without sockets: algorithms, HMAC only with a secret, cache."""

import base64
import hashlib
import hmac
import json
import os
import random
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshca.jwks import FileJwks, parse_jwks
from sidecar.policy import authn
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
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def test_find_token_sources(keys):
    a = make(keys)
    assert a.find_token([(b"Authorization", b"Bearer abc")]) == "abc"
    assert a.find_token([(b"authorization", b"bearer   abc ")]) == "abc"
    assert a.find_token([(b"Authorization", b"Basic dXNlcjpw")]) is None  # another scheme
    assert a.find_token([(b"X-Other", b"x")]) is None
    with pytest.raises(InvalidToken, match="more than one"):
        a.find_token([(b"Authorization", b"Bearer a"), (b"Authorization", b"Bearer b")])


def in_use(a: Authenticator, t: str):
    """Verify `t` as a caller that reuses its token does: the second verification caches it."""
    first = a.verify(t)
    assert not a.is_cached(t)
    ident = a.verify(t)
    assert a.is_cached(t) and ident is not first and ident.claims == first.claims
    return ident


def test_verify_and_cache_until_expiry(keys):
    now = [time.time()]
    a = make(keys, clock=lambda: now[0], leeway=0)
    t = token(keys[0])
    ident = in_use(a, t)
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
    in_use(a, t)
    other = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other.public_key()))
    jwk["kid"] = "k2"
    write_jwks(source, jwk)
    with pytest.raises(NeedKeys):
        a.verify(t)


def test_cached_token_stays_while_the_jwks_cannot_be_read(keys):
    key, source = keys
    a = make(keys)
    t = token(key)
    ident = in_use(a, t)
    source.path.write_text("not json")  # a bad document never replaces the last good one
    assert a.verify(t) is ident
    source.path.unlink()
    assert a.verify(t) is ident


# -- each check on the cold path, through the Authenticator -----------------------------------

N256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's order


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_of(public, kid: str) -> dict:
    if isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    return {**jwk, "kid": kid}


def write_jwks(source: FileJwks, *jwks: dict) -> None:
    """A new JWKS document, with an mtime of its own even within one clock tick (FileJwks
    reloads when the mtime changes; the fixture's source looks at every get)."""
    before = source.path.stat().st_mtime_ns
    source.path.write_text(json.dumps({"keys": list(jwks)}))
    after = max(source.path.stat().st_mtime_ns, before + 1)
    os.utime(source.path, ns=(after, after))


def signed_es(private, header: dict, claims: dict | str, digest=None, size: int = 32) -> str:
    """r||s over any header and claims, or claims as JSON text (pyjwt would refuse some)."""
    text = claims if isinstance(claims, str) else json.dumps(claims)
    si = b64(json.dumps(header).encode()) + "." + b64(text.encode())
    der = private.sign(si.encode(), ec.ECDSA(digest or hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return si + "." + b64(r.to_bytes(size, "big") + s.to_bytes(size, "big"))


def body(**claims):
    now = int(time.time())
    return {"iss": ISS, "aud": "api", "sub": "u1", "exp": now + 60, **claims}


def test_an_rs256_token_against_an_ec_key_is_refused(keys):
    """Alg confusion by key type: the token names RS256, its kid an EC key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a = make(keys, algorithms=("ES256", "RS256"))
    with pytest.raises(InvalidToken, match="does not match its signing key"):
        a.verify(token(rsa_key, alg="RS256"))
    write_jwks(keys[1], jwk_of(keys[0].public_key(), "k1"), jwk_of(rsa_key.public_key(), "r1"))
    with pytest.raises(InvalidToken, match="does not match its signing key"):
        a.verify(token(keys[0], kid="r1"))  # ES256, kid of the RSA key
    assert a.verify(token(rsa_key, alg="RS256", kid="r1")).claims["sub"] == "u1"


def test_a_key_that_names_its_alg_verifies_tokens_of_that_alg_only(keys):
    """RFC 7517 4.4: a JWKS key with `alg` RS256 is not used for a PS256 token (nor RS512),
    though it is an RSA key; the same key without `alg` is."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a = make(keys, algorithms=("RS256", "PS256", "RS512"))
    write_jwks(keys[1], jwk_of(rsa_key.public_key(), "r1") | {"alg": "RS256"})
    assert a.verify(token(rsa_key, alg="RS256", kid="r1")).claims["sub"] == "u1"
    for alg in ("PS256", "RS512"):
        with pytest.raises(InvalidToken, match="does not match its signing key"):
            a.verify(token(rsa_key, alg=alg, kid="r1"))
    write_jwks(keys[1], jwk_of(rsa_key.public_key(), "r1"))
    assert a.verify(token(rsa_key, alg="PS256", kid="r1")).claims["sub"] == "u1"


def test_hs256_with_the_public_key_as_secret_is_refused(keys):
    """Even an issuer configured for HS256 whose 'secret' is a public key: pyjwt's test of
    a secret (PEM, SSH, DER keys are not secrets) still holds on the new path."""
    pem = (
        keys[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    si = header + "." + b64(json.dumps(body()).encode())
    forged = si + "." + b64(hmac.new(pem.strip(), si.encode(), hashlib.sha256).digest())
    with pytest.raises(InvalidToken, match="HS256 is not accepted"):
        make(keys).verify(forged)
    a = make(keys, algorithms=("ES256", "HS256"), hmac_secret=pem.strip())
    with pytest.raises(InvalidToken, match="does not match its signing key"):
        a.verify(forged)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_none_in_any_case_with_or_without_a_signature(keys, alg):
    a = make(keys, algorithms=("ES256", alg))
    head = b64(json.dumps({"alg": alg, "kid": "k1"}).encode())
    for sig in ("", b64(b"x" * 64)):
        with pytest.raises(InvalidToken, match="'none' is not accepted"):
            a.verify(f"{head}.{b64(json.dumps(body()).encode())}.{sig}")


def test_an_es256_token_from_a_key_on_another_curve_is_refused(keys):
    other = ec.generate_private_key(ec.SECP384R1())
    write_jwks(keys[1], jwk_of(other.public_key(), "k1"))
    t = signed_es(other, {"alg": "ES256", "kid": "k1"}, body(), hashes.SHA256(), 48)
    a = make(keys)
    assert keys[1].get("k1").key.curve.name == "secp384r1"  # the JWKS took the key
    with pytest.raises(InvalidToken, match="does not match its signing key"):
        a.verify(t)


@pytest.mark.parametrize("alg", [None, "ES256K", "ES256"])
def test_a_secp256k1_key_is_not_taken_from_a_jwks(alg):
    """256 bits too, another curve: no algorithm this verifier has uses it, so a document
    with it is read without it, whatever `alg` it names."""
    pub = ec.generate_private_key(ec.SECP256K1()).public_key()
    jwk = jwk_of(pub, "k1") | ({"alg": alg} if alg else {})
    with pytest.raises(ValueError, match="key 0: its (EC curve|alg)"):
        parse_jwks(json.dumps({"keys": [jwk]}).encode(), "the JWKS")


@pytest.mark.parametrize(
    "sig",
    [
        lambda r, s: r.to_bytes(32, "big") + s.to_bytes(32, "big")[:-1],  # 63 bytes
        lambda r, s: r.to_bytes(33, "big") + s.to_bytes(32, "big"),  # 65
        lambda r, s: r.to_bytes(32, "big") + s.to_bytes(33, "big"),  # 65, the same r and s
        lambda r, s: r.to_bytes(32, "big") + s.to_bytes(32, "big") + b"\0" * 64,  # 128
        lambda r, s: encode_dss_signature(r, s),  # DER, not JOSE's r||s
        lambda r, s: bytes(32) + s.to_bytes(32, "big"),  # r = 0
        lambda r, s: r.to_bytes(32, "big") + bytes(32),  # s = 0
        lambda r, s: bytes(64),
        lambda r, s: r.to_bytes(32, "big") + N256.to_bytes(32, "big"),  # s = n
    ],
    ids=["63", "65", "65-same-values", "128", "der", "r=0", "s=0", "zeros", "s=n"],
)
def test_a_bad_signature_encoding_is_refused(keys, sig):
    good = token(keys[0])
    raw = base64.urlsafe_b64decode(good.rsplit(".", 1)[1] + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    bad = good.rsplit(".", 1)[0] + "." + b64(sig(r, s))
    with pytest.raises(InvalidToken, match="signature does not verify"):
        make(keys).verify(bad)


def test_a_high_s_signature_is_the_same_token(keys):
    """(r, n - s) is ECDSA's other spelling of a signature: accepted, the same claims."""
    good = token(keys[0])
    raw = base64.urlsafe_b64decode(good.rsplit(".", 1)[1] + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    high = (
        good.rsplit(".", 1)[0] + "." + b64(r.to_bytes(32, "big") + (N256 - s).to_bytes(32, "big"))
    )
    a = make(keys)
    assert a.verify(high).claims == a.verify(good).claims


def test_non_canonical_base64_in_the_signature_is_refused(keys):
    good = token(keys[0])
    head, sig = good.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bent = sig[:-1] + alphabet[alphabet.index(sig[-1]) | 1]  # an unused bit set: same bytes
    assert base64.urlsafe_b64decode(bent + "==") == base64.urlsafe_b64decode(sig + "==")
    a = make(keys)
    with pytest.raises(InvalidToken, match="malformed"):
        a.verify(f"{head}.{bent}")
    for other in (sig.replace("-", "+").replace("_", "/"), sig + "=", sig[:10] + " " + sig[10:]):
        if other != sig:
            with pytest.raises(InvalidToken, match="malformed"):
                a.verify(f"{head}.{other}")
    assert a.verify(f"{head}.{sig}==").claims["sub"] == "u1"  # whole padding: as pyjwt


@pytest.mark.parametrize("extra", [{"crit": ["exp"], "exp": 1}, {"crit": ["b64"], "b64": True}])
def test_a_header_with_crit_is_refused(keys, extra):
    t = signed_es(keys[0], {"alg": "ES256", "kid": "k1", **extra}, body())
    with pytest.raises(InvalidToken, match="extension"):
        make(keys).verify(t)


def test_kid_lookup(keys):
    key, source = keys
    a = make(keys)
    assert a.verify(token(key, kid=None)).claims["sub"] == "u1"  # no kid, one key: that one
    other = ec.generate_private_key(ec.SECP256R1())
    write_jwks(source, jwk_of(key.public_key(), "k1"), jwk_of(other.public_key(), "k2"))
    with pytest.raises(NeedKeys):
        a.verify(token(key, kid=None, jti="x"))  # no kid, two keys: which?
    with pytest.raises(NeedKeys) as e:
        a.verify(token(key, kid="k3"))
    assert e.value.source is source  # refresh that one, then try once more
    assert a.verify(token(other, kid="k2")).claims["sub"] == "u1"
    with pytest.raises(InvalidToken, match="signature does not verify"):
        a.verify(token(other, kid="k1"))  # signed by k2, says k1
    t = signed_es(key, {"alg": "ES256", "kid": 1}, body())
    with pytest.raises(InvalidToken, match="malformed"):
        a.verify(t)


LEEWAY_CASES = [
    # (claims relative to now, seconds the clock moves, refusal or None); leeway 30
    ({"exp": 10}, 39, None),
    ({"exp": 10}, 40, "expired"),
    ({"nbf": 30}, 0, None),
    ({"nbf": 31}, 0, "not valid yet"),
    ({"nbf": 100}, 70, None),
    ({"iat": 31}, 0, "not valid yet"),
    ({"iat": -3600}, 0, None),
]


@pytest.mark.parametrize(("times", "move", "refusal"), LEEWAY_CASES)
def test_times_with_leeway(keys, times, move, refusal):
    start = time.time()
    now = [start]
    a = make(keys, clock=lambda: now[0], leeway=30)
    claims = body(**{k: int(start) + v for k, v in times.items()})
    claims.setdefault("exp", int(start) + 600)
    t = jwt.encode(claims, keys[0], algorithm="ES256", headers={"kid": "k1"})
    now[0] += move
    if refusal is None:
        assert a.verify(t).claims == claims
    else:
        with pytest.raises(InvalidToken, match=refusal):
            a.verify(t)


@pytest.mark.parametrize(
    ("claims", "refusal"),
    [
        ({"aud": "other"}, "audience is not accepted"),
        ({"aud": ["other", "api"]}, None),
        ({"aud": ["api", 1]}, "audience is not accepted"),
        ({"aud": None}, "lacks the 'aud'"),
        ({"iss": "https://evil.test"}, "issuer is not trusted"),
        ({"iss": None}, "issuer is not trusted"),
        ({"exp": None}, "lacks the 'exp'"),
        ({"exp": "9999999999"}, "not numbers"),
        ({"exp": float("inf")}, "malformed"),  # json.dumps writes Infinity: not JSON
        ({"exp": "1e400"}, "not numbers"),  # the text 1e400 parses to inf: see below
        ({"sub": 7}, "malformed"),
    ],
)
def test_issuer_and_audience(keys, claims, refusal):
    t = signed_es(keys[0], {"alg": "ES256", "kid": "k1"}, body(**claims))
    a = make(keys)
    if refusal is None:
        assert a.verify(t).claims["aud"] == claims["aud"]
    else:
        with pytest.raises(InvalidToken, match=refusal):
            a.verify(t)


def test_a_time_past_a_floats_range_is_refused(keys):
    text = json.dumps(body()).replace(str(body()["exp"]), "1e400")  # parses to inf
    assert "1e400" in text
    with pytest.raises(InvalidToken, match="not numbers"):
        make(keys).verify(signed_es(keys[0], {"alg": "ES256", "kid": "k1"}, text))


def test_a_token_over_the_size_limit_is_refused(keys):
    a = Authenticator([IssuerRule(ISS, ("api",), keys[1])], max_token_bytes=600)
    small = token(keys[0])
    big = token(keys[0], pad="x" * 600)
    assert a.verify(small)
    for call in (lambda: a.find_token([(b"authorization", b"Bearer " + big.encode())]),
                 lambda: a.verify(big)):  # fmt: skip
        with pytest.raises(InvalidToken, match="larger than 600 bytes"):
            call()


def test_a_cached_token_is_verified_again_when_its_kid_names_another_key(keys):
    """The kid stays, the key under it changes (a re-keyed issuer): the cached token is
    verified again with the key now served, and that refuses it."""
    key, source = keys
    a = make(keys)
    t = token(key)
    first = in_use(a, t)
    assert a.verify(t) is first  # a hit while the key set is the same
    other = ec.generate_private_key(ec.SECP256R1())
    write_jwks(source, jwk_of(other.public_key(), "k1"))
    with pytest.raises(InvalidToken, match="signature does not verify"):
        a.verify(t)
    assert t not in a._cache


def test_a_key_that_left_takes_its_tokens_and_only_those(keys):
    key, source = keys
    other = ec.generate_private_key(ec.SECP256R1())
    write_jwks(source, jwk_of(key.public_key(), "k1"), jwk_of(other.public_key(), "k2"))
    a = make(keys)
    t1, t2 = token(key), token(other, kid="k2")
    in_use(a, t1)
    ident2 = in_use(a, t2)
    write_jwks(source, jwk_of(other.public_key(), "k2"))  # k1 leaves
    with pytest.raises(NeedKeys):
        a.verify(t1)
    again = a.verify(t2)  # verified once more (a new key set), with the same result
    assert again.claims == ident2.claims and a.verify(t2) is again


def test_the_cache_keeps_at_most_cache_size_tokens_the_oldest_go_first(keys, monkeypatch):
    """Distinct tokens past the bound push the oldest out: it is verified again (a new
    identity, the same claims); the newest are still hits."""
    monkeypatch.setattr(authn, "CACHE_SIZE", 4)
    a = make(keys)
    tokens = [token(keys[0], jti=f"t{i}") for i in range(6)]
    first = [in_use(a, t) for t in tokens]
    assert len(a._cache) == 4
    assert all(a.verify(t) is ident for t, ident in zip(tokens[2:], first[2:], strict=True))
    again = a.verify(tokens[0])
    assert again is not first[0] and again.claims == first[0].claims
    assert len(a._cache) == 4


@pytest.mark.parametrize(
    "extra",
    [{}, {"aud": ["api", "other"]}, {"aud": "api", "roles": ["a"], "nested": {"iss": "x"}}],
)
def test_a_cached_identity_has_the_tokens_claims(keys, extra):
    """What policy and the claims header see, from a miss and from a hit: the token's
    own claims, all of them, equal to what it carries."""
    a = make(keys)
    t = token(keys[0], **extra)
    carried = json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "=="))
    assert a.verify(t).claims == carried
    assert a.verify(t).claims == carried  # (verified again, now cached)
    assert a.is_cached(t) and a.verify(t).claims == carried  # (a hit)


# -- admission: a token is cached the second time it verifies ---------------------------------


def test_a_token_enters_the_cache_the_second_time_it_verifies(keys):
    a = make(keys)
    t = token(keys[0])
    once = a.verify(t)
    assert not a.is_cached(t) and len(a._cache) == 0
    twice = a.verify(t)  # verified again (a new identity), and kept
    assert twice is not once and twice.claims == once.claims and a.is_cached(t)
    assert a.verify(t) is twice


def test_tokens_used_once_do_not_push_out_the_tokens_in_use(keys, monkeypatch):
    """A stream of distinct tokens, each used once (a new token per request), many times the
    cache's size: the tokens callers reuse stay cached, and the cache does not grow."""
    monkeypatch.setattr(authn, "CACHE_SIZE", 4)
    monkeypatch.setattr(authn, "SEEN_SIZE", 8)
    a = make(keys)
    reused = [token(keys[0], jti=f"in-use-{i}") for i in range(4)]
    kept = [in_use(a, t) for t in reused]
    for i in range(40):
        one_shot = token(keys[0], jti=f"once-{i}")
        assert a.verify(one_shot).claims["jti"] == f"once-{i}"
        assert not a.is_cached(one_shot)
    assert list(a._cache) == reused
    assert all(a.verify(t) is ident for t, ident in zip(reused, kept, strict=True))
    assert a._seen.nbytes == 128  # its filters' size: fixed, whatever was seen


def test_a_token_is_remembered_for_two_generations_of_tokens_seen_once(keys, monkeypatch):
    """The first token of a generation, seen once, then SEEN_SIZE other tokens seen once:
    the second use still caches it (the previous generation remembers it). Seen once,
    then two generations' worth: it is verified and remembered anew, as a token seen for
    the first time."""
    monkeypatch.setattr(authn, "SEEN_SIZE", 4)
    a = make(keys)
    others = iter(token(keys[0], jti=f"other-{i}") for i in range(100))
    t = token(keys[0], jti="late")
    a.verify(t)
    for _ in range(4):
        a.verify(next(others))
    a.verify(t)
    assert a.is_cached(t)

    u = token(keys[0], jti="later")
    a.verify(u)
    for _ in range(8):
        a.verify(next(others))
    a.verify(u)
    assert not a.is_cached(u)  # forgotten: this was its first verification again
    a.verify(u)
    assert a.is_cached(u)


def test_the_doorkeeper_is_small_and_its_false_positives_few():
    """A flood of hashes seen once: the two filters stay 8 KiB each, and of hashes never
    added, about 0.5 % read as seen (the estimate for two generations, 16 bits and 4 probes
    per addition). Seeded: the same hashes every run."""
    rng = random.Random(16)
    d = authn.Doorkeeper(4096)
    assert d.nbytes == 8192
    added = [rng.getrandbits(64) - (1 << 63) for _ in range(3 * 4096 + 100)]
    first_false = sum(d.seen_again(h) for h in added[:4096])  # read as seen, wrongly
    assert first_false < 0.01 * 4096, first_false
    for h in added[4096:]:
        d.seen_again(h)
    # the last 4,096 are remembered, but for one whose addition was a false positive against
    # a generation since dropped (no false negatives otherwise: a Bloom filter's)
    assert sum(h in d for h in added[-4096:]) > 0.99 * 4096
    never = [rng.getrandbits(64) - (1 << 63) for _ in range(20_000)]
    false = sum(h in d for h in never)
    assert 0 < false < 0.01 * len(never), false
    assert d.nbytes == 8192 and len(d._current) == len(d._previous) == 8192


@pytest.mark.parametrize("failure", ["unknown kid", "expired"])
def test_a_token_that_failed_to_verify_was_not_seen(keys, failure):
    """Only a verification that succeeded counts towards admission: a token refused (its key
    not yet in the JWKS, or expired and then the clock moved back: the test's clock) and
    then verified is not cached by that verification."""
    key, source = keys
    now = [time.time()]
    a = make(keys, clock=lambda: now[0], leeway=0)
    if failure == "unknown kid":
        t = token(key, kid="k2")
        with pytest.raises(NeedKeys):
            a.verify(t)
        write_jwks(source, jwk_of(key.public_key(), "k1"), jwk_of(key.public_key(), "k2"))
    else:
        t = token(key)
        now[0] += 120
        with pytest.raises(InvalidToken, match="expired"):
            a.verify(t)
        now[0] -= 120
    a.verify(t)
    assert not a.is_cached(t)
    a.verify(t)
    assert a.is_cached(t)


def test_a_cached_token_verified_again_for_a_new_key_set_stays_cached(keys, monkeypatch):
    """A token in the cache whose issuer's key set was reloaded (new key objects, the same
    key) is verified again and stays cached, however long ago it was first seen: it is in
    use, the admission rule is not asked again."""
    monkeypatch.setattr(authn, "SEEN_SIZE", 2)
    key, source = keys
    a = make(keys)
    t = token(key)
    ident = in_use(a, t)
    for i in range(4):  # two generations: t's hash is forgotten
        a.verify(token(key, jti=f"other-{i}"))
    assert hash(t) not in a._seen
    # the same key in a new document (a member more): new key objects
    write_jwks(source, jwk_of(key.public_key(), "k1") | {"use": "sig"})
    again = a.verify(t)
    assert again is not ident and again.claims == ident.claims
    assert a.is_cached(t) and a.verify(t) is again


def test_a_cached_token_stays_verified_when_the_same_document_is_read_again(keys, monkeypatch):
    """A JWKS file rewritten with the same bytes (a new mtime; a URL source refreshing to the
    same document is alike): the key objects stay, and a cached token is not verified again."""
    key, source = keys
    a = make(keys)
    t = token(key)
    first = in_use(a, t)
    before = source.get("k1")
    write_jwks(source, jwk_of(key.public_key(), "k1") | {"use": "sig"})
    ident = a.verify(t)  # a new document: new key objects, the token verified again
    held = source.get("k1")
    assert held is not before and ident is not first and a.is_cached(t)
    calls = []
    real = authn.jwtcore.verify_signature
    monkeypatch.setattr(
        authn.jwtcore, "verify_signature", lambda *args: calls.append(1) or real(*args)
    )
    body = source.path.read_bytes()
    for _ in range(3):
        source.path.write_bytes(body)
        mtime = source.path.stat().st_mtime_ns + 1_000_000
        os.utime(source.path, ns=(mtime, mtime))
        assert source.get("k1") is held
        assert a.verify(t) is ident
    assert calls == []
