"""JWT verification core (shared by the CA's token checks and the sidecar's authenticator).

One table of accepted algorithms and the key type each needs; `parse()` (strict
base64url, header and payload decoded once), `verify_signature()` (with
`cryptography`, on key objects loaded once per JWKS document; ES256 from a table of
the key, meshca.p256, where it can), `check_claims()`
(issuer, audience, and the times against an injected clock), and `decode()`, the
three in that order. Every failure is a `TokenError` whose message is safe to show
(it never contains the token). Callers wrap it in their own error type (the CA's
401, the sidecar's `invalid_token`).

Why not pyjwt's `decode`: the sidecar may verify a new token on every request, and
pyjwt 2.15 costs about 1.8 times one ES256 verification for it (its canonical-base64
check walks each character in Python; options are merged and the algorithm object
prepared per call), and the sidecar then parsed header and payload a second time.
Here the same checks cost a small fraction of the signature (bench/bench_jwt_verify.py
measures both). pyjwt still signs (join tokens, JWT-SVIDs); the key objects come from
JWKS documents through meshca.jwks, once per document.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import json
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from meshca import p256

# Asymmetric algorithms and the JWK key type (`kty`) their key must have.
ASYMMETRIC = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
HMAC = ("HS256", "HS384", "HS512")
KNOWN = frozenset(ASYMMETRIC) | frozenset(HMAC)

_SHA = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
# ECDSA (RFC 7518 3.4): the curve each algorithm names, and the size of r and of s.
_EC = {
    "ES256": ("secp256r1", 32, ec.ECDSA(_SHA["256"])),
    "ES384": ("secp384r1", 48, ec.ECDSA(_SHA["384"])),
    "ES512": ("secp521r1", 66, ec.ECDSA(_SHA["512"])),
}
# RSASSA-PKCS1-v1_5 (RS*) and RSASSA-PSS with MGF1 and a salt as long as the hash (PS*).
_RSA = {
    f"{kind}{bits}": (
        padding.PKCS1v15()
        if kind == "RS"
        else padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size),
        h,
    )
    for kind in ("RS", "PS")
    for bits, h in _SHA.items()
}
_HMAC_HASH = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

# base64url -> base64 for binascii; a "+" or "/" (base64's own, not base64url's) becomes
# "!", which strict decoding refuses.
_TO_STD = bytes.maketrans(b"-_+/", b"+/!!")


class TokenError(ValueError):
    """A token failed a check; the message says which, and is safe to show."""


class Jws(NamedTuple):
    """A parsed compact JWS: decoded header and claims, what was signed, the signature."""

    header: Mapping[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        """The header's `alg` (parse() made sure it is a string and not `none`)."""
        return self.header["alg"]

    @property
    def kid(self) -> str | None:
        """The header's `kid`, if any (a string: parse() refused any other)."""
        return self.header.get("kid")


def key_fits(alg: str, key_type: str | None) -> bool:
    """Does a JWK of `key_type` fit algorithm `alg` (an RSA key for RS256, ...)?"""
    return ASYMMETRIC.get(alg) == key_type


def ec_curve(alg: str) -> str | None:
    """The curve (cryptography's name) of ECDSA algorithm `alg`, or None for another."""
    found = _EC.get(alg)
    return found[0] if found else None


def b64url_decode(segment: bytes) -> bytes:
    """Strict base64url: only its alphabet, and one spelling per value.

    The unused low bits of the last character must be zero (so a signature has one
    encoding, as pyjwt >= 2.15 requires too). Unpadded as RFC 7515 writes it; full
    `=` padding is accepted as well, as pyjwt does (AWS ALB pads its tokens).
    ValueError (binascii.Error) if it is not that.
    """
    std = segment.translate(_TO_STD)
    if segment.find(b"=") < 0:  # not `in`: it tries b"=" as an int first and raises
        std += b"=" * (-len(std) % 4)
    raw = binascii.a2b_base64(std, strict_mode=True)
    if binascii.b2a_base64(raw, newline=False) != std:
        raise binascii.Error("non-canonical base64url")
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json takes them


_JSON = json.JSONDecoder(parse_constant=_no_constant)
_SCAN: Callable[[str, int], tuple[Any, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def _json_object(segment: bytes) -> dict[str, Any]:
    text = b64url_decode(segment).decode("utf-8")
    try:  # the C scanner alone: what decode() runs, without its two whitespace matches
        value, end = _SCAN(text, 0)
    except StopIteration:  # not a value where the text starts (whitespace, or not JSON)
        end = -1
    if end != len(text):
        value = _JSON.decode(text)  # whitespace around the value, or an error: decode's own
    if not isinstance(value, dict):
        raise TypeError("not an object")
    return value


# Parsed headers by their base64url text. An issuer writes the same header on every token
# (alg, kid, typ), so this spares decoding it again; bounded, emptied when full (a flood of
# distinct headers costs what it would without it). Values are read-only views: shared.
_HEADERS: dict[bytes, Mapping[str, Any]] = {}
_HEADERS_MAX = 64
_HEADER_CACHED_BYTES = 512


def _header(segment: bytes, malformed: str) -> Mapping[str, Any]:
    try:
        header = _json_object(segment)
    except (ValueError, TypeError, RecursionError):  # "[[[[..." nests past the limit
        raise TokenError(f"{malformed} (bad base64 or JSON, or not a JSON object)") from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError(f"{malformed} (no algorithm)")
    if alg.lower() == "none":
        raise TokenError("token algorithm is not accepted: 'none' is not accepted from any issuer")
    if "kid" in header and not isinstance(header["kid"], str):
        raise TokenError(f"{malformed} (kid is not a string)")
    if "crit" in header or header.get("b64", True) is not True:
        raise TokenError("token header asks for an extension this verifier does not implement")
    return MappingProxyType(header)


def parse(token: str | bytes, malformed: str = "malformed token") -> Jws:
    """Split and decode a compact JWS; TokenError if it is not a well-formed one.

    Header and payload must be base64url JSON objects (strict: see `b64url_decode`);
    the header's `alg` a string other than `none` (in any case), its `kid` a string
    if present, and no `crit`: this verifier implements no extension a token could
    require (RFC 7515 4.1.11), nor RFC 7797's unencoded payload (`b64` false).
    """
    try:
        raw = token.encode("ascii") if isinstance(token, str) else token
        head, body, sig = raw.split(b".")
    except (UnicodeEncodeError, ValueError):
        raise TokenError(f"{malformed} (not three dot-separated parts)") from None
    header = _HEADERS.get(head)
    if header is None:
        header = _header(head, malformed)
        if len(head) <= _HEADER_CACHED_BYTES:
            if len(_HEADERS) >= _HEADERS_MAX:
                _HEADERS.clear()
            _HEADERS[head] = header
    try:
        claims = _json_object(body)
        signature = b64url_decode(sig)
    except (ValueError, TypeError, RecursionError):
        raise TokenError(f"{malformed} (bad base64 or JSON, or not a JSON object)") from None
    return Jws(header, claims, raw[: len(head) + 1 + len(body)], signature)


@functools.lru_cache(maxsize=16)
def _usable_hmac_secret(secret: bytes) -> bool:
    """Not empty and not an asymmetric key (PEM, SSH or DER): pyjwt's own test of a
    secret, so a public key never becomes an HMAC secret. Once per secret; pyjwt is imported
    here, not with the module (the sidecar loads this one at start-up, HMAC issuers are rare)."""
    from jwt.algorithms import HMACAlgorithm
    from jwt.exceptions import InvalidKeyError

    try:
        HMACAlgorithm(hashlib.sha256).prepare_key(secret)
    except InvalidKeyError:
        return False
    return True


_KTY_OF_CLASS: dict[type, str | None] = {}


def _kty(key: object) -> str | None:
    """The JWK key type of a `cryptography` public key, or None. Memoized by class:
    isinstance against these ABCs (the key classes are registered with them) costs more
    than the rest of the key check."""
    cls = type(key)
    if cls not in _KTY_OF_CLASS:
        kinds = [
            ("EC", ec.EllipticCurvePublicKey),
            ("RSA", rsa.RSAPublicKey),
            ("OKP", ed25519.Ed25519PublicKey),
            ("OKP", ed448.Ed448PublicKey),
        ]
        _KTY_OF_CLASS[cls] = next((kty for kty, abc in kinds if issubclass(cls, abc)), None)
    return _KTY_OF_CLASS[cls]


def _der_integer(raw: bytes) -> bytes:
    """DER INTEGER of the unsigned big-endian `raw`: no leading zero byte unless the next
    has its high bit set (the value would read as negative), one byte for zero."""
    raw = raw.lstrip(b"\x00") or b"\x00"
    if raw[0] & 0x80:
        raw = b"\x00" + raw
    return b"\x02" + bytes((len(raw),)) + raw


def der_signature(r: bytes, s: bytes) -> bytes:
    """The DER `ECDSA-Sig-Value` (SEQUENCE of INTEGER r, INTEGER s, RFC 3279 2.2.3) of a
    signature's two halves, big-endian and unsigned, as OpenSSL reads it; what
    `cryptography`'s `encode_dss_signature` makes from two ints, without its ASN.1 code
    (about 1 MiB of its library's pages back in a sidecar that released them after
    start-up, for each new token) and the two int conversions. Halves of up to 127 bytes
    (P-521's are 66)."""
    body = _der_integer(r) + _der_integer(s)
    n = len(body)
    return (b"\x30" + bytes((n,)) if n < 0x80 else b"\x30\x81" + bytes((n,))) + body


def verify_signature(jws: Jws, alg: str, key: Any) -> None:
    """Check `jws`'s signature with `key` (a `cryptography` public key, or an HMAC
    secret as bytes) for `alg`; TokenError unless it verifies.

    The header's `alg` must be `alg` (the caller picked `alg` from what it accepts,
    never from the token alone), and the key must be the kind `alg` names: an RSA key
    for RS*/PS*, an EC key on the algorithm's own curve for ES*, Ed25519/Ed448 for
    EdDSA, bytes for HS*.
    """
    if jws.header.get("alg") != alg:
        raise TokenError("token algorithm is not accepted")
    data, sig = jws.signing_input, jws.signature
    try:
        if alg in _EC:
            curve, size, ecdsa = _EC[alg]
            if _kty(key) != "EC" or key.curve.name != curve:
                raise TokenError("token algorithm does not match its signing key")
            # JOSE writes r||s, each exactly `size` bytes (RFC 7518 3.4); OpenSSL wants DER.
            if len(sig) != 2 * size:
                raise InvalidSignature
            if size == 32:  # ES256: from the key's own table once it has one (meshca.p256)
                verified = p256.verify_es256(key, data, sig[:32], sig[32:])
                if verified is not None:
                    if not verified:
                        raise InvalidSignature
                    return
            key.verify(der_signature(sig[:size], sig[size:]), data, ecdsa)
            if size == 32:
                p256.verified_with(key)  # a key its issuer signs with: a table is worth it
        elif alg in _RSA:
            if _kty(key) != "RSA":
                raise TokenError("token algorithm does not match its signing key")
            pad, digest = _RSA[alg]
            key.verify(sig, data, pad, digest)
        elif alg == "EdDSA":
            if _kty(key) != "OKP":
                raise TokenError("token algorithm does not match its signing key")
            key.verify(sig, data)
        elif alg in _HMAC_HASH:
            if not isinstance(key, bytes) or not _usable_hmac_secret(key):
                raise TokenError("token algorithm does not match its signing key")
            mac = hmac.new(key, data, _HMAC_HASH[alg]).digest()
            if not hmac.compare_digest(mac, sig):
                raise InvalidSignature
        else:
            raise TokenError("token algorithm is not accepted")
    except InvalidSignature:
        raise TokenError("token signature does not verify") from None


def _seconds(value: Any) -> float:
    """A NumericDate (RFC 7519 2): a finite JSON number, not a string or a boolean."""
    if type(value) is int or type(value) is float:  # bool is not: its type is bool
        try:
            seconds = float(value)
        except OverflowError:  # an int past a float's range
            pass
        else:
            if math.isfinite(seconds):
                return seconds
    raise TokenError("token time claims are not numbers")


def check_claims(
    claims: dict[str, Any],
    audiences: Sequence[str] | None,
    issuer: str,
    now: float,
    leeway: float,
    require: Sequence[str] = ("exp",),
    malformed: str = "malformed token",
) -> float:
    """Check the claims of a token whose signature verified; its `exp`, or TokenError.

    Every claim in `require` (and `exp`, always) present; `iss` equal to `issuer`; with
    `audiences`, an `aud` (a string or a list of strings) naming one of them (without,
    `aud` is not looked at); `sub` and `jti` strings if present; and the times against
    `now` (seconds since the epoch, from the caller's clock, so tests can move it) with
    `leeway` seconds of skew: not expired, `nbf` and `iat` not in the future.
    """
    for name in require:
        if claims.get(name) is None:
            raise TokenError(f"token lacks the {name!r} claim")
    iss, exp = claims.get("iss"), claims.get("exp")
    if iss is None or exp is None:
        raise TokenError(f"token lacks the {'iss' if iss is None else 'exp'!r} claim")
    if iss != issuer:
        raise TokenError("token issuer is not trusted")
    if audiences:
        aud = claims.get("aud")
        if not aud:
            raise TokenError("token lacks the 'aud' claim")
        if isinstance(aud, str):
            named = aud in audiences
        elif isinstance(aud, list):  # of strings only, one of them accepted
            named = False
            for a in aud:
                if not isinstance(a, str):
                    named = False
                    break
                named = named or a in audiences
        else:
            named = False
        if not named:
            raise TokenError("token audience is not accepted")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise TokenError(f"{malformed} ({name} is not a string)")
    exp = _seconds(exp)
    if now >= exp + leeway:
        raise TokenError("token has expired")
    for name in ("nbf", "iat"):
        if name in claims and _seconds(claims[name]) > now + leeway:
            raise TokenError("token is not valid yet (nbf or iat in the future)")
    return exp


def decode(
    token: str,
    key: Any,
    alg: str,
    audiences: Sequence[str] | None,
    issuer: str,
    now: float,
    leeway: float,
    require: Sequence[str] = ("exp",),
    malformed: str = "malformed token",
) -> dict[str, Any]:
    """Verify `token` signed with `alg` by `key`; its claims, or TokenError.

    `parse`, `verify_signature`, `check_claims` in that order: nothing a token says
    is trusted before its signature verified.
    """
    jws = parse(token, malformed)
    verify_signature(jws, alg, key)
    check_claims(jws.claims, audiences, issuer, now, leeway, require, malformed)
    return jws.claims
