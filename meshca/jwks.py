"""JWKS key sources (shared by the CA and the sidecar): a file, or an HTTPS URL with a cache.

`get(kid)` is synchronous and never does network I/O, so a data path can call
it per request; `refresh()` fetches (at most every `min_interval` seconds) and
is awaited only when a `kid` is unknown. A URL source whose keys are older than
`refresh` seconds starts a background refresh the next time a key is asked for
(the caller does not wait for it); when the endpoint is down the cached keys
keep working. A bad new document never replaces the last good one.

Documents are read here (`parse_jwks`), into `Jwk`s with `cryptography` key objects:
RFC 7517/7518 EC (P-256, P-384, P-521), RSA (2048 bits and up) and RFC 8037 OKP
(Ed25519, Ed448) public keys, the kinds `jwtcore` verifies. Not pyjwt's `PyJWKSet`:
importing pyjwt brings its HTTP client's modules (`urllib.request`, `http.client`,
`email`, `tempfile`, `bz2`, `lzma`), 1.2 MiB that a JWT sidecar held for a parse every
few minutes; and it took a key with private members as a private key.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from meshca import https, jwtcore

log = logging.getLogger("meshca.jwks")

MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0  # seconds for one fetch: connect, TLS, the answer
MAX_REDIRECTS = 3
REDIRECTS = frozenset((301, 302, 303, 307, 308))


# RFC 7518 6.2.1.1: the curves an EC key may name, and the size of each coordinate.
_EC_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}
# ... and each curve's field prime (FIPS 186-4 D.1.2): a coordinate is below it. (OpenSSL
# reduces one that is not: another spelling of the same point, which RFC 7518 does not
# allow; P-521's 66 bytes leave room for many.)
_EC_PRIMES = {
    "P-256": 2**256 - 2**224 + 2**192 + 2**96 - 1,
    "P-384": 2**384 - 2**128 - 2**96 + 2**32 - 1,
    "P-521": 2**521 - 1,
}
_ED_SIZES = {"Ed25519": 32, "Ed448": 57}  # RFC 8037 2: the public key's length
# Members that only a private (or a symmetric) key has (RFC 7518 6.2.2, 6.3.2, 6.4.1;
# RFC 8037 2). A key set is public: a key with any of them is refused, not trimmed to its
# public part, since anyone who fetched the document could sign with it.
_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
RSA_MIN_BITS = 2048  # RFC 7518 3.3

# Edwards points of small order (in the 8- or 4-torsion), by their y coordinate: with such
# a public key, a signature of R = the identity and S = 0 verifies for about one message
# in four (in eight), so anyone could sign tokens (OpenSSL's verification does not refuse
# them). Ed25519 (p = 2^255 - 19): y = 1 (order 1), p - 1 (order 2), 0 (order 4) and the
# two of order 8, as libsodium's blocklist has them; Ed448 (p = 2^448 - 2^224 - 1): 1, p - 1
# and 0. Both sign bits of each are refused, and any y of p or more (another spelling).
_P25519 = 2**255 - 19
_Y8 = int.from_bytes(
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little"
)
_P448 = 2**448 - 2**224 - 1
_SMALL_ORDER_Y = {
    "Ed25519": (_P25519, frozenset((0, 1, _P25519 - 1, _Y8, _P25519 - _Y8))),
    "Ed448": (_P448, frozenset((0, 1, _P448 - 1))),
}
# The curves' a and d (RFC 8032 5.1, 5.2): a point's x^2 = (y^2 - 1) / (d y^2 - a), which
# must be a square mod p for the point to be on the curve.
_EDWARDS = {
    "Ed25519": (-1, -121665 * pow(121666, -1, _P25519) % _P25519),
    "Ed448": (1, -39081 % _P448),
}

# base64url, and base64's own `+` and `/` too in a key's members: a few issuers write those
# (the document comes from the issuer's endpoint; its members are not a token's, where one
# spelling per value matters).
_JWK_B64 = bytes.maketrans(b"-_", b"+/")


class Jwk(NamedTuple):
    """One usable public key of a JWKS document."""

    kid: str | None  # the document's `kid`, if it is a string
    key_type: str  # `kty`: "EC", "RSA" or "OKP"
    alg: str | None  # the key's `alg`, if the document names one: then it is the only one
    key: Any  # a `cryptography` public key

    def fits(self, alg: str) -> bool:
        """May a token signed with `alg` be verified with this key? Its type must be the
        one `alg` needs (jwtcore.key_fits), and the algorithm the key's own, if it names one
        (RFC 7517 4.4)."""
        return jwtcore.key_fits(alg, self.key_type) and (self.alg is None or self.alg == alg)


def _shown(value: object) -> str:
    """A document's value in an error: its repr, cut short (a document may be 1 MiB)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _b64(jwk: dict[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"its {name!r} is missing or not a string")
    try:
        std = value.encode("ascii").translate(_JWK_B64).rstrip(b"=")
        return binascii.a2b_base64(std + b"=" * (-len(std) % 4), strict_mode=True)
    except ValueError:  # binascii.Error, UnicodeEncodeError
        raise ValueError(f"its {name!r} is not base64url") from None


def _edwards_point_is_usable(crv: str, x: bytes) -> bool:
    """Is `x`, an RFC 8032 encoding of the size `crv` needs, a point on the curve (a y below
    p that has an x), and not one of small order (see _SMALL_ORDER_Y)? Ed448's last byte
    holds only the sign bit. (OpenSSL takes a key off the curve too; nothing verifies
    with it, but it is no key.)"""
    p, small = _SMALL_ORDER_Y[crv]
    if crv == "Ed448" and x[-1] & 0x7F:
        return False
    y = int.from_bytes(x, "little") & ~(1 << (8 * len(x) - 1))
    if y >= p or y in small:
        return False
    a, d = _EDWARDS[crv]
    xx = (y * y - 1) * pow(d * y * y - a, -1, p) % p  # d y^2 - a is never 0 for these curves
    return pow(xx, (p - 1) // 2, p) in (0, 1)  # Euler's criterion: a square (or 0)


def parse_jwk(jwk: object) -> Jwk:
    """One JWK (a JSON object) as a public key; ValueError saying why it is not usable.

    The message never holds key material (coordinates, modulus, private members); the
    other members it names (`kty`, `crv`, `alg`, `use`, `key_ops`) are shown cut short."""
    if not isinstance(jwk, dict):
        raise ValueError("it is not a JSON object")
    kty = jwk.get("kty")
    private = [m for m in _PRIVATE if m in jwk]
    if private:
        raise ValueError(f"it holds private or secret key members ({', '.join(private)})")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"its use is {_shown(use)}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError(f"its key_ops {_shown(ops)} do not include 'verify'")
    kid = jwk.get("kid")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or not jwtcore.key_fits(alg, kty)):
        raise ValueError(
            f"its alg {_shown(alg)} is not one this verifier uses with a {_shown(kty)} key"
        )
    key: Any
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise ValueError(f"its EC curve {_shown(crv)} is not P-256, P-384 or P-521")
        curve, size = _EC_CURVES[crv]
        if alg is not None and jwtcore.ec_curve(alg) != curve.name:
            raise ValueError(f"its alg {alg} is not for curve {crv}")
        x, y = _b64(jwk, "x"), _b64(jwk, "y")
        if len(x) != size or len(y) != size:
            raise ValueError(f"its coordinates are not {size} bytes each, as {crv} needs")
        xi, yi = int.from_bytes(x, "big"), int.from_bytes(y, "big")
        if xi >= _EC_PRIMES[crv] or yi >= _EC_PRIMES[crv]:
            raise ValueError(f"its coordinates are not below {crv}'s field prime")
        numbers = ec.EllipticCurvePublicNumbers(xi, yi, curve())
        try:
            key = numbers.public_key()
        except ValueError:
            raise ValueError(f"its point is not on {crv}") from None
    elif kty == "RSA":
        n, e = int.from_bytes(_b64(jwk, "n"), "big"), int.from_bytes(_b64(jwk, "e"), "big")
        if n.bit_length() < RSA_MIN_BITS:
            raise ValueError(f"its modulus has {n.bit_length()} bits, fewer than {RSA_MIN_BITS}")
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise ValueError("its modulus and exponent are not an RSA public key") from None
    elif kty == "OKP":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _ED_SIZES:
            raise ValueError(f"its OKP curve {_shown(crv)} is not Ed25519 or Ed448")
        x = _b64(jwk, "x")
        if len(x) != _ED_SIZES[crv]:
            raise ValueError(f"its x is not {_ED_SIZES[crv]} bytes, as {crv} needs")
        if not _edwards_point_is_usable(crv, x):
            raise ValueError(
                f"its x is not a point on {crv}, or one of small order, or not canonical"
            )
        cls = ed25519.Ed25519PublicKey if crv == "Ed25519" else ed448.Ed448PublicKey
        try:
            key = cls.from_public_bytes(x)
        except ValueError:
            raise ValueError(f"its x is not an {crv} public key") from None
    elif kty == "oct":
        raise ValueError("it is a symmetric key (kty 'oct'): HMAC secrets come from a file")
    else:
        raise ValueError(f"its kty {_shown(kty)} is not EC, RSA or OKP")
    return Jwk(kid if isinstance(kid, str) else None, kty, alg, key)


def parse_jwks(data: bytes, where: str) -> list[Jwk]:
    """The usable keys of a JWKS document, in its order; ValueError naming `where` if it is
    not a JWKS or has no usable key.

    Keys that are not usable (another kind, private members, a point off its curve, ...)
    are left out, as a verifier must ignore what it does not understand (RFC 7517 5);
    the error for a document without any usable key says why of the first few. When some
    are usable, why the others were left out is logged (a warning; information only if
    each was marked for another use, as an encryption key beside the signing keys)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{where} is not a usable JWKS: not JSON ({type(e).__name__})") from None
    members = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not members:
        raise ValueError(f"{where} is not a usable JWKS: no 'keys' list, or an empty one")
    keys, why, left_out = [], [], []
    for i, member in enumerate(members):
        try:
            keys.append(parse_jwk(member))
        except ValueError as e:
            why.append(f"key {i}: {e}")
            left_out.append(member)
    shown = "; ".join(why[:3]) + ("; ..." if len(why) > 3 else "")
    if not keys:
        raise ValueError(f"{where} is not a usable JWKS: no usable key ({shown})")
    if why:
        other_use = all(isinstance(m, dict) and m.get("use") not in (None, "sig") for m in left_out)
        log.log(
            logging.INFO if other_use else logging.WARNING,
            "%s: %d of its %d keys left out (%s)",
            where,
            len(why),
            len(members),
            shown,
        )
    return keys


def index(keys: list[Jwk]) -> dict[str | None, Jwk]:
    """Each key by its `kid` (the first, if a document repeats one), and under None the
    only key, if there is only one (a token without a kid may use it, and no other).

    Built once per document, so a lookup per request is one dictionary access. A key whose
    kid is not a string in the document is under no kid: a token's kid always is one, and
    never matches it."""
    out: dict[str | None, Jwk] = {}
    for k in keys:
        if k.kid is not None:
            out.setdefault(k.kid, k)
    if len(keys) == 1:
        out[None] = keys[0]
    return out


class JwksSource:
    """Where an issuer's public keys come from."""

    _keys: dict[str | None, Jwk]
    _digest: bytes | None = None  # sha256 of the document `_keys` came from

    def _take(self, data: bytes, where: str) -> None:
        """Hold the keys of the JWKS document `data` (ValueError if it has none), unless it
        is the document held already: then the key objects stay the same ones (a verified
        token stays cached while its key is that same object, `authn`), and nothing is
        parsed or logged again."""
        digest = hashlib.sha256(data).digest()
        if digest != self._digest:
            self._keys = index(parse_jwks(data, where))
            self._digest = digest

    def get(self, kid: str | None) -> Jwk | None:
        """The cached key for `kid`, or None."""
        raise NotImplementedError

    async def refresh(self) -> bool:
        """Fetch again if allowed now; True if a fetch was attempted."""
        return False

    async def key(self, kid: str | None) -> Jwk | None:
        """The key for `kid`, refreshing once if it is unknown."""
        found = self.get(kid)
        if found is None and await self.refresh():
            found = self.get(kid)
        return found

    async def close(self) -> None:
        """Release resources."""


class FileJwks(JwksSource):
    """A JWKS file, re-read when it changes (a mounted ConfigMap updates in place)."""

    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.path = path
        self._mtime: int | None = None
        self._checked = 0.0
        self._check_every = check_every
        self._keys: dict[str | None, Jwk] = {}
        self._load()  # fail closed at start-up if the file is bad

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns != self._mtime:
            self._take(self.path.read_bytes(), str(self.path))
            self._mtime = st.st_mtime_ns

    def get(self, kid: str | None) -> Jwk | None:
        """The key for `kid`; the file is looked at no more than once a second."""
        now = time.monotonic()
        if now - self._checked >= self._check_every:
            self._checked = now
            try:
                self._load()
            except (OSError, ValueError) as e:
                log.warning("keeping the previous JWKS: %s", e)
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Look at the file again now."""
        self._checked = 0.0
        return True


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an https:// URL: a bearer token goes to one origin only."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or 443


class UrlJwks(JwksSource):
    """A JWKS fetched over HTTPS, cached, refreshed periodically and on an unknown `kid`.

    With `discover`, `url` is the issuer and the JWKS address is read from its
    `/.well-known/openid-configuration` (OIDC discovery, as the API server serves).
    `ssl_context` (or `ca_file`) decides whom to trust for the fetch: a context, or a
    function returning the current one, called for every fetch.

    Each fetch is one request on a connection of its own (`meshca.https`: no HTTP
    client library, whose 10 MiB a sidecar would hold for a fetch every few minutes);
    each document (the discovery document, the JWKS) within FETCH_TIMEOUT seconds,
    following up to MAX_REDIRECTS redirects to https:// URLs. The bearer token goes
    only to the origin (scheme, host, port) of the URL it was sent to first.
    """

    def __init__(
        self,
        url: str,
        ca_file: Path | None = None,
        bearer_file: Path | None = None,
        refresh: float = 300.0,
        min_interval: float = 10.0,
        discover: bool = False,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError("JWKS URL must be https://")
        self.url = url
        self._discover = discover
        self._jwks_uri: str | None = None if discover else url
        self._ssl = ssl_context or ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None
        )
        self._bearer_file = bearer_file
        self._refresh = refresh
        self._min_interval = min_interval
        self._keys: dict[str | None, Jwk] = {}
        self._fetched_at = -1e9
        self._tried_at = -1e9
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[bool] | None = None

    async def _get(self, url: str) -> bytes:
        headers = {"Accept": "application/json"}
        if self._bearer_file is not None:
            bearer = self._bearer_file.read_text().strip()
            if not bearer or not bearer.isascii() or not bearer.isprintable():
                # (never quoted: the file holds a credential)
                raise ValueError(f"{self._bearer_file} does not hold a usable bearer token")
            headers["Authorization"] = "Bearer " + bearer
        # A function gives the trust in force now (the sidecar's mesh bundle), per fetch.
        ctx = self._ssl() if callable(self._ssl) else self._ssl
        async with asyncio.timeout(FETCH_TIMEOUT):  # the redirects included
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    answer = await https.fetch(
                        "GET",
                        url,
                        ssl_context=ctx,
                        headers=headers,
                        timeout=FETCH_TIMEOUT,
                        cap=MAX_JWKS_BYTES,
                    )
                except https.BodyTooLarge:
                    raise ValueError(f"{url} answered more than {MAX_JWKS_BYTES} bytes") from None
                location = answer.headers.get("location")
                if answer.status in REDIRECTS and location:
                    target = urljoin(url, location)
                    if not target.startswith("https://"):
                        raise ValueError(f"{url} redirects to a URL that is not https://")
                    if _origin(target) != _origin(url):
                        # the credential is for the issuer's server, not where it points
                        headers.pop("Authorization", None)
                    url = target
                    continue
                if answer.status != 200:
                    raise ValueError(f"{url} answered {answer.status}")
                return answer.body
        raise ValueError(f"{url}: more than {MAX_REDIRECTS} redirects")

    async def _fetch(self) -> None:
        self._tried_at = time.monotonic()
        if self._jwks_uri is None:
            where = self.url.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = json.loads(await self._get(where))
                jwks_uri = doc["jwks_uri"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise ValueError(f"{where} has no usable jwks_uri ({type(e).__name__})") from None
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError(f"{where}: jwks_uri must be an https:// URL")
            self._jwks_uri = jwks_uri
        self._take(await self._get(self._jwks_uri), self._jwks_uri)
        self._fetched_at = time.monotonic()

    def get(self, kid: str | None) -> Jwk | None:
        """The cached key; a stale cache starts a background refresh (never waits for it)."""
        if time.monotonic() - self._fetched_at > self._refresh and (
            self._background is None or self._background.done()
        ):
            try:
                self._background = asyncio.get_running_loop().create_task(self.refresh())
            except RuntimeError:  # no running loop (a synchronous caller): skip
                pass
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Fetch now unless one was tried within `min_interval`; True if tried.

        A fetch already under way (say, the background refresh) is waited for.
        """
        if self._lock.locked():
            async with self._lock:
                return True
        if time.monotonic() - self._tried_at < self._min_interval:
            return False
        async with self._lock:
            if time.monotonic() - self._tried_at < self._min_interval:
                return True  # another caller just fetched
            try:
                await self._fetch()
            except (OSError, ValueError, TimeoutError) as e:
                log.warning("JWKS fetch from %s failed, using cached keys: %s", self.url, e)
            except Exception:  # a refresh (often a background one) never dies
                log.exception("JWKS fetch from %s failed, using cached keys", self.url)
        return True

    async def close(self) -> None:
        """Stop a background refresh (each fetch closes its own connection)."""
        if self._background is not None:
            self._background.cancel()
