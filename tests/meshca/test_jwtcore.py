"""meshca.jwtcore without sockets: every algorithm it accepts, the keys each one takes, the
signature encodings it refuses, strict base64url, header extensions, and the claim checks
with leeway on a fixed clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca import jwtcore
from meshca.jwtcore import TokenError

NOW = 1_800_000_000
ISS = "https://issuer.test"
CLAIMS = {"iss": ISS, "aud": "api", "sub": "u1", "iat": NOW, "exp": NOW + 600}

P256 = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
P521 = ec.generate_private_key(ec.SECP521R1())
K256 = ec.generate_private_key(ec.SECP256K1())  # 256 bits too, but not ES256's curve
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED25519 = ed25519.Ed25519PrivateKey.generate()
ED448 = ed448.Ed448PrivateKey.generate()
SECRET = b"s" * 64
N256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's order


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: object = CLAIMS, header: dict | None = None, alg: str = "ES256") -> str:
    """header.payload, unsigned, of any JSON."""
    head = {"alg": alg, "typ": "JWT", **(header or {})}
    return b64(json.dumps(head).encode()) + "." + b64(json.dumps(claims).encode())


def es_sign(signing_input: str, key: ec.EllipticCurvePrivateKey, digest=None) -> bytes:
    """r||s, each as wide as the key's curve (what JOSE writes)."""
    size = (key.curve.key_size + 7) // 8
    digest = (
        digest
        or {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(digest)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def es256(claims: object = CLAIMS, header: dict | None = None, key=P256) -> str:
    si = encode(claims, header)
    return si + "." + b64(es_sign(si, key, hashes.SHA256()))


def decode(token: str, key=None, alg: str = "ES256", audiences=("api",), leeway=0, **kw):
    key = P256.public_key() if key is None else key
    return jwtcore.decode(token, key, alg, audiences, ISS, NOW, leeway, **kw)


# -- every algorithm, with the key it needs --------------------------------------------------

SIGNERS = [
    ("RS256", RSA, RSA.public_key()),
    ("RS384", RSA, RSA.public_key()),
    ("RS512", RSA, RSA.public_key()),
    ("PS256", RSA, RSA.public_key()),
    ("PS384", RSA, RSA.public_key()),
    ("PS512", RSA, RSA.public_key()),
    ("ES256", P256, P256.public_key()),
    ("ES384", P384, P384.public_key()),
    ("ES512", P521, P521.public_key()),
    ("EdDSA", ED25519, ED25519.public_key()),
    ("EdDSA", ED448, ED448.public_key()),
    ("HS256", SECRET, SECRET),
    ("HS384", SECRET, SECRET),
    ("HS512", SECRET, SECRET),
]


@pytest.mark.parametrize(("alg", "private", "public"), SIGNERS, ids=lambda v: str(v)[:12])
def test_a_token_signed_by_pyjwt_verifies(alg, private, public):
    token = jwt.encode(CLAIMS, private, algorithm=alg)
    assert decode(token, public, alg) == CLAIMS


@pytest.mark.parametrize(("alg", "private", "public"), SIGNERS, ids=lambda v: str(v)[:12])
def test_a_token_of_one_bit_more_does_not_verify(alg, private, public):
    head, body, sig = jwt.encode(CLAIMS, private, algorithm=alg).split(".")
    other = b64(json.dumps({**CLAIMS, "sub": "u2"}).encode())
    with pytest.raises(TokenError, match="signature does not verify"):
        decode(f"{head}.{other}.{sig}", public, alg)


@pytest.mark.parametrize(
    ("alg", "private", "public"),
    [
        ("ES256", P384, P384.public_key()),  # the right kind of key on another curve
        ("ES256", K256, K256.public_key()),  # the same size, another curve
        ("ES384", P256, P256.public_key()),
        ("ES512", P384, P384.public_key()),
        ("ES256", RSA, RSA.public_key()),
        ("RS256", P256, P256.public_key()),
        ("PS256", ED25519, ED25519.public_key()),
        ("EdDSA", P256, P256.public_key()),
        ("ES256", P256, P256),  # a private key is not what a verifier holds
        ("HS256", SECRET, P256.public_key()),  # alg confusion: a public key as HMAC key...
        ("HS256", SECRET, RSA.public_key()),
        ("HS256", SECRET, "not bytes"),
        ("HS256", SECRET, b""),
    ],
    ids=lambda v: str(v)[:12],
)
def test_a_key_that_does_not_fit_the_algorithm_is_refused(alg, private, public):
    si = encode(alg=alg)
    token = si + "." + b64(b"x" * 64)
    with pytest.raises(TokenError, match="does not match its signing key"):
        decode(token, public, alg)


@pytest.mark.parametrize(
    "pem",
    [
        P256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        RSA.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        RSA.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        P256.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ],
    ids=["ec-pem", "rsa-pem", "ssh", "der"],
)
def test_a_public_key_is_never_an_hmac_secret(pem):
    """The classic confusion: the verifier's public key (which the attacker has) used as
    the HMAC secret of an HS256 token the attacker signed with it."""
    si = encode(alg="HS256")
    token = si + "." + b64(hmac.new(pem, si.encode(), hashlib.sha256).digest())
    with pytest.raises(TokenError, match="does not match its signing key"):
        decode(token, pem, "HS256")


@pytest.mark.parametrize("header_alg", ["RS256", "PS256", "HS256", "ES384", "es256"])
def test_the_header_alg_must_be_the_one_verified(header_alg):
    si = encode(alg=header_alg)
    token = si + "." + b64(es_sign(si, P256, hashes.SHA256()))
    with pytest.raises(TokenError, match="algorithm is not accepted"):
        decode(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_none_is_refused_in_any_case(alg):
    with pytest.raises(TokenError, match="'none' is not accepted"):
        jwtcore.parse(encode(alg=alg) + ".")
    with pytest.raises(TokenError, match="'none' is not accepted"):
        jwtcore.parse(encode(alg=alg) + "." + b64(b"sig"))


# -- the ES256 signature: exactly r||s, each 32 bytes, within the group ------------------------


def with_signature(token: str, raw: bytes) -> str:
    return token.rsplit(".", 1)[0] + "." + b64(raw)


def rs(token: str) -> tuple[int, int]:
    raw = unb64(token.rsplit(".", 1)[1])
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")


def raw_rs(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw[:-1],  # 63 bytes
        lambda raw: raw + b"\0",  # 65
        lambda raw: b"\0" + raw,  # 65, r||s shifted
        lambda raw: raw[:32] + b"\0" + raw[32:],  # 65: the same r and s, s one byte wider
        lambda raw: raw[:32],  # r alone
        lambda raw: b"",
        lambda raw: raw + raw,  # 128: as if ES512
        lambda raw: encode_dss_signature(  # DER, as OpenSSL writes it: not JOSE's form
            int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        ),
    ],
    ids=["63", "65", "65-shifted", "65-same-values", "r-only", "empty", "128", "der"],
)
def test_a_signature_of_the_wrong_length_or_form_is_refused(change):
    token = es256()
    raw = unb64(token.rsplit(".", 1)[1])
    with pytest.raises(TokenError, match="signature does not verify"):
        decode(with_signature(token, change(raw)))


@pytest.mark.parametrize(
    "values",
    [
        lambda r, s: (0, s),
        lambda r, s: (r, 0),
        lambda r, s: (0, 0),
        lambda r, s: (r + N256, s) if r + N256 < 2**256 else (N256, s),  # r >= n
        lambda r, s: (r, N256),  # s = n, which is 0 mod n
        lambda r, s: (N256 - r, s),
    ],
    ids=["r=0", "s=0", "both-0", "r>=n", "s=n", "r-negated"],
)
def test_zero_or_out_of_range_r_s_is_refused(values):
    token = es256()
    with pytest.raises(TokenError, match="signature does not verify"):
        decode(with_signature(token, raw_rs(*values(*rs(token)))))


def test_high_s_is_the_same_signature():
    """(r, n - s) verifies whenever (r, s) does (ECDSA is malleable this way): neither JOSE
    nor OpenSSL normalises s, so half of all tokens an issuer signs have a high s and
    refusing them would refuse those. It yields the same claims, signed by the same key."""
    token = es256()
    r, s = rs(token)
    other = with_signature(token, raw_rs(r, N256 - s))
    assert other != token
    assert decode(other) == decode(token) == CLAIMS


# -- strict base64url ------------------------------------------------------------------------


def test_b64url_decode_table():
    ok = {"": b"", "QQ": b"A", "QUI": b"AB", "QUJD": b"ABC", "-_8": b"\xfb\xff", "QQ==": b"A"}
    for text, raw in ok.items():
        assert jwtcore.b64url_decode(text.encode()) == raw, text
    for text in ["Q", "QR", "QUJ", "QR==", "QQ=", "Q===", "=QQ", "QQ==QQ", "Q Q", "QQ\n", "+/8",
                 "QQ!", "QQ.", "ab/c", "ab+c"]:  # fmt: skip
        with pytest.raises(ValueError):
            jwtcore.b64url_decode(text.encode())


def non_canonical(segment: str) -> str:
    """The same bytes with a non-zero unused bit in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) | 1]


def awkward_token() -> str:
    """A token each of whose three parts has unused bits in its last character."""
    for hk in range(4):
        for px in range(4):
            token = es256({**CLAIMS, "x": "a" * px}, {"k": "b" * hk})
            if all(len(part) % 4 in (2, 3) for part in token.split(".")):
                return token
    raise AssertionError("no such token")


@pytest.mark.parametrize("part", [0, 1, 2])
def test_non_canonical_base64_is_refused_in_every_part(part):
    token = awkward_token()
    assert decode(token)["iss"] == ISS
    parts = token.split(".")
    bent = list(parts)
    bent[part] = non_canonical(parts[part])
    assert unb64(bent[part]) == unb64(parts[part])  # the same bytes, spelled otherwise
    with pytest.raises(TokenError, match="malformed"):
        decode(".".join(bent))


def test_padding_is_accepted_whole_and_refused_in_part():
    token = es256()
    head, body, sig = token.split(".")
    assert len(sig) % 4 == 2
    assert decode(f"{head}.{body}.{sig}==") == CLAIMS  # as AWS ALB pads
    for bad in (f"{head}.{body}.{sig}=", f"{head}.{body}.{sig}===", f"{head}.{body}.={sig}"):
        with pytest.raises(TokenError, match="malformed"):
            decode(bad)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "e30.e30",
        "!!!.@@@.###",
        "eyJhbGciOiJFUzI1NiJ9.W10.",  # payload []
        "W10.e30.",  # header []
        b64(b'{"alg":"ES256"}') + "." + b64(b'{"exp": NaN}') + ".",
        b64(b'{"alg":"ES256"}') + "." + b64(b'{"exp": Infinity}') + ".",
        b64(b'{"alg":"ES256"}') + "." + b64(b'{"sub": "\xff"}') + ".",  # not UTF-8
        b64(b'{"alg":"ES256"}') + "." + b64(b"[" * 20_000) + ".",
        b64(b'{"alg":"ES256"}') + "." + b64(b"{}") + ".sig\u00e9",  # not ASCII
        b64(b"{}") + "." + b64(b"{}") + ".",  # no alg
        b64(b'{"alg":7}') + "." + b64(b"{}") + ".",
        b64(b'{"alg":"ES256","kid":7}') + "." + b64(b"{}") + ".",
        b64(b'{"alg":"ES256"}') + "." + b64(b'{"exp": 1} {"exp": 2}') + ".",  # two values
        b64(b'{"alg":"ES256"}') + "." + b64(b'{"exp": 1}x') + ".",  # something after it
        b64(b'{"alg":"ES256"}') + "." + b64(b"   ") + ".",  # whitespace only
        b64(b'{"alg":"ES256"}') + "." + b64(b' {"exp": NaN} ') + ".",  # NaN, behind spaces
        b64(b'{"alg":"ES256"} {}') + "." + b64(b"{}") + ".",  # the header: two values
    ],
)
def test_malformed_tokens(token):
    with pytest.raises(TokenError, match="malformed"):
        jwtcore.parse(token)


@pytest.mark.parametrize(
    "header",
    [
        {"crit": ["exp"]},
        {"crit": ["b64"], "b64": True},
        {"crit": []},
        {"crit": "b64"},
        {"b64": False},
        {"b64": "false"},
    ],
)
def test_a_header_with_crit_or_b64_is_refused(header):
    """RFC 7515 4.1.11: a recipient that does not understand a critical extension must
    refuse the token; this verifier understands none (nor RFC 7797's b64)."""
    with pytest.raises(TokenError, match="extension"):
        decode(es256(header=header))


def test_parse_decodes_once_and_keeps_what_was_signed():
    token = es256(header={"kid": "k1"})
    jws = jwtcore.parse(token)
    assert (jws.alg, jws.kid, jws.claims) == ("ES256", "k1", CLAIMS)
    assert jws.signing_input == token.rsplit(".", 1)[0].encode()
    assert jwtcore.parse(token).header is jws.header  # the same header: parsed once
    with pytest.raises(TypeError):
        jws.header["alg"] = "none"  # type: ignore[index]  # shared, so read-only


def test_the_header_memo_is_bounded():
    for i in range(jwtcore._HEADERS_MAX * 3):
        jwtcore.parse(es256(header={"kid": f"k{i}"}))
        assert len(jwtcore._HEADERS) <= jwtcore._HEADERS_MAX
    long = es256(header={"kid": "k" * 1000})  # a long header is not kept
    jwtcore.parse(long)
    assert long.split(".")[0].encode() not in jwtcore._HEADERS


# -- claims, on a fixed clock ----------------------------------------------------------------


def claims(**changes):
    out = {**CLAIMS, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()

CLAIM_CASES = [
    # (claims, leeway, audiences, refusal or None)
    (claims(), 0, ("api",), None),
    (claims(exp=NOW + 1), 0, ("api",), None),
    (claims(exp=NOW), 0, ("api",), "expired"),
    (claims(exp=NOW - 59), 60, ("api",), None),  # within the leeway
    (claims(exp=NOW - 60), 60, ("api",), "expired"),
    (claims(exp=NOW - 61.5), 60, ("api",), "expired"),
    (claims(nbf=NOW + 60), 60, ("api",), None),
    (claims(nbf=NOW + 61), 60, ("api",), "not valid yet"),
    (claims(nbf=NOW + 1), 0, ("api",), "not valid yet"),
    (claims(iat=NOW + 61), 60, ("api",), "not valid yet"),
    (claims(iat=NOW + 60), 60, ("api",), None),
    (claims(iat=DROP), 0, ("api",), None),
    (claims(exp=DROP), 0, ("api",), "lacks the 'exp'"),
    (claims(exp=None), 0, ("api",), "lacks the 'exp'"),
    (claims(exp=str(NOW + 600)), 0, ("api",), "not numbers"),
    (claims(exp=True), 0, ("api",), "not numbers"),
    (claims(exp=[NOW + 600]), 0, ("api",), "not numbers"),
    (claims(exp=10**400), 0, ("api",), "not numbers"),
    (claims(exp=float("inf")), 0, ("api",), "not numbers"),
    (claims(exp=float("nan")), 0, ("api",), "not numbers"),
    (claims(nbf=float("nan")), 0, ("api",), "not numbers"),
    (claims(iat="0"), 0, ("api",), "not numbers"),
    (claims(nbf=None), 0, ("api",), "not numbers"),
    (claims(iss=DROP), 0, ("api",), "lacks the 'iss'"),
    (claims(iss="https://evil.test"), 0, ("api",), "issuer is not trusted"),
    (claims(iss=[ISS]), 0, ("api",), "issuer is not trusted"),
    (claims(aud=["x", "api"]), 0, ("api",), None),
    (claims(aud="x"), 0, ("api", "x"), None),
    (claims(aud="x"), 0, ("api",), "audience is not accepted"),
    (claims(aud=["x"]), 0, ("api",), "audience is not accepted"),
    (claims(aud=["api", 7]), 0, ("api",), "audience is not accepted"),
    (claims(aud=[7, "api"]), 0, ("api",), "audience is not accepted"),
    (claims(aud={"api": 1}), 0, ("api",), "audience is not accepted"),
    (claims(aud=DROP), 0, ("api",), "lacks the 'aud'"),
    (claims(aud=[]), 0, ("api",), "lacks the 'aud'"),
    (claims(aud=""), 0, ("api",), "lacks the 'aud'"),
    (claims(aud="anything"), 0, None, None),  # no audiences configured: aud not looked at
    (claims(aud=7), 0, (), None),
    (claims(sub=7), 0, ("api",), "malformed"),
    (claims(sub=None), 0, ("api",), "malformed"),
    (claims(jti=["j"]), 0, ("api",), "malformed"),
    (claims(jti="j"), 0, ("api",), None),
]


@pytest.mark.parametrize(("got", "leeway", "audiences", "refusal"), CLAIM_CASES)
def test_claims(got, leeway, audiences, refusal):
    if refusal is None:
        assert jwtcore.check_claims(got, audiences, ISS, NOW, leeway) == float(got["exp"])
    else:
        with pytest.raises(TokenError, match=refusal):
            jwtcore.check_claims(got, audiences, ISS, NOW, leeway)


def test_required_claims():
    with pytest.raises(TokenError, match="lacks the 'jti'"):
        jwtcore.check_claims(CLAIMS, ("api",), ISS, NOW, 0, require=("exp", "jti"))
    got = {**CLAIMS, "jti": "j"}
    assert jwtcore.check_claims(got, ("api",), ISS, NOW, 0, require=("exp", "jti"))


def test_claims_are_checked_after_the_signature():
    """Nothing a token says is looked at before its signature verified: an expired token
    with a bad signature is refused for its signature."""
    token = es256(claims(exp=NOW - 3600), key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TokenError, match="signature does not verify"):
        decode(token)


def test_refusals_never_contain_the_token():
    secretish = "Z" * 40
    bad = [
        es256(claims(sub=7, x=secretish)),
        es256(claims(aud=secretish)),
        es256(claims(iss=secretish)),
        es256(header={"crit": [secretish]}),
        es256(header={"alg": secretish}),
        encode(alg=secretish) + "." + b64(b"x"),
        secretish + "." + secretish + "." + secretish,
    ]
    for token in bad:
        with pytest.raises(TokenError) as e:
            decode(token)
        assert secretish not in str(e.value) and token not in str(e.value)


@pytest.mark.parametrize("pad", [(" ", ""), ("", "\n"), ("\r\n\t ", " \n")])
def test_json_with_whitespace_around_it_is_read_as_json_is(pad):
    """RFC 8259 allows whitespace around a JSON text: header and claims padded with it
    verify, and read the same, as with `json.loads`."""
    before, after = pad
    head = b64((before + '{"alg":"ES256","typ":"JWT"}' + after).encode())
    body = b64((before + json.dumps(CLAIMS) + after).encode())
    token = f"{head}.{body}." + b64(es_sign(f"{head}.{body}", P256, hashes.SHA256()))
    assert decode(token) == CLAIMS
    assert dict(jwtcore.parse(token).header) == {"alg": "ES256", "typ": "JWT"}


@settings(max_examples=500, deadline=None)
@given(
    size=st.sampled_from([32, 48, 66]),
    r=st.binary(min_size=0, max_size=66),
    s=st.binary(min_size=0, max_size=66),
    zeros=st.integers(min_value=0, max_value=66),
)
def test_der_signature_is_what_cryptography_encodes(size, r, s, zeros):
    """The DER the verifier hands OpenSSL for a JOSE r||s signature is, byte for byte, what
    cryptography's encode_dss_signature makes of the two integers: leading zero bytes
    dropped, a zero byte before a high bit, zero as one byte, P-521's long-form length."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from meshca.jwtcore import der_signature

    r = (b"\x00" * zeros + r)[-size:].rjust(size, b"\x00")
    s = s[:size].rjust(size, b"\xff" if zeros % 2 else b"\x00")
    want = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    assert der_signature(r, s) == want
