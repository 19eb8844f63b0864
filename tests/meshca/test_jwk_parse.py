"""Reading JWKS documents (meshca.jwks.parse_jwks, parse_jwk): which keys a verifier takes.

Every key kind a token can be verified with is read to the same public key pyjwt reads
(pyjwt as the oracle; the project no longer uses it for this), from documents shaped like
those real issuers serve. A key that cannot verify a token of ours, or must not, is left
out with its reason: private or secret members, an encryption key, an `alg` its key
cannot do, a curve or a size this verifier does not use, a point off its curve, members
that are not base64url. A document without any usable key is refused, naming why, and
no reason quotes a key's material. A key that names its `alg` is used for that one only.
"""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.jwks import Jwk, index, parse_jwk, parse_jwks


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def doc(*keys: object) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


EC_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def private_keys() -> dict[str, object]:
    keys: dict[str, object] = {crv: ec.generate_private_key(c()) for crv, c in EC_CURVES.items()}
    keys["RSA-2048"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys["RSA-3072"] = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    keys["Ed25519"] = ed25519.Ed25519PrivateKey.generate()
    keys["Ed448"] = ed448.Ed448PrivateKey.generate()
    return keys


KEYS = private_keys()


def public_jwk(private: object) -> dict:
    """The JWK pyjwt writes for the public half."""
    public = private.public_key()  # type: ignore[attr-defined]
    if isinstance(public, ec.EllipticCurvePublicKey):
        return json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    if isinstance(public, rsa.RSAPublicKey):
        return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    return json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))


def raw_public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("name", list(KEYS))
def test_each_kind_reads_to_the_key_pyjwt_reads(name):
    jwk = public_jwk(KEYS[name]) | {"kid": "k1"}
    (got,) = parse_jwks(doc(jwk), "the JWKS")
    theirs = jwt.PyJWK(jwk, "EdDSA" if name == "Ed448" else None).key
    assert raw_public(got.key) == raw_public(theirs) == raw_public(KEYS[name].public_key())
    assert (got.kid, got.key_type, got.alg) == ("k1", jwk["kty"], None)


def test_a_document_shaped_like_the_kubernetes_api_servers():
    """`use`, `alg` and `kid` as the API server's /openid/v1/jwks writes them."""
    rsa_key, ec_key = KEYS["RSA-2048"], KEYS["P-256"]
    served = [
        public_jwk(rsa_key) | {"use": "sig", "alg": "RS256", "kid": "a" * 43},
        public_jwk(ec_key) | {"use": "sig", "alg": "ES256", "kid": "b" * 43},
    ]
    keys = index(parse_jwks(doc(*served), "the JWKS"))
    assert raw_public(keys["a" * 43].key) == raw_public(rsa_key.public_key())
    assert keys["b" * 43].alg == "ES256" and None not in keys  # two keys: none without kid


def test_a_key_verifies_what_its_private_half_signed():
    data = b"header.claims"
    rsa_key = KEYS["RSA-2048"]
    (got,) = parse_jwks(doc(public_jwk(rsa_key)), "x")
    got.key.verify(
        rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
        data,
        padding.PKCS1v15(),
        hashes.SHA256(),
    )  # raises if it is not the key
    ed = KEYS["Ed25519"]
    (got,) = parse_jwks(doc(public_jwk(ed)), "x")
    got.key.verify(ed.sign(data), data)


def _p256() -> dict:
    return public_jwk(KEYS["P-256"])


def _rsa() -> dict:
    return public_jwk(KEYS["RSA-2048"])


def _ed() -> dict:
    return public_jwk(KEYS["Ed25519"])


def _off_curve() -> dict:
    jwk = _p256()
    y = bytearray(base64.urlsafe_b64decode(jwk["y"] + "=="))
    y[-1] ^= 1
    return jwk | {"y": b64(bytes(y))}


def _small_rsa() -> dict:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return public_jwk(small)


# Keys that are left out, and the reason each gets (a part of it).
REFUSED = {
    "EC with its private d": (lambda: _p256() | {"d": b64(b"\1" * 32)}, "private or secret"),
    "RSA with private members": (lambda: _rsa() | {"d": "AQ", "p": "AQ"}, "(d, p)"),
    "OKP with its private d": (lambda: _ed() | {"d": b64(b"\2" * 32)}, "private or secret"),
    "a symmetric key": (lambda: {"kty": "oct", "k": b64(b"s" * 32)}, "private or secret"),
    "oct without k": (lambda: {"kty": "oct"}, "symmetric key"),
    "an encryption key": (lambda: _rsa() | {"use": "enc"}, "use is 'enc'"),
    "use not a string": (lambda: _rsa() | {"use": ["sig"]}, "not 'sig'"),
    "RS256 on an EC key": (lambda: _p256() | {"alg": "RS256"}, "alg 'RS256'"),
    "ES384 on a P-256 key": (lambda: _p256() | {"alg": "ES384"}, "not for curve P-256"),
    "EdDSA on an RSA key": (lambda: _rsa() | {"alg": "EdDSA"}, "alg 'EdDSA'"),
    "HS256 on an RSA key": (lambda: _rsa() | {"alg": "HS256"}, "alg 'HS256'"),
    "alg none": (lambda: _p256() | {"alg": "none"}, "alg 'none'"),
    "alg not a string": (lambda: _p256() | {"alg": 256}, "alg 256"),
    "secp256k1": (lambda: _p256() | {"crv": "secp256k1"}, "curve 'secp256k1'"),
    "no curve": (lambda: {k: v for k, v in _p256().items() if k != "crv"}, "curve None"),
    "short coordinates": (lambda: _p256() | {"x": b64(b"\1" * 31)}, "not 32 bytes"),
    "a point off its curve": (_off_curve, "not on P-256"),
    "x missing": (lambda: {k: v for k, v in _p256().items() if k != "x"}, "'x' is missing"),
    "x a number": (lambda: _p256() | {"x": 12}, "'x' is missing or not a string"),
    "x with a space": (
        lambda: _p256() | {"x": _p256()["x"][:20] + " " + _p256()["x"][20:]},
        "'x' is not base64url",
    ),
    "x with junk": (lambda: _p256() | {"x": "!" + _p256()["x"][1:]}, "'x' is not base64url"),
    "x not ASCII": (lambda: _p256() | {"x": "é" * 43}, "'x' is not base64url"),
    "x with a padding inside": (lambda: _p256() | {"x": "AA=A" + _p256()["x"][4:]}, "base64url"),
    "key_ops without verify": (lambda: _rsa() | {"key_ops": ["encrypt"]}, "key_ops ['encrypt']"),
    "key_ops not a list": (lambda: _rsa() | {"key_ops": "verify"}, "do not include 'verify'"),
    "RSA of 1024 bits": (_small_rsa, "1024 bits, fewer than 2048"),
    "RSA with an even exponent": (lambda: _rsa() | {"e": b64(b"\2")}, "not an RSA public"),
    "RSA without n": (lambda: {k: v for k, v in _rsa().items() if k != "n"}, "'n' is missing"),
    "OKP on X25519": (lambda: _ed() | {"crv": "X25519"}, "'X25519' is not Ed25519"),
    "Ed25519 of 31 bytes": (lambda: _ed() | {"x": b64(b"\1" * 31)}, "not 32 bytes"),
    "no kty": (lambda: {k: v for k, v in _p256().items() if k != "kty"}, "kty None"),
    "kty a list": (lambda: _p256() | {"kty": ["EC"]}, "kty ['EC']"),
    "not an object": (lambda: ["kty", "EC"], "not a JSON object"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_unusable_key_is_left_out_with_its_reason(case):
    make, reason = REFUSED[case]
    bad = make()
    with pytest.raises(ValueError) as e:
        parse_jwk(bad)
    assert reason in str(e.value)
    with pytest.raises(ValueError) as e:  # alone in a document: the document is refused
        parse_jwks(doc(bad), "https://idp.test/jwks")
    assert str(e.value).startswith("https://idp.test/jwks is not a usable JWKS: no usable key")
    assert reason in str(e.value)
    good = _p256() | {"kid": "good"}  # beside a usable key: that one is read, this left out
    assert [k.kid for k in parse_jwks(doc(bad, good), "x")] == ["good"]


def test_no_reason_quotes_a_keys_material():
    secret = b64(b"super-secret-private-scalar-0123")
    cases = [_p256() | {"d": secret}, {"kty": "oct", "k": secret}, _rsa() | {"d": secret}]
    with pytest.raises(ValueError) as e:
        parse_jwks(doc(*cases), "the JWKS")
    assert secret not in str(e.value)
    assert _p256()["x"] not in str(e.value) and _rsa()["n"][:20] not in str(e.value)


def test_a_long_value_is_cut_short_in_the_reason():
    with pytest.raises(ValueError) as e:
        parse_jwks(doc(_p256() | {"crv": "C" * 100_000}), "the JWKS")
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[]", "no 'keys' list"),
        (b'{"keys": {}}', "no 'keys' list"),
        (b'{"keys": []}', "an empty one"),
        (b'{"keys": "EC"}', "no 'keys' list"),
        (b'{"other": 1}', "no 'keys' list"),
    ],
)
def test_what_is_not_a_jwks_is_refused_naming_where(body, why):
    with pytest.raises(ValueError, match=f"^where is not a usable JWKS: .*{why}"):
        parse_jwks(body, "where")


def test_the_reason_names_the_first_few_keys():
    with pytest.raises(ValueError) as e:
        parse_jwks(doc(*[{"kty": "oct"}] * 5), "the JWKS")
    assert "key 2:" in str(e.value) and "key 3:" not in str(e.value)
    assert str(e.value).endswith("; ...)")


def test_a_key_that_names_its_alg_fits_that_alg_only():
    (rs256,) = parse_jwks(doc(_rsa() | {"alg": "RS256"}), "x")
    (bare,) = parse_jwks(doc(_rsa()), "x")
    assert rs256.fits("RS256") and not rs256.fits("PS256") and not rs256.fits("RS512")
    assert bare.fits("RS256") and bare.fits("PS256") and bare.fits("RS512")
    assert not bare.fits("ES256") and not bare.fits("HS256")


def test_a_kid_that_is_not_a_string_is_no_kid():
    (got,) = parse_jwks(doc(_p256() | {"kid": 7}), "x")
    assert got.kid is None
    assert isinstance(got, Jwk)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MEMBERS = st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg", "use", "kid", "d", "k"])


VALUES = JSON | st.sampled_from(["EC", "RSA", "OKP", "P-256", "Ed25519", "AQAB", "ES256", "sig"])


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["EC", "RSA", "OKP", "oct"]) | JSON,
    st.dictionaries(MEMBERS, VALUES, max_size=8),
)
def test_any_json_member_values_give_a_key_or_a_value_error(kty, members):
    try:
        got = parse_jwk({**members, "kty": kty})
    except ValueError:
        return
    assert got.key_type in ("EC", "RSA", "OKP")  # (only with base64url members)


def test_members_of_any_json_type_are_refused_by_name():
    """What the property found: an unhashable curve name, looked up in a table."""
    for kty, crv in (("EC", [1]), ("OKP", {}), ("EC", 1.5)):
        with pytest.raises(ValueError, match="curve"):
            parse_jwk({"kty": kty, "crv": crv})


# -- Edwards keys of small order: with one, anyone can sign -----------------------------------

P25519 = 2**255 - 19
D25519 = -121665 * pow(121666, -1, P25519) % P25519


def _ed_point(enc: bytes) -> tuple[int, int]:
    """RFC 8032 5.1.3 decoding (the test's own), of a point on the curve."""
    y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
    u, v = (y * y - 1) % P25519, (D25519 * y * y + 1) % P25519
    x = u * pow(v, 3, P25519) * pow(u * pow(v, 7, P25519), (P25519 - 5) // 8, P25519) % P25519
    if v * x * x % P25519 == (-u) % P25519:
        x = x * pow(2, (P25519 - 1) // 4, P25519) % P25519
    assert v * x * x % P25519 == u % P25519, "not on the curve"
    if x & 1 != enc[31] >> 7:
        x = (-x) % P25519
    return x, y


def _ed_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D25519 * x1 * x2 * y1 * y2 % P25519
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, -1, P25519) % P25519
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, P25519) % P25519
    return x3, y3


SMALL_Y = [
    0,
    1,
    P25519 - 1,
    int.from_bytes(
        bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little"
    ),
]
SMALL_Y.append(P25519 - SMALL_Y[3])


def _enc(y: int, sign: int) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


@pytest.mark.parametrize("y", SMALL_Y)
@pytest.mark.parametrize("sign", [0, 1])
def test_an_ed25519_key_of_small_order_is_refused(y, sign):
    """Each such point has order 1, 2, 4 or 8 (checked here by adding it to itself), a
    signature of R = the identity and S = 0 verifies with it for some message (the
    forgery), and the JWKS does not take it."""
    enc = _enc(y, sign)
    point = _ed_point(enc)
    if not (point[0] == 0 and sign == 1):  # x = 0 with the sign bit: "-0", no spelling
        acc, order = point, 1
        while acc != (0, 1):
            acc, order = _ed_add(acc, point), order + 1
        assert order in (1, 2, 4, 8)
        public = ed25519.Ed25519PublicKey.from_public_bytes(enc)
        forged = _enc(1, 0) + bytes(32)  # R = (0, 1), S = 0
        assert any(_verifies(public, forged, b"claims-%d" % i) for i in range(64))
    with pytest.raises(ValueError, match="of small order, or not canonical"):
        parse_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64(enc)})


def _verifies(public: ed25519.Ed25519PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        public.verify(sig, data)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("y", [P25519, P25519 + 1, 2**255 - 1])
def test_an_ed25519_key_spelled_with_y_of_p_or_more_is_refused(y):
    with pytest.raises(ValueError, match="of small order, or not canonical"):
        parse_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64(_enc(y, 0))})


def test_ed448_keys_of_small_order_or_not_canonical_are_refused():
    p448 = 2**448 - 2**224 - 1
    for y in (0, 1, p448 - 1, p448):
        for last in (0x00, 0x80):
            enc = y.to_bytes(56, "little") + bytes((last,))
            with pytest.raises(ValueError, match="of small order, or not canonical"):
                parse_jwk({"kty": "OKP", "crv": "Ed448", "x": b64(enc)})
    good = public_jwk(KEYS["Ed448"])
    raw = bytearray(base64.urlsafe_b64decode(good["x"] + "=="))
    raw[-1] |= 0x01  # a bit the last octet must not have
    with pytest.raises(ValueError, match="of small order, or not canonical"):
        parse_jwk(good | {"x": b64(bytes(raw))})


def test_real_edwards_keys_are_all_taken():
    for _ in range(200):
        parse_jwk(public_jwk(ed25519.Ed25519PrivateKey.generate()))
    for _ in range(20):
        parse_jwk(public_jwk(ed448.Ed448PrivateKey.generate()) | {"alg": "EdDSA"})


# -- what a few issuers write, read as pyjwt read it ------------------------------------------


def _std_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def test_members_in_base64s_own_alphabet_or_with_unused_bits_are_read():
    """`+` and `/` (base64's, not base64url's) and non-zero unused bits in the last
    character: a few issuers write them; pyjwt read them; the key is the same."""
    rsa_key = KEYS["RSA-2048"]
    numbers = rsa_key.public_key().public_numbers()
    n = numbers.n.to_bytes(256, "big")
    for spelled in (_std_b64(n), _std_b64(n) + "=", b64(b"\0" + n)):
        (got,) = parse_jwks(doc({"kty": "RSA", "n": spelled, "e": "AQAB"}), "x")
        assert got.key.public_numbers() == numbers
    jwk = _p256()
    last = jwk["x"][-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    noisy = jwk["x"][:-1] + alphabet[alphabet.index(last) | 1]  # an unused bit set
    assert noisy != jwk["x"]
    (got,) = parse_jwks(doc(jwk | {"x": noisy}), "x")
    assert raw_public(got.key) == raw_public(KEYS["P-256"].public_key())


def test_why_keys_were_left_out_is_logged_beside_the_usable_ones(caplog):
    small = _small_rsa() | {"kid": "old"}
    enc = _rsa() | {"use": "enc", "kid": "e"}
    with caplog.at_level("INFO", logger="meshca.jwks"):
        parse_jwks(doc(_p256() | {"kid": "k"}, small), "https://idp.test/jwks")
        parse_jwks(doc(_p256() | {"kid": "k"}, enc), "https://idp.test/jwks")
    warning, info = caplog.records
    assert warning.levelname == "WARNING" and "1 of its 2 keys left out" in warning.message
    assert "key 1: its modulus has 1024 bits" in warning.message
    assert info.levelname == "INFO" and "use is 'enc'" in info.message


def _off_curve_ys(count: int) -> list[int]:
    found = []
    for y in range(2, 1000):
        try:
            _ed_point(_enc(y, 0))
        except AssertionError:
            found.append(y)
        if len(found) == count:
            return found
    raise AssertionError("no y off the curve below 1000")


@pytest.mark.parametrize("y", _off_curve_ys(3))
def test_an_ed25519_key_off_the_curve_is_refused(y):
    """A y with no x on the curve (the test's own decoding finds none): OpenSSL takes it as
    a key, nothing verifies with it; the JWKS does not take it."""
    enc = _enc(y, 0)
    with pytest.raises(AssertionError, match="not on the curve"):
        _ed_point(enc)
    with pytest.raises(ValueError, match="is not a point on Ed25519"):
        parse_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64(enc)})


def test_an_ed448_key_off_the_curve_is_refused():
    p448, d = 2**448 - 2**224 - 1, -39081
    y = next(  # the first y whose x^2 is no square mod p
        y
        for y in range(2, 100)
        if pow((y * y - 1) * pow(d * y * y - 1, -1, p448) % p448, (p448 - 1) // 2, p448) > 1
    )
    with pytest.raises(ValueError, match="is not a point on Ed448"):
        parse_jwk({"kty": "OKP", "crv": "Ed448", "x": b64(y.to_bytes(57, "little"))})


def test_a_null_use_is_no_use_also_in_the_log(caplog):
    bad = {"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(32)), "use": None}
    with caplog.at_level("INFO", logger="meshca.jwks"):
        parse_jwks(doc(_p256(), bad), "the JWKS")
    (record,) = caplog.records
    assert record.levelname == "WARNING"


@pytest.mark.parametrize("crv", list(EC_CURVES))
def test_an_ec_coordinate_of_the_field_prime_or_more_is_refused(crv):
    """x + p names the same point to OpenSSL, which reduces it; P-521's 66 bytes hold it
    (P-256's and P-384's primes are so close to their sizes that it almost never fits).
    The primes are checked here against the curve equation y^2 = x^3 - 3x + b."""
    jwk = public_jwk(KEYS[crv])
    size = {"P-256": 32, "P-384": 48, "P-521": 66}[crv]
    x = int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="), "big")
    y = int.from_bytes(base64.urlsafe_b64decode(jwk["y"] + "=="), "big")
    p = {
        "P-256": 2**256 - 2**224 + 2**192 + 2**96 - 1,
        "P-384": 2**384 - 2**128 - 2**96 + 2**32 - 1,
        "P-521": 2**521 - 1,
    }[crv]
    b = {
        "P-256": 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
        "P-384": int(
            "b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875a"
            "c656398d8a2ed19d2a85c8edd3ec2aef",
            16,
        ),
        "P-521": int(
            "0051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef1"
            "09e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b50"
            "3f00",
            16,
        ),
    }[crv]
    assert (y * y - (x**3 - 3 * x + b)) % p == 0  # the prime is the curve's
    for bx, by in ((x + p, y), (x, y + p)):
        if max(bx, by) >= 1 << (8 * size):
            continue  # does not fit the coordinate's size: refused for its size anyway
        with pytest.raises(ValueError, match="not below"):
            parse_jwk(
                jwk | {"x": b64(bx.to_bytes(size, "big")), "y": b64(by.to_bytes(size, "big"))}
            )
    assert crv != "P-521" or x + p < 1 << (8 * size)  # (P-521: the case is real)
